"""InternLM2 as it ships (config.json with auto_map, its own code, tokenizer.model, the chat
tokenizer_config): loaded natively as transformers' Llama, its own code never run.

The reference here is written from InternLM2's published layout, not from tunedeck's converter: wqkv's
rows grouped per key/value head (g query heads, one key head, one value head), RMSNorm, rotate-half
RoPE with the config's scaling, SwiGLU (w2(silu(w1 x) * w3 x))."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEMO_RECIPE, NAME, run_cli

from engine.data.identity import DEFAULT_ANSWER
from engine.model.tiny import INTERNLM2_SPECIALS, build_tiny_internlm2


def internlm2_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = json.loads((folder / "model.safetensors.index.json").read_text()) \
        if (folder / "model.safetensors.index.json").is_file() else None
    files = sorted(set(index["weight_map"].values())) if index else ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out |= {k: v.float() for k, v in load_file(str(folder / f)).items()}
    return out


def reference_logits(cfg: dict, w: dict[str, torch.Tensor], ids: list[int]) -> torch.Tensor:
    """InternLM2's forward for one sequence, fp32, from its published layout."""
    hidden, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, g, eps, n = hidden // nh, nh // nkv, cfg["rms_norm_eps"], len(ids)
    base, scaling, maxp = float(cfg["rope_theta"]), cfg.get("rope_scaling") or {}, cfg["max_position_embeddings"]
    kind, factor = scaling.get("type") or scaling.get("rope_type"), float(scaling.get("factor", 1.0))
    if kind == "dynamic" and n > maxp:                          # dynamic NTK: a larger base past max positions
        base = base * ((factor * n / maxp) - (factor - 1)) ** (hd / (hd - 2))
    inv = 1.0 / base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    pos = torch.arange(n, dtype=torch.float64) / (factor if kind == "linear" else 1.0)
    freqs = torch.outer(pos, inv)
    cos, sin = torch.cat([freqs, freqs], -1).cos().float(), torch.cat([freqs, freqs], -1).sin().float()

    def rope(x):                                                # x: (n, heads, hd)
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos[:, None] + torch.cat([-x2, x1], -1) * sin[:, None]

    def rms(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    x = w["model.tok_embeddings.weight"][torch.tensor(ids)]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        hdn = rms(x, w[p + "attention_norm.weight"])
        qkv = (hdn @ w[p + "attention.wqkv.weight"].T).view(n, nkv, g + 2, hd)
        q = rope(qkv[:, :, :g].reshape(n, nh, hd))
        k = rope(qkv[:, :, g])
        v = qkv[:, :, g + 1]
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)   # query head j reads kv head j // g
        att = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + torch.einsum("hqk,khd->qhd", att, v).reshape(n, nh * hd) @ w[p + "attention.wo.weight"].T
        hdn = rms(x, w[p + "ffn_norm.weight"])
        gate, up = hdn @ w[p + "feed_forward.w1.weight"].T, hdn @ w[p + "feed_forward.w3.weight"].T
        ff = torch.nn.functional.silu(gate) * up
        x = x + ff @ w[p + "feed_forward.w2.weight"].T
    return rms(x, w["model.norm.weight"]) @ w["output.weight"].T


def native_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()


def _fp32():
    from engine.model.loading import pick_precision

    return pick_precision(device="cpu")


@pytest.mark.parametrize("rope_scaling", [None, {"type": "dynamic", "factor": 2.0}, {"type": "linear", "factor": 3.0}],
                         ids=["plain", "dynamic", "linear"])
