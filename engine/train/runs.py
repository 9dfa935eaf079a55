"""Run directories: what a training process writes and everyone else reads.

    RUN/config.yaml        the resolved recipe (absolute paths)
    RUN/status.json        pid, state, phase (setup, compiling), step, total_steps, eta_s, error
                           (rewritten atomically)
    RUN/metrics.jsonl      one line per logged optimizer step
    RUN/evals.jsonl        evaluation answers (step, prompt, answer)
    RUN/train.log          the human-readable log
    RUN/console.log        a detached run's stdout and stderr (warnings, tracebacks)
    RUN/checkpoint-N/      complete checkpoints (written as .checkpoint-N.tmp, then renamed)

Torch-free: the TUI and ``tunedeck runs`` use it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.core.errors import UserError
from engine.core.files import atomic_write_text

STATES = ("starting", "running", "finished", "failed", "stopped")
CHECKPOINT_PREFIX = "checkpoint-"


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def checkpoint_step(path: Path) -> int | None:
    name = path.name
    if not name.startswith(CHECKPOINT_PREFIX):
        return None
    tail = name[len(CHECKPOINT_PREFIX):]
    return int(tail) if tail.isdigit() else None


def is_complete_checkpoint(path: Path) -> bool:
    return path.is_dir() and checkpoint_step(path) is not None and (path / "trainer_state.json").is_file()


@dataclass
class RunDirectory:
    path: Path

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    # -- files
    @property
    def status_path(self) -> Path:
        return self.path / "status.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def evals_path(self) -> Path:
        return self.path / "evals.jsonl"

    @property
    def log_path(self) -> Path:
        return self.path / "train.log"

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    def exists(self) -> bool:
        return self.status_path.is_file() or self.config_path.is_file()

    # -- reading
    def status(self) -> dict[str, Any]:
        try:
            st = json.loads(self.status_path.read_text())
        except (OSError, ValueError):
            return {"state": "unknown"}
        if st.get("state") == "starting" and not st.get("pid"):
            return st        # the launcher has not written the pid yet
        elsewhere = st.get("host") not in (None, socket.gethostname())     # rank 0 of a multi-node run
        if st.get("state") in ("running", "starting") and not elsewhere and not pid_alive(st.get("pid")):
            st["state"] = "failed"
            st.setdefault("error", None)
            st["error"] = st["error"] or "the training process died without a word (killed?)"
        return st

    def write_status(self, **fields: Any) -> dict[str, Any]:
        try:
            st = json.loads(self.status_path.read_text())
        except (OSError, ValueError):
            st = {}
        st.update(fields)
        st["updated"] = time.time()
        atomic_write_text(self.status_path, json.dumps(st, ensure_ascii=False, indent=1))
        return st

    def metrics(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.metrics_path)

    def evals(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.evals_path)

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest step first."""
        if not self.path.is_dir():
            return []
        cps = [p for p in self.path.iterdir() if is_complete_checkpoint(p)]
        return sorted(cps, key=lambda p: checkpoint_step(p) or 0)

    def checkpoints_after(self, ckpt: Path) -> list[Path]:
        """Complete checkpoints of later steps than ``ckpt`` (what resuming from it would replace)."""
        step = checkpoint_step(ckpt) or 0
        return [c for c in self.checkpoints() if (checkpoint_step(c) or 0) > step]

    def latest_checkpoint(self) -> Path | None:
        cps = self.checkpoints()
        return cps[-1] if cps else None

    def summary(self, status: dict[str, Any] | None = None, with_checkpoint: bool = True) -> dict[str, Any]:
        """One row of `tunedeck runs`; ``with_checkpoint=False`` skips the directory scan (the TUI's tick)."""
        st = status if status is not None else self.status()
        latest = self.latest_checkpoint() if with_checkpoint else None
        return {"run": str(self.path), "name": self.path.name, "state": st.get("state", "unknown"),
                "step": st.get("step", 0), "total_steps": st.get("total_steps"), "eta_s": st.get("eta_s"),
                "loss": st.get("loss"), "error": st.get("error"), "pid": st.get("pid"),
                "config": st.get("config_name"),
                "phase": st.get("phase") if st.get("state") in ("starting", "running") else None,
                "latest_checkpoint": str(latest) if latest else None}

    # -- control
    def request_stop(self, wait_s: float = 60.0) -> dict[str, Any]:
        """Ask a running training to save a checkpoint and stop (SIGTERM); wait for it."""
        st = self.status()
        if st.get("state") not in ("running", "starting"):
            raise UserError(f"{self.path}: not running (state {st.get('state')})")
        from engine.train.runlock import RunLock

        holder = RunLock(self.path).holder()      # the live trainer, whatever status.json last said
        pid = holder if holder and holder > 0 else int(st["pid"])
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            raise UserError(f"{self.path}: process {pid} is gone") from None
        deadline = time.time() + wait_s
        while time.time() < deadline:
            st = self.status()
            if st.get("state") not in ("running", "starting"):
                return st
            time.sleep(0.2)
        return self.status()


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written right now
            continue
    return out


def find_runs(root: str | Path = "work_dirs") -> list[RunDirectory]:
    """Run directories under ``root`` (any depth up to 3), newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = {p.parent.resolve() for pat in ("status.json", "*/status.json", "*/*/status.json") for p in root.glob(pat)}
    runs = [RunDirectory(p) for p in found]
    return sorted(runs, key=lambda r: r.status_path.stat().st_mtime, reverse=True)


def resolve_run(ref: str | Path, root: str | Path = "work_dirs") -> RunDirectory:
    p = Path(ref)
    if (p / "status.json").is_file():
        return RunDirectory(p)
    for r in find_runs(root):
        if r.path.name == str(ref):
            return r
    raise UserError(f"{ref}: no run directory (looked for {p / 'status.json'} and runs named so under {root})")


def format_loss(loss: Any) -> str:
    return f"{loss:.4f}" if isinstance(loss, (int, float)) else "-"


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    h, m = divmod(s // 60, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s % 60:02d}s"
