"""``tunedeck export --format gguf|ollama``: a merged model as one GGUF file for llama.cpp and Ollama.

The file is written with the ``gguf`` package (llama.cpp's own writer) for the Llama architecture, which
InternLM2 is once its fused wqkv is split (engine/model/internlm2.py):

* tensors under llama.cpp's names (gguf's own name map), the query and key rows reordered from
  transformers' rotate-half RoPE to GGML's interleaved pairs, 1-D norms in f32, the rest in f16 or
  Q8_0 (rows whose width is not a multiple of 32 stay f16);
* the vocabulary from the model's SentencePiece ``tokenizer.model`` where it has one (InternLM2,
  Llama 2) with tokenizer_config.json's added tokens at their ids (special ones as control tokens),
  else from a byte-level BPE ``tokenizer.json``; padded with unused ``[PADn]`` tokens to the embedding's
  rows, since llama.cpp refuses a token list of another length;
* bos/eos/unk/pad ids, the end-of-turn token, and the chat template the run was trained with.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.core.errors import UserError
from engine.data.templates import TEMPLATES, as_jinja, as_ollama, resolve_template_name, stop_token_ids, stop_words
from engine.export.merge import base_model_of, load_merged
from engine.model.loading import load_tokenizer

QUANTS = ("f16", "q8_0")
_BLOCK = 32                                   # Q8_0's block width


@dataclass
class Vocab:
    model: str                                # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    tokens: list[str]
    scores: list[float]
    types: list[int]
    merges: list[str] = field(default_factory=list)
    add_space_prefix: bool = False
    pre: str = "default"


# ---------------------------------------------------------------------------- tensors
def interleave_rope_rows(w: Any, heads: int) -> Any:
    """Rows of a query/key projection reordered from rotate-half RoPE (dimension i pairs with i + d/2)
    to GGML's interleaved RoPE (2i pairs with 2i+1), head by head."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(state: dict[str, Any], config: Any) -> dict[str, Any]:
    """llama.cpp's tensor names -> float32 numpy arrays."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    out: dict[str, Any] = {}
    for key, t in state.items():
        if "rotary_emb" in key:
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"GGUF export: no llama.cpp tensor for {key!r}")
        a = t.detach().float().cpu().numpy()
        if key.endswith("q_proj.weight"):
            a = interleave_rope_rows(a, heads)
        elif key.endswith("k_proj.weight"):
            a = interleave_rope_rows(a, kv_heads)
        out[name] = a
    if getattr(config, "tie_word_embeddings", False):
        out.pop("output.weight", None)          # llama.cpp reuses token_embd
    return out


def encode_tensor(name: str, a: Any, quant: str) -> tuple[Any, Any]:
    """(data, raw ggml type or None) as the file stores the tensor."""
    import gguf
    import numpy as np

    if a.ndim == 1:
        return a.astype(np.float32), None
    if quant == "q8_0" and a.shape[-1] % _BLOCK == 0:
        return gguf.quants.quantize(a.astype(np.float32), gguf.GGMLQuantizationType.Q8_0), \
            gguf.GGMLQuantizationType.Q8_0
    return a.astype(np.float16), None


# ---------------------------------------------------------------------------- vocabulary
def _token_type(kind: str) -> int:
    import gguf

    return int(getattr(gguf.TokenType, kind))


def _added_tokens(folder: Path) -> dict[int, tuple[str, bool]]:
    try:
        cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {int(i): (d["content"], bool(d.get("special"))) for i, d in (cfg.get("added_tokens_decoder") or {}).items()}


def spm_vocab(folder: Path, rows: int) -> Vocab:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        proto.ParseFromString((folder / "tokenizer.model").read_bytes())
    except Exception as e:
        raise UserError(f"{folder / 'tokenizer.model'}: not a SentencePiece model ({type(e).__name__})") from None
    kinds = {pb.ModelProto.SentencePiece.NORMAL: "NORMAL", pb.ModelProto.SentencePiece.UNKNOWN: "UNKNOWN",
             pb.ModelProto.SentencePiece.CONTROL: "CONTROL", pb.ModelProto.SentencePiece.USER_DEFINED:
             "USER_DEFINED", pb.ModelProto.SentencePiece.UNUSED: "UNUSED", pb.ModelProto.SentencePiece.BYTE: "BYTE"}
    tokens, scores, types = [], [], []
    for p in proto.pieces:
        text, kind = p.piece, kinds.get(p.type, "NORMAL")
        if text.startswith("[UNUSED"):                 # InternLM2's reserved slots
            kind = "UNUSED"
        if "\x00" in text:                             # llama.cpp reads token texts as C strings
            text, kind = f"[NUL{len(tokens)}]", "UNUSED"
        tokens.append(text)
        scores.append(p.score)
        types.append(_token_type(kind))
    for i, (content, special) in _added_tokens(folder).items():
        if i < len(tokens):
            tokens[i] = content
            types[i] = _token_type("CONTROL" if special else "USER_DEFINED")
    return _padded(Vocab("llama", tokens, scores, types, add_space_prefix=proto.normalizer_spec.add_dummy_prefix),
                   rows, folder / "tokenizer.model")


def bpe_vocab(folder: Path, rows: int) -> Vocab:
    path = folder / "tokenizer.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None
    model = data.get("model") or {}
    pre = json.dumps(data.get("pre_tokenizer") or {})
    if model.get("type") != "BPE" or "ByteLevel" not in pre:
        raise UserError(f"{path}: GGUF export knows SentencePiece (tokenizer.model) and byte-level BPE "
                        f"tokenizers; this one is {model.get('type')!r}")
    by_id = {i: t for t, i in model["vocab"].items()}
    kinds = dict.fromkeys(by_id, "NORMAL")
    for a in data.get("added_tokens") or []:
        by_id[a["id"]] = a["content"]
        kinds[a["id"]] = "CONTROL" if a.get("special") else "USER_DEFINED"
    n = max(by_id) + 1
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n)]
    types = [_token_type(kinds.get(i, "UNUSED")) for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return _padded(Vocab("gpt2", tokens, [0.0] * n, types, merges=merges, pre="gpt-2"), rows, path)


def _padded(v: Vocab, rows: int, source: Path) -> Vocab:
    if len(v.tokens) > rows:
        raise UserError(f"{source}: {len(v.tokens)} tokens but the embedding has {rows} rows; the added tokens "
                        "past its end have no weights (resize the embedding and train them first)")
    for i in range(len(v.tokens), rows):
        v.tokens.append(f"[PAD{i}]")
        v.scores.append(-1000.0)
        v.types.append(_token_type("UNUSED"))
    return v


def read_vocab(folders: list[Path], rows: int) -> Vocab:
    """The first folder with a tokenizer.model gives a SentencePiece vocabulary, else the first with a
    tokenizer.json a BPE one."""
    for f in folders:
        if (f / "tokenizer.model").is_file():
            return spm_vocab(f, rows)
    for f in folders:
        if (f / "tokenizer.json").is_file():
            return bpe_vocab(f, rows)
    raise UserError(f"{folders[0]}: no tokenizer.model or tokenizer.json to build the GGUF vocabulary from")


# ---------------------------------------------------------------------------- the whole file
@dataclass
class Exported:
    path: Path
    template: str                      # the named template or "hf"
    system: str
    stop: list[str]
    eos: str
    context: int


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)


def _rope_scaling(config: Any) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type") or params.get("type")
    return {"type": kind, "factor": params.get("factor")} if kind not in (None, "default") else {}


def export_gguf(source: str, out: str | Path, *, quant: str = "f16", base: str | None = None,
                force: bool = False, progress=print) -> Exported:
    import gguf

    if quant not in QUANTS:
        raise UserError(f"--quant: {quant!r} is not allowed: use {', '.join(QUANTS)}")
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out}: already exists; choose another OUT or pass --force")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: no such folder for OUT")
    model, ckpt, meta, base_dir = _merged(source, base, progress)
    config = model.config
    if config.model_type != "llama":
        raise UserError(f"GGUF export writes the Llama architecture (InternLM2 included); {source} is "
                        f"{config.model_type!r}")
    tok = load_tokenizer(str(ckpt) if (ckpt / "tokenizer_config.json").is_file() else str(base_dir))
    rows = model.get_input_embeddings().weight.shape[0]
    vocab = read_vocab([p for p in (ckpt, base_dir) if p is not None], rows)
    template = resolve_template_name(meta.get("prompt_template") or "auto", tok)
    jinja = tok.chat_template if template == "hf" else as_jinja(template)
    stops = stop_words(tok, template)
    eot = next((i for i in stop_token_ids(tok, template) if i != tok.eos_token_id), None)
    context = int(getattr(config, "max_position_embeddings", 2048))

    tmp = out.with_name(f".{out.name}.writing")
    w = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_name(Path(meta.get("config_name") or ckpt.name).name)
    w.add_context_length(context)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(_rope_theta(config))
    scaling = _rope_scaling(config)
    if scaling.get("type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    elif scaling:
        progress(f"note: rope scaling {scaling['type']!r} has no GGUF equivalent; the file uses plain RoPE "
                 f"(the same up to the trained length)")
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_vocab_size(rows)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if quant == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    w.add_tokenizer_model(vocab.model)
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    if vocab.merges:
        w.add_token_merges(vocab.merges)
    if vocab.model == "llama":
        w.add_add_space_prefix(vocab.add_space_prefix)
    for kind in ("bos", "eos", "unk", "pad"):
        i = getattr(tok, f"{kind}_token_id")
        if i is not None:
            getattr(w, f"add_{kind}_token_id")(int(i))
    if eot is not None:
        w.add_eot_token_id(int(eot))
    w.add_add_bos_token(tok.bos_token_id is not None and tok("x")["input_ids"][:1] == [tok.bos_token_id])
    w.add_add_eos_token(False)
    if jinja:
        w.add_chat_template(jinja)

    progress(f"writing {out} ({quant})")
    for name, a in _gguf_tensors(model.state_dict(), config).items():
        data, raw = encode_tensor(name, a, quant)
        w.add_tensor(name, data, raw_dtype=raw)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        tmp.replace(out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{out}: cannot write ({e.strerror or e})") from None
    return Exported(out, template, meta.get("system") or "", stops, tok.eos_token or "", context)


def _merged(source: str, base: str | None, progress) -> tuple[Any, Path, dict[str, Any], Path | None]:
    from engine.train.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(source)
    if (ckpt / "adapter_config.json").is_file():
        base = base_model_of(ckpt, base)
    model, ckpt, meta = load_merged(base or str(ckpt), str(ckpt), progress=progress)
    return model, ckpt, meta, Path(base) if base and Path(base).is_dir() else None


# ---------------------------------------------------------------------------- Ollama
def modelfile(gguf_name: str, ex: Exported, params: Any) -> str:
    """An Ollama Modelfile beside the GGUF: its TEMPLATE is the trained template, SYSTEM the trained
    system prompt, a stop parameter per stop word, and ``params`` (serve's GenerationParams) as defaults."""
    if ex.template in TEMPLATES:
        template = as_ollama(ex.template, ex.eos)
    else:
        raise UserError("--format ollama: the run was trained with the tokenizer's own Jinja template, which "
                        "Ollama cannot read; train with a named template (e.g. internlm2_chat) or write the "
                        "Modelfile's TEMPLATE by hand")
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    if ex.system:
        if '"""' in ex.system:
            raise UserError('data.system: contains """, which a Modelfile cannot quote')
        lines.append(f'SYSTEM """{ex.system}"""')
    for s in ex.stop:
        lines.append(f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}")
    lines += [f"PARAMETER temperature {params.temperature}", f"PARAMETER top_p {params.top_p}",
              f"PARAMETER repeat_penalty {params.repetition_penalty}", f"PARAMETER num_ctx {min(ex.context, 4096)}"]
    return "\n".join(lines) + "\n"


def export_ollama(source: str, out: str | Path, params: Any, *, quant: str = "f16", base: str | None = None,
                  force: bool = False, progress=print) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not force)):
        raise UserError(f"{out}: already exists and is not empty; choose another OUT or pass --force")
    out.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", out.resolve().name) or "model"
    ex = export_gguf(source, out / f"{name}-{quant}.gguf", quant=quant, base=base, force=True, progress=progress)
    try:
        text = modelfile(ex.path.name, ex, params)
    except UserError:
        ex.path.unlink(missing_ok=True)
        raise
    (out / "Modelfile").write_text(text, encoding="utf-8")
    return out
