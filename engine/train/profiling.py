"""TUNEDECK_PROFILE_STEP=N: one optimizer step under torch.profiler, its summary written to
profile/step<N>_rank<R>.txt in the run directory (GPU busy time, operations by device and CPU time)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from engine.core.errors import UserError

log = logging.getLogger("tunedeck.train")


def profile_step() -> int:
    """TUNEDECK_PROFILE_STEP=N: run optimizer step N under torch.profiler (0 or unset: none)."""
    raw = os.environ.get("TUNEDECK_PROFILE_STEP", "").strip()
    try:
        step = int(raw) if raw else 0
    except ValueError:
        step = -1
    if step < 0:
        raise UserError(f"TUNEDECK_PROFILE_STEP: {raw!r} is not a step number (1, 2, ...; 0 for none)")
    return step


def busy_ms(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end] intervals given in microseconds, in milliseconds."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total / 1e3


def profiled(step_fn: Callable[[], Any], device: torch.device, out_dir: Path, step: int, rank: int, world: int) -> Any:
    """``step_fn()`` under the profiler; its summary goes to out_dir/step<N>_rank<R>.txt."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        out = step_fn()
        if cuda:
            torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    try:
        _write(prof, wall, cuda, out_dir / f"step{step}_rank{rank}.txt", step, rank, world)
    except Exception as e:       # the profile is a diagnostic: never the end of a run
        log.warning("profile: could not be written (%s)", e)
    return out


def _write(prof: Any, wall: float, cuda: bool, path: Path, step: int, rank: int, world: int) -> None:
    ka = prof.key_averages()
    head = f"step {step} on rank {rank} of {world}: {wall * 1e3:.1f} ms under the profiler"
    if cuda:
        busy = busy_ms([(e.time_range.start, e.time_range.end) for e in prof.events()
                        if e.device_type == torch.autograd.DeviceType.CUDA])
        head += f"; GPU busy {busy:.1f} ms ({100 * busy / max(wall * 1e3, 1e-9):.0f}%)"
    sort = "device_time_total" if cuda else "cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head + "\n\n" + ka.table(sort_by=sort, row_limit=40) + "\n"
                    + ka.table(sort_by="self_cpu_time_total", row_limit=25) + "\n", encoding="utf-8")
    log.info("profile: %s (%s)", head, path)