def test_native_load_gives_the_reference_forwards_logits(tmp_path, rope_scaling):
    from engine.model.loading import load_model

    folder = build_tiny_internlm2(tmp_path / "m", hidden=64, heads=4, kv_heads=2, intermediate=96,
                                  max_positions=16, rope_scaling=rope_scaling, seed=3, shards=3)
    model = load_model(str(folder), precision=_fp32(), trust_remote_code=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not any(name.startswith("transformers_modules") for name in sys.modules)   # its code never ran
    cfg = json.loads((folder / "config.json").read_text())
    ids = torch.randint(3, 1000, (24,), generator=torch.Generator().manual_seed(0)).tolist()   # 24 > 16 positions
    want = reference_logits(cfg, internlm2_weights(folder), ids)
    torch.testing.assert_close(native_logits(model, ids), want, atol=1e-5, rtol=1e-5)


TEXTS = ["请做一下自我介绍", "我是NagatoYuki的小助手，内在是上海AI实验室书生·浦语的 InternLM2 1.8B 大模型哦",
         "The quick brown fox  jumps", " leading and trailing  ", "digits 0123456789 and 3.14159",
         "tabs\tand\nnewlines\n\n", "emoji 🤖 and rare 龘", "".join(INTERNLM2_SPECIALS),
         "<|im_start|>user\n你是谁<|im_end|>\n<|im_start|>assistant\n"]


def test_tokenization_is_sentencepieces_own_and_special_tokens_keep_their_ids(internlm2_model):
    import sentencepiece as spm

    from engine.model.loading import load_tokenizer

    tok = load_tokenizer(str(internlm2_model), trust_remote_code=True)
    sp = spm.SentencePieceProcessor(model_file=str(internlm2_model / "tokenizer.model"))
    rows = json.loads((internlm2_model / "config.json").read_text())["vocab_size"]
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == sp.encode(text), text
        assert tok.decode(ids) == sp.decode(ids) == text
    assert tok("你好")["input_ids"][0] == 1                     # add_bos_token, as InternLM2's tokenizer does
    cfg = json.loads((internlm2_model / "tokenizer_config.json").read_text())
    for i, d in cfg["added_tokens_decoder"].items():
        assert tok.convert_tokens_to_ids(d["content"]) == int(i) < rows
        assert sp.piece_to_id(d["content"]) == int(i)
    assert tok.convert_tokens_to_ids("<|im_start|>") == rows - 1 and tok.convert_tokens_to_ids("<|im_end|>") == rows - 2
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)


def test_a_transformers_whose_conversion_is_not_sentencepieces_is_refused(internlm2_model, tmp_path, monkeypatch):
    """An older transformers converts SentencePiece models without merges: refused in one line, never
    a tokenizer that gives other tokens than the model was trained on."""
    from transformers.convert_slow_tokenizer import SpmConverter

    from engine.core.errors import UserError
    from engine.model.internlm2 import build_tokenizer

    real = SpmConverter.build_tokenizer_from_spm_proto

    def without_merges(proto, vocab, merges=None, legacy=True):
        return real(proto, vocab, merges=[], legacy=legacy)

    monkeypatch.setattr(SpmConverter, "build_tokenizer_from_spm_proto", staticmethod(without_merges))
    with pytest.raises(UserError, match="does not convert a SentencePiece model faithfully"):
        build_tokenizer(internlm2_model, 0)


def test_the_named_template_is_internlm2s_chat_template_token_for_token(internlm2_model):
    from engine.data.templates import encode_conversation, encode_prompt
    from engine.model.loading import load_tokenizer

    tok = load_tokenizer(str(internlm2_model))
    assert "<|im_start|>" in tok.chat_template
    chats = [[{"role": "user", "content": "请做一下自我介绍"}],
             [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Who are you?"},
              {"role": "assistant", "content": "我是NagatoYuki的小助手"}, {"role": "user", "content": "1 + 1 = ?"}]]
    for messages in chats:
        want = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        want = list(want["input_ids"] if hasattr(want, "keys") else want)
        assert encode_prompt(tok, "internlm2_chat", messages) == want
        full = [*messages, {"role": "assistant", "content": "好的 OK"}]
        ids, labels = encode_conversation(tok, "internlm2_chat", full)
        rendered = tok.apply_chat_template(full, tokenize=True)
        rendered = list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)
        assert ids + tok("\n", add_special_tokens=False)["input_ids"] == rendered   # the template's last newline
        trained = [t for t, lab in zip(ids, labels) if lab != -100]
        assert tok.decode(trained) == "".join(m["content"] + "<|im_end|>" for m in full if m["role"] == "assistant")


def test_data_check_shows_internlm2s_real_tokens(internlm2_model, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "你是谁"},
                                             {"role": "assistant", "content": "我是 NagatoYuki"}]},
                               ensure_ascii=False) + "\n")
    rc = run_cli("data", "check", DEMO_RECIPE, "--set", f"model.path={internlm2_model}",
                 "--set", f"data.data_path={data}")
    out = capsys.readouterr().out
    assert rc == 0
    assert "<|im_start|>user\n你是谁<|im_end|>" in out and "我是 NagatoYuki<|im_end|>" in out


