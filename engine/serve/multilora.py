"""Many LoRA adapters over one copy of the base weights, chosen per batch row.

Every targeted linear layer gets stacked adapter weights ``A[slot]`` (in × R) and ``B[slot]``
(R × out, scaling folded in); slot 0 is all zeros, the base model. A row's output is
``base(x) + (x @ A[slot_of_row]) @ B[slot_of_row]``: two batched matmuls, no Python branching,
so a decode step can be compiled and captured in a CUDA graph. Adapters come from PEFT
checkpoints (``adapter_model.safetensors`` + ``adapter_config.json``); ranks may differ (padded
with zeros to the largest).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn


class MultiLoraLinear(nn.Module):
    def __init__(self, base: nn.Module, owner: MultiLora):
        super().__init__()
        self.base = base
        self.owner = owner.__dict__   # shared row→slot table without registering the owner as a child
        self.in_features = base.in_features
        self.out_features = base.out_features
        dev, dt = owner.device, owner.dtype
        self.register_buffer("A", torch.zeros(owner.slots, self.in_features, owner.rank, device=dev, dtype=dt),
                             persistent=False)
        self.register_buffer("B", torch.zeros(owner.slots, owner.rank, self.out_features, device=dev, dtype=dt),
                             persistent=False)

    @property
    def weight(self):   # code that inspects .weight (dtype checks, generation utils) sees the base's
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows = self.owner["row_slots"][: x.shape[0]]
        a = self.A.index_select(0, rows)                      # [B, in, R]
        b = self.B.index_select(0, rows)                      # [B, R, out]
        lead = x.shape
        h = x.reshape(lead[0], -1, lead[-1]).to(a.dtype)
        delta = torch.bmm(torch.bmm(h, a), b)
        return y + delta.reshape(*lead[:-1], self.out_features).to(y.dtype)


class MultiLora:
    """Adapter slots on a model; ``set_rows`` picks each batch row's adapter."""

    def __init__(self, model: nn.Module, *, slots: int = 4, rank: int = 8, max_batch: int = 64,
                 dtype: torch.dtype | None = None):
        self.model = model
        p = next(model.parameters())
        self.device = p.device
        self.dtype = dtype or (p.dtype if p.dtype.is_floating_point else torch.bfloat16)
        self.slots = slots
        self.rank = rank
        self.names: dict[str, int] = {}            # adapter name → slot (1..)
        self.layers: dict[str, MultiLoraLinear] = {}
        self.row_slots = torch.zeros(max_batch, dtype=torch.long, device=self.device)

    # -- structure
    def _inject(self, module_names: set[str]) -> None:
        for full, module in list(self.model.named_modules()):
            if full in self.layers or full.rsplit(".", 1)[-1] not in module_names:
                continue
            if isinstance(module, MultiLoraLinear) or not hasattr(module, "in_features"):
                continue
            parent_name, _, child = full.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            wrapped = MultiLoraLinear(module, self)
            setattr(parent, child, wrapped)
            self.layers[full] = wrapped

    def _grow(self, slots: int, rank: int) -> None:
        for layer in self.layers.values():
            a = torch.zeros(slots, layer.in_features, rank, device=self.device, dtype=self.dtype)
            b = torch.zeros(slots, rank, layer.out_features, device=self.device, dtype=self.dtype)
            a[: self.slots, :, : self.rank] = layer.A
            b[: self.slots, : self.rank, :] = layer.B
            layer.A, layer.B = a, b
        self.slots, self.rank = slots, rank

    # -- adapters
    def load(self, name: str, adapter_dir: str | Path) -> int:
        from safetensors.torch import load_file

        d = Path(adapter_dir)
        cfg = json.loads((d / "adapter_config.json").read_text())
        if cfg.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"{d}: {cfg.get('peft_type')} adapters are not supported (LoRA only)")
        r = int(cfg["r"])
        scale = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
        state = load_file(str(d / "adapter_model.safetensors"))
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in state.items():
            for part in ("lora_A", "lora_B"):
                marker = f".{part}."
                if marker in key:
                    module = key.split(marker)[0].removeprefix("base_model.model.")
                    pairs.setdefault(module, {})[part] = t
        if not pairs:
            raise ValueError(f"{d}: no LoRA weights in adapter_model.safetensors")
        self._inject({m.rsplit(".", 1)[-1] for m in pairs})
        unknown = [m for m in pairs if m not in self.layers]
        if unknown:
            raise ValueError(f"{d}: adapter targets {unknown[0]!r}, which this model does not have")
        slot = self.names.get(name) or self._free_slot()
        if r > self.rank:
            self._grow(self.slots, r)
        for module, layer in self.layers.items():
            layer.A[slot].zero_()
            layer.B[slot].zero_()
            if module in pairs:
                a, b = pairs[module]["lora_A"], pairs[module]["lora_B"]    # [r, in], [out, r]
                if a.shape != (r, layer.in_features) or b.shape != (layer.out_features, r):
                    raise ValueError(f"{d}: {module} has shapes {tuple(a.shape)}/{tuple(b.shape)}, the model "
                                     f"needs ({r}, {layer.in_features})/({layer.out_features}, {r})")
                layer.A[slot, :, :r] = a.t().to(self.device, self.dtype)
                layer.B[slot, :r, :] = (b.t() * scale).to(self.device, self.dtype)
        self.names[name] = slot
        return slot

    def _free_slot(self) -> int:
        used = set(self.names.values())
        for s in range(1, self.slots):
            if s not in used:
                return s
        self._grow(self.slots * 2, self.rank)
        return self._free_slot()

    def remove(self, name: str) -> None:
        slot = self.names.pop(name)
        for layer in self.layers.values():
            layer.A[slot].zero_()
            layer.B[slot].zero_()

    def set_rows(self, names: list[str | None]) -> None:
        """Row i uses adapter ``names[i]`` (None = the base)."""
        if len(names) > self.row_slots.numel():
            self.row_slots = torch.zeros(len(names), dtype=torch.long, device=self.device)
        slots = [self.names[n] if n else 0 for n in names]
        self.row_slots[: len(slots)].copy_(torch.tensor(slots, dtype=torch.long))
