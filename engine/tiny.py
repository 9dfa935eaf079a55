"""A tiny chat model made on the spot: a byte-level BPE tokenizer trained in a second and a
randomly initialised Llama-architecture model. Nothing is downloaded. Used by the demo and tests."""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]


def _corpus(extra: list[str]) -> list[str]:
    from .identity import DEFAULT_ANSWER, VARIED_QUESTIONS

    base = [
        "<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n", "<|im_start|>system\n",
        "<|System|>:", "<|User|>:", "<|Bot|>:",
        DEFAULT_ANSWER, *VARIED_QUESTIONS,
        "The quick brown fox jumps over the lazy dog.", "Hello, how can I help you today?",
        "上海是一座美丽的城市。", "请给我介绍五个上海的景点", "今天天气很好，我们去公园散步吧。",
        "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?-_()[]{}'\"/\\@#$%^&*+=<>|~`",
    ]
    return (base + extra) * 4


def build_tokenizer(out_dir: str | Path, extra_texts: list[str] | None = None, vocab_size: int = 1024,
                    chat_template: str | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(extra_texts or []), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    if chat_template:
        fast.chat_template = chat_template
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast


def build_tiny_model(out_dir: str | Path, *, hidden: int = 128, layers: int = 2, heads: int = 4,
                     kv_heads: int = 2, intermediate: int = 256, seed: int = 0,
                     extra_texts: list[str] | None = None, chat_template: str | None = None) -> Path:
    """Write a tokenizer and a random-init LlamaForCausalLM to ``out_dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tok = build_tokenizer(out, extra_texts, chat_template=chat_template)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=False,
                      initializer_range=0.1,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    return out
