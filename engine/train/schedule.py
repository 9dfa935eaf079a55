"""The learning-rate schedule: linear warmup, then cosine decay to zero (XTuner's LinearLR + CosineAnnealingLR)."""

from __future__ import annotations

import math


def warmup_cosine(total_steps: int, warmup_ratio: float, start_factor: float = 1e-5):
    warmup = int(round(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return start_factor + (1 - start_factor) * step / warmup
        span = max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span)))

    return factor
