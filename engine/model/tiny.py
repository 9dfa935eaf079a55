"""A tiny chat model made on the spot: a byte-level BPE tokenizer trained in a second and a
randomly initialised Llama-architecture model. Nothing is downloaded. Used by the demo and tests."""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]


def _corpus(extra: list[str]) -> list[str]:
    from engine.data.identity import DEFAULT_ANSWER, VARIED_QUESTIONS

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


# ------------------------------------------------------------------ InternLM2, as the hub ships it
INTERNLM2_SPECIALS = ["<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>",
                      "<|im_start|>"]          # the last ids of the vocabulary, in this order
INTERNLM2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
_REMOTE_FILES = ("configuration_internlm2.py", "modeling_internlm2.py", "tokenization_internlm2.py",
                 "tokenization_internlm2_fast.py")


def build_internlm2_tokenizer_model(out_file: str | Path, extra_texts: list[str] | None = None,
                                    pieces: int = 1018) -> int:
    """A SentencePiece BPE model shaped like InternLM2's tokenizer.model (byte fallback, no dummy prefix,
    digits split, ``<unk> <s> </s>`` at 0-2) trained on the spot, with the six chat special tokens
    appended as its last pieces; returns the vocabulary size."""
    import io

    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(extra_texts or [])), model_writer=buf, vocab_size=pieces,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, split_digits=True,
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False, minloglevel=2)
    proto = pb.ModelProto()
    proto.ParseFromString(buf.getvalue())
    for token in INTERNLM2_SPECIALS:
        p = proto.pieces.add()
        p.piece, p.score, p.type = token, 0.0, pb.ModelProto.SentencePiece.USER_DEFINED
    Path(out_file).write_bytes(proto.SerializeToString())
    return len(proto.pieces)


def build_tiny_internlm2(out_dir: str | Path, *, hidden: int = 128, layers: int = 2, heads: int = 4,
                         kv_heads: int = 2, intermediate: int = 256, seed: int = 0, max_positions: int = 2048,
                         rope_scaling: dict | None = None, extra_texts: list[str] | None = None,
                         shards: int = 2, vocab_rows: int | None = None, init_std: float = 0.1,
                         dtype: str = "float32") -> Path:
    """A random-init model folder laid out as internlm/internlm2-chat-1_8b is on the hub: config.json
    with model_type internlm2 and auto_map to its own code, InternLM2-named safetensors shards with an
    index (wqkv fused per key/value head), a SentencePiece tokenizer.model with the chat special tokens at
    the last ids, the chat tokenizer_config.json and generation_config.json. The four remote-code files
    are stand-ins written here that refuse to run: tunedeck must never execute them. ``vocab_rows``
    gives the embedding more rows than the tokenizer has pieces (the benchmarks' 92,544 at the 1.8B
    shape); ``dtype`` is the stored weights' (bfloat16 as on the hub)."""
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = build_internlm2_tokenizer_model(out / "tokenizer.model", extra_texts)
    ids = {t: vocab - len(INTERNLM2_SPECIALS) + i for i, t in enumerate(INTERNLM2_SPECIALS)}
    head_dim = hidden // heads
    cfg = {
        "architectures": ["InternLM2ForCausalLM"], "attn_implementation": "eager",
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        "bias": False, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": hidden,
        "initializer_range": init_std, "intermediate_size": intermediate, "max_position_embeddings": max_positions,
        "model_type": "internlm2", "num_attention_heads": heads, "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads, "pad_token_id": 2, "rms_norm_eps": 1e-05,
        "rope_scaling": rope_scaling, "rope_theta": 1000000, "tie_word_embeddings": False,
        "torch_dtype": dtype, "transformers_version": "4.41.0", "use_cache": True,
        "vocab_size": max(vocab, vocab_rows or 0),
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": [2, ids["<|im_end|>"]], "pad_token_id": 2}, indent=2) + "\n")
    added = {"0": "<unk>", "1": "<s>", "2": "</s>", **{str(i): t for t, i in ids.items()}}
    tok_cfg = {
        "add_bos_token": True, "add_eos_token": False,
        "added_tokens_decoder": {i: {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                     "single_word": False, "special": True} for i, t in added.items()},
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>",
                                      "<|interpreter|>", "<|plugin|>"],
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                       "tokenization_internlm2_fast.InternLM2TokenizerFast"]},
        "bos_token": "<s>", "chat_template": INTERNLM2_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "decode_with_prefix_space": False, "eos_token": "</s>", "model_max_length": 1000000000000000019884624838656,
        "pad_token": "</s>", "sp_model_kwargs": None, "tokenizer_class": "InternLM2Tokenizer", "unk_token": "<unk>",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"additional_special_tokens": tok_cfg["additional_special_tokens"], "bos_token": "<s>",
         "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"}, indent=2) + "\n")
    for name in _REMOTE_FILES:
        (out / name).write_text(
            f'"""Stand-in for InternLM\'s {name} in a tunedeck fixture: tunedeck must never run remote code."""\n'
            f'raise ImportError("{name} was executed: InternLM2 must load natively")\n')

    g = torch.Generator().manual_seed(seed)
    store = getattr(torch, dtype)

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * init_std).to(store)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=store)

    qkv_rows = kv_heads * (heads // kv_heads + 2) * head_dim
    rows = cfg["vocab_size"]
    state: dict[str, torch.Tensor] = {"model.tok_embeddings.weight": normal(rows, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        state |= {p + "attention.wqkv.weight": normal(qkv_rows, hidden),
                  p + "attention.wo.weight": normal(hidden, heads * head_dim),
                  p + "feed_forward.w1.weight": normal(intermediate, hidden),
                  p + "feed_forward.w3.weight": normal(intermediate, hidden),
                  p + "feed_forward.w2.weight": normal(hidden, intermediate),
                  p + "attention_norm.weight": ones(hidden), p + "ffn_norm.weight": ones(hidden)}
    state |= {"model.norm.weight": ones(hidden), "output.weight": normal(rows, hidden)}
    names = list(state)
    per = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        part = names[s * per:(s + 1) * per]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k] for k in part}, str(out / fname), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, fname)
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return out
