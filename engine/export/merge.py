"""Merge a LoRA checkpoint into its base model (``tunedeck merge``)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from engine.core.errors import UserError
from engine.model.internlm2 import is_internlm2, write_internlm2
from engine.model.loading import check_model_dir, load_error, quiet_progress, read_adapter_meta, resolve_model
from engine.train.checkpoint import resolve_checkpoint

MERGE_FORMATS = ("auto", "internlm2", "llama")


def base_model_of(ckpt: Path, base: str | None = None) -> str:
    """The base an adapter checkpoint belongs to: ``base`` when given, else the one its tunedeck.json names."""
    base = base or read_adapter_meta(ckpt).get("base_model")
    if not base:
        raise UserError(f"{ckpt}: its tunedeck.json names no base model; pass --base")
    return base


def load_merged(base: str, adapter: str, *, device: str = "cpu", trust_remote_code: bool | None = None,
                progress=print) -> tuple[Any, Path, dict[str, Any]]:
    """base+adapter merged in memory (transformers' layout: an InternLM2 base comes as Llama), with the
    checkpoint it came from and that checkpoint's tunedeck.json. A full checkpoint or a model folder is
    loaded as it is (``base`` unused)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if device not in ("cpu", "cuda"):
        raise UserError(f"--device: {device!r} is not allowed: use cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device: 'cuda' but no CUDA GPU is visible")
    ckpt = resolve_checkpoint(adapter)
    meta = read_adapter_meta(ckpt)
    is_adapter = (ckpt / "adapter_config.json").is_file()
    source = base if is_adapter else str(ckpt)
    check_model_dir(source)
    trust = meta.get("trust_remote_code", False) if trust_remote_code is None else trust_remote_code
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else "auto"
    progress(f"loading {source} on {device}")
    quiet_progress()
    native, trust = resolve_model(source, trust)
    try:
        model = AutoModelForCausalLM.from_pretrained(native, dtype=dtype, trust_remote_code=trust,
                                                     device_map={"": device})
    except Exception as e:
        raise UserError(f"{source}: cannot load the model ({load_error(e)})") from None
    if is_adapter:
        progress(f"applying {ckpt}")
        try:
            model = PeftModel.from_pretrained(model, str(ckpt))
        except Exception as e:
            raise UserError(f"{ckpt}: adapter does not fit {base} ({type(e).__name__})") from None
        model = model.merge_and_unload()
    return model.eval(), ckpt, meta


def merge(base: str, adapter: str, out: str, *, device: str = "cpu", max_shard_size: str = "2GB",
          trust_remote_code: bool | None = None, fmt: str = "auto", progress=print) -> Path:
    """Write base+adapter as one model (safetensors shards + tokenizer) that AutoModelForCausalLM loads.
    The output is written beside OUT and renamed into place, and an existing OUT is never touched.

    An InternLM2 base is written in InternLM2's own format by default (``fmt`` auto or internlm2:
    wqkv fused again, the base's config, remote code and tokenizer files carried over unchanged, so
    LMDeploy, XTuner and InternLM's code load it); ``fmt="llama"`` writes transformers' Llama layout."""
    from transformers import AutoTokenizer

    out_path = Path(out)
    if out_path.exists() and (not out_path.is_dir() or any(out_path.iterdir())):
        raise UserError(f"{out_path}: already exists and is not empty; choose another OUT")
    if fmt not in MERGE_FORMATS:
        raise UserError(f"--format: {fmt!r} is not allowed: use {', '.join(MERGE_FORMATS)}")
    check_model_dir(base)
    internlm2 = is_internlm2(base)
    if fmt == "internlm2" and not internlm2:
        raise UserError(f"--format: 'internlm2' but {base} is not an InternLM2 checkpoint")
    ckpt = resolve_checkpoint(adapter)
    if not (ckpt / "adapter_config.json").is_file():
        raise UserError(f"{ckpt}: not a LoRA adapter (no adapter_config.json); a full fine-tune needs no merge")
    model, ckpt, meta = load_merged(base, adapter, device=device, trust_remote_code=trust_remote_code,
                                    progress=progress)
    trust = meta.get("trust_remote_code", False) if trust_remote_code is None else trust_remote_code
    native, trust = resolve_model(base, trust)
    tmp = out_path.with_name(f".{out_path.name}.merging")
    if tmp.exists():
        shutil.rmtree(tmp)
    if internlm2 and fmt != "llama":
        progress(f"writing {out_path} in InternLM2's format (its own code and tokenizer files beside it)")
        write_internlm2(model.state_dict(), Path(base), tmp, max_shard_size=max_shard_size)
    else:
        progress(f"writing {out_path} (shards of at most {max_shard_size})")
        model.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=max_shard_size)
        tok_src = ckpt if (ckpt / "tokenizer_config.json").is_file() else native
        AutoTokenizer.from_pretrained(str(tok_src), trust_remote_code=trust).save_pretrained(str(tmp))
    if out_path.exists():
        out_path.rmdir()   # empty, checked above
    tmp.rename(out_path)
    return out_path
