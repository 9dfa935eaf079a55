"""Which decoder layers recompute their activations in backward (gradient checkpointing) and which
keep them: the same math either way; a layer that keeps them skips a second forward (about a
quarter of a training step's compute) and holds its activations until its backward.

``model.checkpoint_layers: auto`` keeps them in as many layers as the GPU's free memory allows with
room to spare, from an estimate of what one layer keeps for one micro-batch; ``all`` recomputes in
every layer (the least memory); a number N recomputes in the first N layers and keeps the rest.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger("tunedeck")

HEADROOM_BYTES = 4 << 30          # what auto leaves free on top of the estimate's own margin
SAFETY = 2.0                      # the estimate is multiplied by this before it is trusted


def layer_activation_bytes(config: Any, tokens: int, *, quantized: bool = True, full: bool = False) -> int:
    """What one decoder layer of a Llama-shaped model keeps for backward when it does not recompute,
    for ``tokens`` tokens of one micro-batch: the inputs of its norms, projections and LoRA adapters
    (with their dropout copies), attention's output and statistics, and the MLP's gate, up, activation
    and product. Counted in 16-bit values a token, measured on an H200 (bench/memory_estimate.py):
    LoRA on a 16-bit model keeps about 4 hidden-sized and 6 intermediate-sized vectors; on a 4-bit one
    (its norms and residual stream in fp32) 14 and 6; a full fine-tune (no adapters) 4 and 5, plus the
    16-bit copies autocast makes of the layer's fp32 weights."""
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    inter = int(getattr(config, "intermediate_size", 0) or 4 * hidden)
    if full:
        return tokens * (4 * hidden + 5 * inter) * 2
    return tokens * ((14 if quantized else 4) * hidden + 6 * inter) * 2


def plan_recompute(setting: str | int, n_layers: int, per_layer_bytes: int, free_bytes: int | None) -> int:
    """How many of ``n_layers`` layers recompute (the first ones; the rest keep their activations)."""
    if isinstance(setting, int) or (isinstance(setting, str) and setting.isdigit()):
        return max(0, min(int(setting), n_layers))
    if setting == "all" or free_bytes is None:          # no GPU to measure: every layer, as always
        return n_layers
    budget = free_bytes - HEADROOM_BYTES
    if per_layer_bytes <= 0 or budget <= 0:
        return n_layers
    keep = min(n_layers, int(budget // (per_layer_bytes * SAFETY)))
    return n_layers - keep


def apply_recompute(layers: list[torch.nn.Module], recompute: int) -> None:
    """The first ``recompute`` layers recompute; the others keep their activations (each layer's own
    ``gradient_checkpointing`` switch, which transformers and the compiled layers both read)."""
    for i, layer in enumerate(layers):
        if hasattr(layer, "gradient_checkpointing"):
            layer.gradient_checkpointing = i < recompute


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kinds = set(getattr(base, "_no_split_modules", None) or [])
    return [m for m in base.modules() if type(m).__name__ in kinds]