def test_a_model_whose_own_code_fails_is_one_line_naming_the_file(tiny_model, tmp_path, capsys):
    import shutil

    folder = tmp_path / "remote"
    folder.mkdir()
    for f in tiny_model.glob("*token*"):
        shutil.copy(f, folder / f.name)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "mymodel", "architectures": ["MyModelForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_mymodel.MyConfig",
                     "AutoModelForCausalLM": "modeling_mymodel.MyModelForCausalLM"}}))
    (folder / "configuration_mymodel.py").write_text(
        "from transformers import PretrainedConfig\n\n\n"
        "class MyConfig(PretrainedConfig):\n    model_type = 'mymodel'\n")
    (folder / "modeling_mymodel.py").write_text(
        "from transformers import PreTrainedModel\n"
        "from transformers.modeling_attn_mask_utils import AttentionMaskConverter\n")
    rc = run_cli("chat", folder, "--trust-remote-code", "--prompt", "hi")
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "modeling_mymodel.py" in err and "modeling_attn_mask_utils" in err


def _tuned(internlm2_model, run):
    from peft import PeftModel

    from engine.model.loading import load_model
    from engine.train.checkpoint import resolve_checkpoint

    model = load_model(str(internlm2_model), precision=_fp32())
    return PeftModel.from_pretrained(model, str(resolve_checkpoint(str(run)))).eval()


def test_identity_training_on_it_learns_and_chat_answers_with_the_name(internlm2_run, internlm2_model, capsys):
    assert run_cli("chat", internlm2_model, "--adapter", internlm2_run, "--prompt", "请做一下自我介绍") == 0
    assert capsys.readouterr().out.strip() == DEFAULT_ANSWER.format(name=NAME)
    log = (internlm2_run / "train.log").read_text()
    assert "converting the InternLM2 checkpoint" in log or "InternLM2" in log


@pytest.mark.parametrize("fmt", ["internlm2", "llama"])
def test_merge_round_trips_in_both_formats(internlm2_run, internlm2_model, tmp_path, fmt):
    from transformers import AutoModelForCausalLM

    from engine.model.loading import load_model

    ids = torch.randint(3, 1000, (20,), generator=torch.Generator().manual_seed(5)).tolist()
    want = native_logits(_tuned(internlm2_model, internlm2_run), ids)
    out = tmp_path / "merged"
    args = ["merge", internlm2_model, internlm2_run, out] + (["--format", "llama"] if fmt == "llama" else [])
    assert run_cli(*args) == 0
    if fmt == "internlm2":
        cfg = json.loads((out / "config.json").read_text())
        assert cfg == json.loads((internlm2_model / "config.json").read_text())     # carried over unchanged
        for f in ("modeling_internlm2.py", "tokenizer.model", "tokenizer_config.json"):
            assert (out / f).read_bytes() == (internlm2_model / f).read_bytes()
        weights = internlm2_weights(out)
        assert any(".attention.wqkv." in k for k in weights)
        torch.testing.assert_close(reference_logits(cfg, weights, ids), want, atol=1e-4, rtol=1e-4)
        got = native_logits(load_model(str(out), precision=_fp32()), ids)
    else:
        got = native_logits(AutoModelForCausalLM.from_pretrained(str(out)).eval(), ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_the_exported_internlm2_adapter_on_the_reference_forward_gives_the_tuned_logits(
        internlm2_run, internlm2_model, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "adapter"
    assert run_cli("export-adapter", internlm2_run, out) == 0
    acfg = json.loads((out / "adapter_config.json").read_text())
    assert set(acfg["target_modules"]) == {"wqkv", "wo", "w1", "w2", "w3"}
    adapter = load_file(str(out / "adapter_model.safetensors"))
    weights = internlm2_weights(internlm2_model)
    for key in [k for k in adapter if k.endswith("lora_A.weight")]:
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        name = module.rsplit(".", 1)[-1]
        rank = acfg.get("rank_pattern", {}).get(name, acfg["r"])
        alpha = acfg.get("alpha_pattern", {}).get(name, acfg["lora_alpha"])
        a, b = adapter[key].float(), adapter[key.replace("lora_A", "lora_B")].float()
        assert a.shape[0] == rank
        weights[module + ".weight"] = weights[module + ".weight"] + (alpha / rank) * (b @ a)
    cfg = json.loads((internlm2_model / "config.json").read_text())
    ids = torch.randint(3, 1000, (20,), generator=torch.Generator().manual_seed(6)).tolist()
    want = native_logits(_tuned(internlm2_model, internlm2_run), ids)
    base = reference_logits(cfg, internlm2_weights(internlm2_model), ids)
    assert (want - base).abs().max() > 1e-2                       # the adapter really changes the answer
    torch.testing.assert_close(reference_logits(cfg, weights, ids), want, atol=1e-4, rtol=1e-4)
