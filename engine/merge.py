"""Merge a LoRA checkpoint into its base model (``tunedeck merge``)."""

from __future__ import annotations

import shutil
from pathlib import Path

from .checkpoint import resolve_checkpoint
from .errors import UserError
from .modeling import check_model_dir, read_adapter_meta


def merge(base: str, adapter: str, out: str, *, device: str = "cpu", max_shard_size: str = "2GB",
          trust_remote_code: bool | None = None, progress=print) -> Path:
    """Write base+adapter as one model (safetensors shards + tokenizer) that AutoModelForCausalLM loads.
    The output is written beside OUT and renamed into place, and an existing OUT is never touched."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_path = Path(out)
    if out_path.exists() and (not out_path.is_dir() or any(out_path.iterdir())):
        raise UserError(f"{out_path}: already exists and is not empty; choose another OUT")
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device: {device!r} is not allowed: use cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device: 'cuda' but no CUDA GPU is visible")
    check_model_dir(base)
    ckpt = resolve_checkpoint(adapter)
    if not (ckpt / "adapter_config.json").is_file():
        raise UserError(f"{ckpt}: not a LoRA adapter (no adapter_config.json); a full fine-tune needs no merge")
    meta = read_adapter_meta(ckpt)
    trust = meta.get("trust_remote_code", False) if trust_remote_code is None else trust_remote_code
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else "auto"
    progress(f"loading {base} on {device}")
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, trust_remote_code=trust,
                                                     device_map={"": device})
    except (OSError, ValueError) as e:
        raise UserError(f"{base}: cannot load the base model ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    progress(f"applying {ckpt}")
    try:
        model = PeftModel.from_pretrained(model, str(ckpt))
    except Exception as e:
        raise UserError(f"{ckpt}: adapter does not fit {base} ({type(e).__name__})") from None
    model = model.merge_and_unload()
    tmp = out_path.with_name(f".{out_path.name}.merging")
    if tmp.exists():
        shutil.rmtree(tmp)
    progress(f"writing {out_path} (shards of at most {max_shard_size})")
    model.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=max_shard_size)
    tok_src = ckpt if (ckpt / "tokenizer_config.json").is_file() else base
    AutoTokenizer.from_pretrained(str(tok_src), trust_remote_code=trust).save_pretrained(str(tmp))
    if out_path.exists():
        out_path.rmdir()   # empty, checked above
    tmp.rename(out_path)
    return out_path
