"""``tunedeck export-adapter``: a LoRA adapter trained on InternLM2's converted layout, written under
InternLM2's own module names, for peft on the model's original code."""

from __future__ import annotations

from pathlib import Path

from engine.core.errors import UserError
from engine.export.merge import base_model_of
from engine.model.internlm2 import export_adapter, is_internlm2
from engine.train.checkpoint import resolve_checkpoint


def export_internlm2_adapter(adapter: str, out: str, base: str | None = None) -> Path:
    ckpt = resolve_checkpoint(adapter)
    base = base_model_of(ckpt, base)
    if not is_internlm2(base):
        raise UserError(f"--base: {base} is not an InternLM2 checkpoint (config.json model_type internlm2)")
    target = Path(out)
    if target.exists() and any(target.iterdir()):
        raise UserError(f"{target}: already exists and is not empty; choose another OUT")
    return export_adapter(ckpt, target, Path(base))
