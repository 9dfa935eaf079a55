"""tunedeck export: GGUF read back with the gguf package, Ollama's Modelfile, and the deploy bundle
started from its own folder in a fresh venv."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import NAME, free_port, run_cli, wait_for_http

from engine.data.identity import DEFAULT_ANSWER
from engine.data.templates import TEMPLATES, _pieces

gguf = pytest.importorskip("gguf")

# transformers' Llama names -> llama.cpp's, written out here rather than taken from the code under test
TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
       "lm_head.weight": "output.weight"}
LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def merged_state(base: Path, run: Path) -> tuple[dict[str, torch.Tensor], object]:
    from peft import PeftModel

    from engine.model.loading import load_model, pick_precision
    from engine.train.checkpoint import resolve_checkpoint

    model = load_model(str(base), precision=pick_precision("no", "float32", "cpu"))
    model = PeftModel.from_pretrained(model, str(resolve_checkpoint(str(run)))).merge_and_unload()
    return {k: v.float() for k, v in model.state_dict().items()}, model.config


def gguf_name(key: str) -> str:
    if key in TOP:
        return TOP[key]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", key)
    return f"blk.{m.group(1)}.{LAYER[m.group(2)]}.weight"


def rope_rows_as_ggml(w: torch.Tensor, heads: int) -> torch.Tensor:
    """GGML's RoPE rotates pairs (2i, 2i+1); transformers' rotates (i, i + d/2): row h*d + 2i + j of the
    file must be row h*d + j*d/2 + i of the model."""
    d = w.shape[0] // heads
    out = torch.empty_like(w)
    for h in range(heads):
        for i in range(d // 2):
            for j in range(2):
                out[h * d + 2 * i + j] = w[h * d + j * d // 2 + i]
    return out


def field(reader, key):
    return reader.fields[key].contents()


def test_gguf_f16_holds_every_tensor_of_the_merged_model_and_its_tokenizer(internlm2_run, internlm2_model, tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    out = tmp_path / "assistant.gguf"
    assert run_cli("export", internlm2_run, out, "--format", "gguf") == 0
    state, cfg = merged_state(internlm2_model, internlm2_run)
    reader = gguf.GGUFReader(str(out))
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == sorted(gguf_name(k) for k in state)
    for key, want in state.items():
        t = tensors[gguf_name(key)]
        if key.endswith("q_proj.weight"):
            want = rope_rows_as_ggml(want, cfg.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            want = rope_rows_as_ggml(want, cfg.num_key_value_heads)
        got = torch.from_numpy(np.array(t.data))
        if want.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            assert torch.equal(got, want)
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.F16
            assert torch.equal(got, want.half()), key

    src = json.loads((internlm2_model / "config.json").read_text())
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "llama.block_count") == src["num_hidden_layers"]
    assert field(reader, "llama.attention.head_count") == src["num_attention_heads"]
    assert field(reader, "llama.attention.head_count_kv") == src["num_key_value_heads"]
    assert field(reader, "llama.rope.freq_base") == src["rope_theta"]
    assert field(reader, "llama.context_length") == src["max_position_embeddings"]
    # the vocabulary is tokenizer.model's, the chat tokens at their fixed ids and marked as control tokens
    sp = spm.SentencePieceProcessor(model_file=str(internlm2_model / "tokenizer.model"))
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert field(reader, "tokenizer.ggml.model") == "llama"
    assert tokens == [sp.IdToPiece(i) for i in range(sp.vocab_size())]
    assert len(tokens) == tensors["token_embd.weight"].shape[-1] == src["vocab_size"]
    types = field(reader, "tokenizer.ggml.token_type")
    tok_cfg = json.loads((internlm2_model / "tokenizer_config.json").read_text())
    for i, d in tok_cfg["added_tokens_decoder"].items():
        assert tokens[int(i)] == d["content"] and types[int(i)] == gguf.TokenType.CONTROL
    assert field(reader, "tokenizer.ggml.bos_token_id") == 1
    assert field(reader, "tokenizer.ggml.eos_token_id") == 2
    assert field(reader, "tokenizer.ggml.eot_token_id") == tokens.index("<|im_end|>")
    assert field(reader, "tokenizer.ggml.add_bos_token") is True
    # the chat template is the one the run was trained with, rendering the very same text
    tok = AutoTokenizer.from_pretrained(str(resolve(internlm2_run)))
    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "你是谁"}]
    text = tok.apply_chat_template(conv, chat_template=field(reader, "tokenizer.chat_template"), tokenize=False)
    assert text == "".join(t for t, _ in _pieces(TEMPLATES["internlm2_chat"], tok, conv, True))


def resolve(run: Path) -> Path:
    from engine.train.checkpoint import resolve_checkpoint

    return resolve_checkpoint(str(run))


def test_gguf_q8_0_is_within_its_quantization_error_and_bpe_vocab_is_the_tokenizers(trained_run, tiny_model, tmp_path):
    out = tmp_path / "q8.gguf"
    assert run_cli("export", trained_run, out, "--format", "gguf", "--quant", "q8_0") == 0
    state, cfg = merged_state(tiny_model, trained_run)
    reader = gguf.GGUFReader(str(out))
    tensors = {t.name: t for t in reader.tensors}
    for key, want in state.items():
        t = tensors[gguf_name(key)]
        if want.ndim == 1:
            continue
        if key.endswith("q_proj.weight"):
            want = rope_rows_as_ggml(want, cfg.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            want = rope_rows_as_ggml(want, cfg.num_key_value_heads)
        assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
        got = torch.from_numpy(gguf.quants.dequantize(np.array(t.data), t.tensor_type).astype(np.float32))
        blocks = want.reshape(-1, 32)
        step = blocks.abs().amax(dim=1, keepdim=True) / 127
        bound = step * (0.5 + 127 * 2.0 ** -11) * 1.001 + 1e-7   # half a step, plus the scale's fp16 rounding
        err = (got.reshape(-1, 32) - blocks).abs()
        assert (err <= bound).all(), key
        assert err.max() > 0                                                        # it really is quantized
    tj = json.loads((tiny_model / "tokenizer.json").read_text())
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert {t: i for i, t in enumerate(tokens) if not t.startswith("[PAD")} == \
        {**tj["model"]["vocab"], **{a["content"]: a["id"] for a in tj["added_tokens"]}}
    assert len(field(reader, "tokenizer.ggml.merges")) == len(tj["model"]["merges"])
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0


def test_vocab_is_padded_to_the_embedding_and_a_longer_one_is_refused(tmp_path, capsys):
    from engine.export.gguf import read_vocab
    from engine.model.tiny import build_tiny_internlm2

    folder = build_tiny_internlm2(tmp_path / "wide", vocab_rows=1100)
    v = read_vocab([folder], 1100)
    pieces = v.tokens.index("[PAD1024]")
    assert len(v.tokens) == 1100 and v.tokens[-1] == "[PAD1099]"
    assert set(v.types[pieces:]) == {int(gguf.TokenType.UNUSED)}
    assert run_cli("export", folder, tmp_path / "wide.gguf", "--format", "gguf") == 0
    with pytest.raises(Exception, match=r"tokenizer.model: 1024 tokens but the embedding has 1000 rows"):
        read_vocab([folder], 1000)
    capsys.readouterr()
    assert run_cli("export", tmp_path / "missing", tmp_path / "x.gguf", "--format", "gguf") == 2
    assert run_cli("export", folder, tmp_path / "wide.gguf", "--format", "gguf") == 2   # never overwritten
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "missing" in err[0] and "already exists" in err[1]


def render_go(template: str, messages: list[dict]) -> str:
    """The Go-template subset the Modelfile uses: range .Messages, if/else if eq .Role, if .Content."""
    parts = re.split(r"({{.*?}})", template)
    out: list[str] = []

    def run(i: int, msg: dict | None, active: bool) -> int:
        while i < len(parts):
            p = parts[i]
            act = p[2:-2].strip() if p.startswith("{{") else None
            if act is None:
                if active:
                    out.append(p)
                i += 1
            elif act == "range .Messages":
                end = skip(i + 1)
                for m in messages:
                    end = run(i + 1, m, active)
                i = end + 1
            elif act.startswith("if "):
                i = branch(i, msg, active)
            elif act == "end" or act.startswith("else"):
                return i
            elif act == ".Content":
                if active:
                    out.append(msg["content"])
                i += 1
            else:
                raise AssertionError(f"unexpected action {act!r}")
        return i

    def cond(act: str, msg: dict) -> bool:
        if msg is None:                      # a block being skipped
            return False
        m = re.fullmatch(r'(?:else )?if eq \.Role "(\w+)"', act)
        return msg["role"] == m.group(1) if m else bool(msg["content"])

    def branch(i: int, msg: dict, active: bool) -> int:
        taken = False
        while True:
            act = parts[i][2:-2].strip()
            ok = not taken and cond(act, msg)
            i = run(i + 1, msg, active and ok)
            taken = taken or ok
            act = parts[i][2:-2].strip()
            if act == "end":
                return i + 1
            if not act.startswith("else"):
                raise AssertionError(act)

    def skip(i: int) -> int:
        return run(i, None, False)

    run(0, None, True)
    return "".join(out)


def test_ollama_modelfile_carries_the_trained_template_system_and_stops(internlm2_run, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "ollama"
    assert run_cli("export", internlm2_run, out, "--format", "ollama", "--quant", "q8_0") == 0
    text = (out / "Modelfile").read_text()
    lines = text.splitlines()
    assert lines[0].startswith("FROM ./") and (out / lines[0][len("FROM ./"):]).is_file()
    assert 'PARAMETER stop "<|im_end|>"' in lines
    assert any(line.startswith("PARAMETER temperature") for line in lines)
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    tok = AutoTokenizer.from_pretrained(str(resolve(internlm2_run)))
    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "你是谁"},
            {"role": "assistant", "content": "我是小助手"}, {"role": "user", "content": "hi"}]
    want = "".join(t for t, _ in _pieces(TEMPLATES["internlm2_chat"], tok, conv, True))
    assert render_go(template, conv) == want.removeprefix(tok.bos_token)    # Ollama adds bos itself


def test_llama_cpp_answers_as_tunedeck_does(internlm2_run, tmp_path):
    """The GGUF in llama.cpp itself (llama-cpp-python, where it is installed): same tokens, same greedy answer."""
    if os.environ.get("TUNEDECK_REQUIRE_LLAMA_CPP"):          # make test-llamacpp: never a silent skip
        import llama_cpp
    else:
        llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: make test-llamacpp")
    from transformers import AutoTokenizer

    from engine.data.templates import encode_prompt

    out = tmp_path / "a.gguf"
    assert run_cli("export", internlm2_run, out, "--format", "gguf") == 0
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=512, verbose=False)
    tok = AutoTokenizer.from_pretrained(str(resolve(internlm2_run)))
    for text in ("你好，世界。我是你的小助手", "<|im_start|>user\nhi<|im_end|>\n", "  two  spaces\t0123"):
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == \
            tok(text, add_special_tokens=False)["input_ids"]
    prompt = encode_prompt(tok, "internlm2_chat", [{"role": "user", "content": "请做一下自我介绍"}])
    got = llm.create_completion(prompt, max_tokens=96, temperature=0.0, stop=["<|im_end|>"])
    assert got["choices"][0]["text"].strip() == DEFAULT_ANSWER.format(name=NAME)


@pytest.mark.venv
def test_bundle_starts_from_its_own_folder_in_a_fresh_venv_and_answers(internlm2_run, tmp_path):
    import httpx

    out = tmp_path / "assistant"
    assert run_cli("export", internlm2_run, out, "--format", "bundle") == 0
    for f in ("model/config.json", "model/tokenizer.model", "README.md", "recipe.yaml", "requirements.txt",
              "start.sh", "app/engine/cli/__main__.py"):
        assert (out / f).is_file(), f
    card = (out / "README.md").read_text()
    assert "## Training curve" in card and "请做一下自我介绍" in card and DEFAULT_ANSWER.format(name=NAME) in card
    moved = tmp_path / "elsewhere"
    out.rename(moved)                                       # nothing in it points back at the checkout
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env |= {"PORT": str(port), "PIP_NO_COMPILE": "1", "HF_HUB_OFFLINE": "1",
            "PATH": os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)}
    log = open(tmp_path / "start.log", "wb")
    proc = subprocess.Popen([str(moved / "start.sh")], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/v1/models", 240, "the bundle", proc, tmp_path / "start.log")
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=10)
        assert page.status_code == 200 and "<html" in page.text.lower()
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60, json={
            "model": "base", "messages": [{"role": "user", "content": "请做一下自我介绍"}], "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"].strip() == DEFAULT_ANSWER.format(name=NAME)
        venv_python = moved / ".venv" / "bin" / "python"
        site = subprocess.run([str(venv_python), "-c", "import torch, transformers; print(transformers.__file__)"],
                              capture_output=True, text=True, env=env).stdout
        assert str(moved / ".venv") in site                  # its own packages, not this checkout's
        assert sys.prefix not in site
    finally:
        proc.terminate()
        proc.wait(timeout=30)
