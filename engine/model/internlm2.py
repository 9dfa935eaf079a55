"""InternLM2 checkpoints as transformers' own Llama architecture: no remote code is ever executed.

internlm2-chat-1_8b ships as a hub folder whose config.json maps to its own Python files
(``auto_map``). That code no longer loads on today's transformers, and its fast tokenizer is built
wrongly there. Architecturally InternLM2 is Llama with other names and one fused projection:

    InternLM2                                   Llama
    model.tok_embeddings                        model.embed_tokens
    layers.N.attention.wqkv  (fused, see below) layers.N.self_attn.q_proj / k_proj / v_proj
    layers.N.attention.wo                       layers.N.self_attn.o_proj
    layers.N.feed_forward.w1 / w3 / w2          layers.N.mlp.gate_proj / up_proj / down_proj
    layers.N.attention_norm / ffn_norm          layers.N.input_layernorm / post_attention_layernorm
    output                                      lm_head

``wqkv``'s rows are grouped per key/value head: for each of the ``kv_heads`` groups, ``g = heads /
kv_heads`` query heads, then one key head, then one value head, ``head_dim`` rows each.

``native_path`` converts such a folder once into a Llama-layout folder in tunedeck's cache (shard by
shard, so a big model never needs twice its size in memory) and hands that folder to transformers.
The tokenizer is built from ``tokenizer.model`` by transformers' own SentencePiece conversion, with
the special tokens at the ids ``tokenizer_config.json`` gives them. ``to_internlm2_state`` goes the
other way, for merged models and exported adapters.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.core.errors import UserError
from engine.core.files import cache_dir

CONVERTER_VERSION = 1
NATIVE_MARKER = "tunedeck_native.json"          # in a converted folder: where it came from
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")

_LAYER = r"model\.layers\.(\d+)\."
# InternLM2's weight names -> Llama's, one table for both directions: whole names, then the part after
# model.layers.N. (wqkv is split into q/k/v_proj apart)
_TOP_NAMES = {"model.tok_embeddings.weight": "model.embed_tokens.weight", "model.norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_LAYER_NAMES = {"attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj",
                "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj",
                "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_WQKV = re.compile(rf"^{_LAYER}attention\.wqkv\.(weight|bias)$")
_QKV = re.compile(rf"^{_LAYER}self_attn\.([qkv])_proj\.(weight|bias)$")
_IN_LAYER = re.compile(rf"^{_LAYER}(.+)\.(weight|bias)$")
# module names, for adapters: Llama's -> InternLM2's
MODULE_NAMES = {llama: intern for intern, llama in _LAYER_NAMES.items() if "norm" not in intern}


def _renamed(key: str, top: dict[str, str], layer: dict[str, str]) -> str | None:
    if key in top:
        return top[key]
    m = _IN_LAYER.match(key)
    if m and m.group(2) in layer:
        return f"model.layers.{m.group(1)}.{layer[m.group(2)]}.{m.group(3)}"
    return None


# ---------------------------------------------------------------------------- recognising one
def read_config(path: str | Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_internlm2(path: str | Path) -> bool:
    cfg = read_config(path)
    return bool(cfg) and (cfg.get("model_type") == "internlm2"
                          or "InternLM2ForCausalLM" in (cfg.get("architectures") or []))



# ---------------------------------------------------------------------------- shapes
class Heads:
    def __init__(self, cfg: dict[str, Any]):
        try:
            self.hidden = int(cfg["hidden_size"])
            self.heads = int(cfg["num_attention_heads"])
            self.kv_heads = int(cfg.get("num_key_value_heads") or self.heads)
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"config.json: InternLM2 config lacks {e} (hidden_size, num_attention_heads)") from None
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise UserError(f"config.json: hidden_size {self.hidden}, num_attention_heads {self.heads} and "
                            f"num_key_value_heads {self.kv_heads} do not divide evenly")
        self.head_dim = self.hidden // self.heads
        self.groups = self.heads // self.kv_heads


def split_wqkv(w: Any, h: Heads) -> tuple[Any, Any, Any]:
    """wqkv's rows (weight or bias) -> q, k, v in Llama's layout."""
    rest = tuple(w.shape[1:])
    t = w.reshape(h.kv_heads, h.groups + 2, h.head_dim, *rest)
    q = t[:, : h.groups].reshape(h.heads * h.head_dim, *rest)
    k = t[:, h.groups].reshape(h.kv_heads * h.head_dim, *rest)
    v = t[:, h.groups + 1].reshape(h.kv_heads * h.head_dim, *rest)
    return q.contiguous(), k.contiguous(), v.contiguous()


def fuse_wqkv(q: Any, k: Any, v: Any, h: Heads) -> Any:
    """q, k, v (rows in Llama's layout) -> wqkv's rows, grouped per key/value head."""
    import torch

    rest = tuple(q.shape[1:])
    qg = q.reshape(h.kv_heads, h.groups, h.head_dim, *rest)
    kg = k.reshape(h.kv_heads, 1, h.head_dim, *rest)
    vg = v.reshape(h.kv_heads, 1, h.head_dim, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest).contiguous()


# ---------------------------------------------------------------------------- weights, both ways
def to_llama_state(state: dict[str, Any], h: Heads) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, t in state.items():
        m = _WQKV.match(key)
        if m:
            q, k, v = split_wqkv(t, h)
            for name, part in zip("qkv", (q, k, v)):
                out[f"model.layers.{m.group(1)}.self_attn.{name}_proj.{m.group(2)}"] = part
            continue
        llama = _renamed(key, _TOP_NAMES, _LAYER_NAMES)
        if llama is not None:
            out[llama] = t
        elif "rotary_emb" not in key:       # a buffer the Llama model computes itself
            raise UserError(f"InternLM2 checkpoint: unexpected weight {key!r}")
    return out


def to_internlm2_state(state: dict[str, Any], h: Heads) -> dict[str, Any]:
    """A Llama-layout state dict (a merged model) in InternLM2's names, wqkv fused again."""
    out: dict[str, Any] = {}
    qkv: dict[tuple[str, str], dict[str, Any]] = {}
    for key, t in state.items():
        m = _QKV.match(key)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = t
            continue
        out[_internlm2_key(key)] = t
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise UserError(f"layer {layer}: q, k and v projections must all be present to fuse wqkv")
        out[f"model.layers.{layer}.attention.wqkv.{kind}"] = fuse_wqkv(parts["q"], parts["k"], parts["v"], h)
    return out


def _internlm2_key(key: str) -> str:
    name = _renamed(key, {v: k for k, v in _TOP_NAMES.items()}, {v: k for k, v in _LAYER_NAMES.items()})
    if name is None:
        raise UserError(f"cannot write {key!r} in InternLM2's layout")
    return name


def llama_config(cfg: dict[str, Any]) -> Any:
    """InternLM2's config.json as a LlamaConfig (the same network)."""
    from transformers import LlamaConfig

    h = Heads(cfg)
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings", "initializer_range", "rms_norm_eps", "bos_token_id", "eos_token_id",
            "pad_token_id", "tie_word_embeddings")
    kw: dict[str, Any] = {k: cfg[k] for k in keep if k in cfg}
    kw["num_key_value_heads"] = h.kv_heads
    kw["hidden_act"] = cfg.get("hidden_act", "silu")
    kw["attention_bias"] = bool(cfg.get("bias", False))
    kw["mlp_bias"] = False
    kw["head_dim"] = h.head_dim
    kw["rope_theta"] = float(cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling")
    if scaling:
        kind = scaling.get("rope_type") or scaling.get("type")
        if kind not in ("linear", "dynamic"):
            raise UserError(f"config.json: rope_scaling type {kind!r} is not one InternLM2 defines (linear, dynamic)")
        kw["rope_scaling"] = {"rope_type": kind, "factor": float(scaling["factor"])}
    dtype = cfg.get("torch_dtype") or cfg.get("dtype")
    config = LlamaConfig(**kw)
    if dtype:
        setattr(config, "dtype" if "dtype" in vars(config) else "torch_dtype", dtype)
    config.architectures = ["LlamaForCausalLM"]
    return config


# ---------------------------------------------------------------------------- the converted folder
def _weight_files(src: Path) -> list[Path]:
    files = sorted(src.glob("*.safetensors")) or sorted(src.glob("pytorch_model*.bin"))
    if not files:
        raise UserError(f"model.path: {str(src)!r}: an InternLM2 folder without weights (*.safetensors or "
                        "pytorch_model*.bin)")
    return files


def _fingerprint(src: Path) -> str:
    h = hashlib.sha256(f"v{CONVERTER_VERSION}".encode())
    for f in sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith(".")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    return cache_dir("native")


def native_path(path: str | Path, *, log: Any = None) -> str:
    """The folder transformers should load: ``path`` itself unless it is an InternLM2 folder, whose
    Llama-layout conversion (made once, kept in the cache) is returned instead."""
    src = Path(path)
    if not src.is_dir() or not is_internlm2(src):
        return str(path)
    src = src.resolve()
    dst = cache_root() / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', src.name)}-{_fingerprint(src)}"
    if (dst / NATIVE_MARKER).is_file():
        return str(dst)
    if log:
        log(f"converting the InternLM2 checkpoint {src} to transformers' Llama layout in {dst} (once)")
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        convert(src, tmp)
        (tmp / NATIVE_MARKER).write_text(json.dumps({"source": str(src), "converter": CONVERTER_VERSION}) + "\n")
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, dst)
        except OSError:                    # another process finished the same conversion first
            if not (dst / NATIVE_MARKER).is_file():
                raise
    except OSError as e:
        raise UserError(f"model.path: {str(src)!r}: cannot write its Llama-layout conversion to {dst} "
                        f"({e.strerror or e}); set TUNEDECK_CACHE to a writable folder") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(dst)


