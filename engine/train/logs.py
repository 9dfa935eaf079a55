"""Where a run's log lines go: train.log always (tracebacks included), the console one line per event;
ranks other than 0 stay quiet."""

from __future__ import annotations

import logging
import sys

from engine.train.runs import RunDirectory


class _NoTraceback(logging.Formatter):
    """The console gets one line per event; tracebacks go to train.log only."""

    def format(self, record: logging.LogRecord) -> str:
        record = logging.makeLogRecord(record.__dict__)
        record.exc_info = record.exc_text = record.stack_info = None
        return super().format(record)


def setup_logging(run: RunDirectory, console: bool, rank: int = 0) -> None:
    root = logging.getLogger("tunedeck")
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
    if rank != 0:
        root.addHandler(logging.NullHandler())
        return
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    fh = logging.FileHandler(run.log_path, encoding="utf-8")
    fh.setFormatter(fmt)
    root.addHandler(fh)
    if console:
        sh = logging.StreamHandler(sys.stdout)
        sh.setFormatter(_NoTraceback("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        root.addHandler(sh)
    root.propagate = False
