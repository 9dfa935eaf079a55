"""Fault injection for the tests' stop and kill -9 trials, through environment variables; a no-op
unless a test sets them."""

from __future__ import annotations

import os
import time


def pause(name: str, stage: str | None = None, stage_var: str = "") -> None:
    """Wait as many seconds as $``name`` says (in short sleeps a signal can interrupt); with ``stage``,
    only when $``stage_var`` names it (its default is "files")."""
    delay = float(os.environ.get(name, "0") or 0)
    if not delay or (stage is not None and os.environ.get(stage_var, "files") != stage):
        return
    end = time.time() + delay
    while time.time() < end:
        time.sleep(0.05)
