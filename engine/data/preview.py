"""What a tokenized sample looks like: its text with the untrained spans marked, and a length
histogram (``tunedeck data check``, the first sample in train.log)."""

from __future__ import annotations

from typing import Any

from engine.data.templates import IGNORE_INDEX


def masked_segments(tokenizer: Any, ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """The sample as (text, masked) runs: masked = not trained."""
    out: list[tuple[str, bool]] = []
    run: list[int] = []
    masked: bool | None = None
    for t, lab in zip(ids, labels):
        m = lab == IGNORE_INDEX
        if masked is not None and m != masked:
            out.append((tokenizer.decode(run, skip_special_tokens=False), masked))
            run = []
        run.append(t)
        masked = m
    if run:
        out.append((tokenizer.decode(run, skip_special_tokens=False), bool(masked)))
    return out


def render_masked(tokenizer: Any, ids: list[int], labels: list[int]) -> str:
    """The sample as text with the masked (untrained) spans wrapped in ⟦ ⟧."""
    return "".join(f"⟦{t}⟧" if m else t for t, m in masked_segments(tokenizer, ids, labels))


def length_histogram(lengths: list[int], buckets: int = 16) -> list[tuple[int, int, int]]:
    """(low, high, count) buckets of token lengths."""
    if not lengths:
        return []
    lo, hi = min(lengths), max(lengths)
    width = max(1, -(-(hi - lo + 1) // buckets))
    counts = [0] * buckets
    for n in lengths:
        counts[min(buckets - 1, (n - lo) // width)] += 1
    return [(lo + i * width, lo + (i + 1) * width - 1, c) for i, c in enumerate(counts) if lo + i * width <= hi]
