"""Python's cyclic garbage collector during a training loop.

Left to itself it runs whenever enough container objects were allocated: a young collection every
700, dozens of them inside each step (3.5 ms of an H200 step at 8 rows), and now and then a full one
that walks every object the process holds -- with torch, transformers, peft and bitsandbytes
imported about 456,000, 0.43 s on a 2-core box -- in the middle of a step. Under data parallelism a
pause on one rank stalls the others at the next collective, so it costs every rank. StepCollector
freezes what setup built (and, after the first step, what compiling it built) out of the collector's
sight, keeps the automatic collector off inside steps, and collects between steps, at the same step
on every rank: the young generations after each step, a full pass over what the loop itself keeps
every `full_every` steps. Nothing is leaked that the automatic collector would have freed, save
cycles among objects alive at a freeze that die later."""

from __future__ import annotations

import gc
import os
from typing import Any


class StepCollector:
    def __init__(self, full_every: int = 50, active: bool | None = None):
        self.full_every = full_every
        # inactive: Python's own schedule (to measure what this saves); TUNEDECK_PYTHON_GC=1 asks for it
        self.active = (os.environ.get("TUNEDECK_PYTHON_GC", "") not in ("1", "true", "yes")
                       if active is None else active)
        self.steps = 0
        self._was_enabled = True

    def __enter__(self) -> StepCollector:
        if self.active:
            self._was_enabled = gc.isenabled()
            gc.collect()
            gc.freeze()
            gc.disable()
        return self

    def step(self) -> None:
        """After each optimizer step (inside its timing: the pause is the step's cost)."""
        if not self.active:
            return
        self.steps += 1
        if self.steps == 1:
            gc.collect()           # the first step compiled the layers: keep those objects out of sight too
            gc.freeze()
        elif self.steps % self.full_every == 0:
            gc.collect()
        else:
            gc.collect(1)

    def __exit__(self, *exc: Any) -> None:
        if self.active:
            gc.unfreeze()
            if self._was_enabled:
                gc.enable()