def _iter_shards(files: list[Path]) -> Iterator[dict[str, Any]]:
    import torch
    from safetensors.torch import load_file

    for f in files:
        if f.suffix == ".safetensors":
            yield load_file(str(f))
        else:
            yield torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)


def convert(src: Path, dst: Path) -> None:
    """Write ``src`` (InternLM2 layout) to ``dst`` in the Llama layout, one shard at a time."""
    from safetensors.torch import save_file

    cfg = read_config(src) or {}
    h = Heads(cfg)
    dst.mkdir(parents=True)
    config = llama_config(cfg)
    config.save_pretrained(str(dst))
    files = _weight_files(src)
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(_iter_shards(files)):
        name = (f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" if len(files) > 1 else "model.safetensors")
        out = to_llama_state(shard, h)
        out = {k: v.contiguous() for k, v in out.items()}
        save_file(out, str(dst / name), metadata={"format": "pt"})
        total += sum(v.numel() * v.element_size() for v in out.values())
        weight_map.update(dict.fromkeys(out, name))
        del shard, out
    if len(files) > 1:
        (dst / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    if (src / "generation_config.json").is_file():
        shutil.copy(src / "generation_config.json", dst / "generation_config.json")
    build_tokenizer(src, int(cfg.get("vocab_size") or 0)).save_pretrained(str(dst))


# ---------------------------------------------------------------------------- the tokenizer
def build_tokenizer(src: Path, vocab_rows: int) -> Any:
    """InternLM2's tokenizer from its tokenizer.model by transformers' own SentencePiece conversion
    (never the remote fast class): it encodes as SentencePiece does, the special tokens keep the ids
    tokenizer_config.json gives them, and every one of them is checked to be a row of the embedding."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    spm_file = src / "tokenizer.model"
    if not spm_file.is_file():
        raise UserError(f"model.path: {str(src)!r}: an InternLM2 folder without tokenizer.model")
    import transformers

    too_old = UserError(f"InternLM2's tokenizer: transformers {transformers.__version__} does not convert a "
                        "SentencePiece model faithfully; pip install -U 'transformers>=5.24'")
    if not hasattr(SpmConverter, "build_tokenizer_from_spm_proto"):
        raise too_old
    proto = import_protobuf().ModelProto()
    proto.ParseFromString(spm_file.read_bytes())
    try:
        tok_cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        tok_cfg = {}
    added = {int(i): d["content"] for i, d in (tok_cfg.get("added_tokens_decoder") or {}).items()}
    vocab: dict[str, int] = {}
    for i, piece in enumerate(proto.pieces):
        vocab.setdefault(added.get(i, piece.piece), i)
    for i, content in added.items():
        if vocab.get(content) != i:
            raise UserError(f"{src / 'tokenizer_config.json'}: added token {content!r} at id {i} is not that "
                            f"piece of tokenizer.model ({len(proto.pieces)} pieces)")
    try:
        backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    except TypeError:           # an older conversion (no merges, no dummy-prefix rules): not SentencePiece's
        raise too_old from None

    def piece(i: int) -> str | None:
        return proto.pieces[i].piece if 0 <= i < len(proto.pieces) else None

    tid = proto.trainer_spec
    bos = tok_cfg.get("bos_token") or piece(tid.bos_id) or "<s>"
    eos = tok_cfg.get("eos_token") or piece(tid.eos_id) or "</s>"
    unk = tok_cfg.get("unk_token") or piece(tid.unk_id) or "<unk>"
    pad = tok_cfg.get("pad_token") or eos
    bos, eos, unk, pad = (t["content"] if isinstance(t, dict) else t for t in (bos, eos, unk, pad))
    if tok_cfg.get("add_bos_token", True) and bos in vocab:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    extra = [c for i, c in sorted(added.items()) if c not in (bos, eos, unk, pad)]
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token=unk,
                                  pad_token=pad, additional_special_tokens=extra,
                                  clean_up_tokenization_spaces=False)
    if tok_cfg.get("chat_template"):
        tok.chat_template = tok_cfg["chat_template"]
    rows = vocab_rows or len(proto.pieces)
    for content in [bos, eos, unk, pad, *extra]:
        i = tok.convert_tokens_to_ids(content)
        if i is None or i >= rows:
            raise UserError(f"{src}: special token {content!r} has id {i}, past the embedding's {rows} rows")
    _check_against_sentencepiece(tok, spm_file, extra, too_old)
    return tok


_PROBES = ("Hello, world!", "  two  spaces and a tab\t", "你好，世界。我是你的小助手", "0123456789 3.14",
           "line\nbreaks\n\n")


def _check_against_sentencepiece(tok: Any, spm_file: Path, specials: list[str], too_old: UserError) -> None:
    """The converted tokenizer must encode as SentencePiece itself does: a few probes, once per conversion."""
    try:
        import sentencepiece
    except ImportError:
        raise UserError("InternLM2's tokenizer needs sentencepiece (pip install sentencepiece)") from None
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_file))
    for text in (*_PROBES, "".join(specials) + "after"):
        if tok(text, add_special_tokens=False)["input_ids"] != sp.encode(text):
            raise too_old


# ---------------------------------------------------------------------------- writing InternLM2 back
def write_internlm2(state: dict[str, Any], src: Path, out: Path, *, max_shard_size: int | str = "5GB") -> None:
    """A Llama-layout state dict written as an InternLM2 checkpoint beside ``src``'s own files: wqkv
    fused again, InternLM2's names (sharded and indexed by huggingface_hub, as save_pretrained does),
    and the base's config, remote code and tokenizer files copied unchanged, so LMDeploy, XTuner and
    InternLM's own code load it."""
    from huggingface_hub import save_torch_state_dict

    cfg = read_config(src) or {}
    out.mkdir(parents=True, exist_ok=True)
    try:
        save_torch_state_dict(to_internlm2_state(state, Heads(cfg)), out, max_shard_size=max_shard_size,
                              metadata={"format": "pt"})
    except ValueError as e:            # an unreadable --max-shard-size
        raise UserError(f"--max-shard-size: {max_shard_size!r} is not a size (e.g. 2GB, 500MB) ({e})") from None
    for f in src.iterdir():
        if f.is_file() and (f.suffix == ".py" or f.name in ("config.json", *TOKENIZER_FILES)
                            or f.name.startswith("tokenizer")):
            shutil.copy(f, out / f.name)


# ---------------------------------------------------------------------------- adapters in InternLM2's names
_LORA_KEY = re.compile(r"^(?P<pre>.*?)model\.layers\.(?P<layer>\d+)\.(?P<module>self_attn\.[a-z_]+|mlp\.[a-z_]+)"
                       r"\.lora_(?P<ab>[AB])\.weight$")


def export_adapter(ckpt: Path, out: Path, base: Path) -> Path:
    """A peft LoRA adapter trained on the Llama layout of an InternLM2 model, written with InternLM2's
    module names (wqkv, wo, w1, w2, w3) so peft on InternLM2's own code gives the same outputs.

    q, k and v's adapters become one adapter of wqkv: A is theirs stacked (rank 3r), B places each one's
    rows where wqkv keeps that projection's rows (zeros elsewhere), and alpha grows with the rank so
    that alpha / rank, the scale, is the same: B·A on wqkv is exactly the three updates fused."""
    import torch
    from safetensors.torch import load_file, save_file

    cfg_file = ckpt / "adapter_config.json"
    try:
        acfg = json.loads(cfg_file.read_text())
        state = load_file(str(ckpt / "adapter_model.safetensors"))
    except (OSError, ValueError) as e:
        raise UserError(f"{ckpt}: not a LoRA adapter ({e})") from None
    for key in ("rank_pattern", "alpha_pattern"):
        if acfg.get(key):
            raise UserError(f"{cfg_file}: {key} is set; only a uniform rank and alpha can be exported")
    if acfg.get("use_dora") or acfg.get("modules_to_save") or acfg.get("bias", "none") != "none":
        raise UserError(f"{cfg_file}: DoRA, modules_to_save or trained biases cannot be written in InternLM2's names")
    h = Heads(read_config(base) or {})
    r, alpha = int(acfg["r"]), float(acfg["lora_alpha"])
    rslora = bool(acfg.get("use_rslora"))
    layers: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    prefix = "base_model.model."
    for key, t in state.items():
        m = _LORA_KEY.match(key)
        if not m:
            raise UserError(f"{ckpt}: adapter weight {key!r} is not one of a decoder layer's projections")
        prefix = m.group("pre")
        layers.setdefault(m.group("layer"), {}).setdefault(m.group("module"), {})[m.group("ab")] = t
    out_state: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    qkv_rank = 0
    for layer, mods in layers.items():
        p = f"{prefix}model.layers.{layer}."
        present = [n for n in "qkv" if f"self_attn.{n}_proj" in mods]
        if present:
            rows = {"q": h.heads * h.head_dim, "k": h.kv_heads * h.head_dim, "v": h.kv_heads * h.head_dim}
            rank = r * len(present)
            a = torch.cat([mods[f"self_attn.{n}_proj"]["A"] for n in present])
            dtype = a.dtype
            parts = {}
            for n in "qkv":
                b = torch.zeros(rows[n], rank, dtype=dtype)
                if n in present:
                    j = present.index(n)
                    b[:, j * r:(j + 1) * r] = mods[f"self_attn.{n}_proj"]["B"]
                parts[n] = b
            out_state[p + "attention.wqkv.lora_A.weight"] = a.contiguous()
            out_state[p + "attention.wqkv.lora_B.weight"] = fuse_wqkv(parts["q"], parts["k"], parts["v"], h)
            targets.add("wqkv")
            qkv_rank = rank
        for llama, intern in MODULE_NAMES.items():
            if llama in mods:
                for ab in "AB":
                    out_state[f"{p}{intern}.lora_{ab}.weight"] = mods[llama][ab].contiguous()
                targets.add(intern.rsplit(".", 1)[-1])
    out.mkdir(parents=True, exist_ok=True)
    new_cfg = dict(acfg)
    new_cfg["target_modules"] = sorted(targets)
    new_cfg["base_model_name_or_path"] = str(base)
    if qkv_rank and qkv_rank != r:
        grow = qkv_rank / r
        new_cfg["rank_pattern"] = {"wqkv": qkv_rank}
        new_cfg["alpha_pattern"] = {"wqkv": alpha * (grow ** 0.5 if rslora else grow)}
    save_file(out_state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(new_cfg, indent=2) + "\n")
    return out
