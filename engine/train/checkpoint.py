"""Checkpoints that survive a kill at any moment.

A checkpoint is written into ``RUN/.checkpoint-N.tmp`` and renamed to
``RUN/checkpoint-N`` only once every file is on disk (``trainer_state.json``
last), so a reader never sees half of one. It holds the PEFT adapter (or the
full model) in safetensors, loadable by ``peft``/``transformers`` as is, the
tokenizer, and everything resume needs: optimizer, scheduler, loss scaler, RNG
states and the data position.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.core import faults
from engine.core.errors import UserError
from engine.train.runs import CHECKPOINT_PREFIX, RunDirectory, checkpoint_step, is_complete_checkpoint


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run: RunDirectory, step: int, *, model: Any, tokenizer: Any, trainer_state: dict,
                    meta: dict, optimizer: Any = None, scheduler: Any = None, scaler: Any = None,
                    extra_writer: Any = None, rank: int = 0) -> Path:
    """Write checkpoint-<step> atomically; returns its final path (on rank 0)."""
    final = run.path / f"{CHECKPOINT_PREFIX}{step}"
    tmp = run.path / f".{CHECKPOINT_PREFIX}{step}.tmp"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "tunedeck.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
    if extra_writer is not None:   # DeepSpeed's collective save: every rank takes part
        extra_writer(tmp)
    if rank != 0:
        return final
    _fault_pause("files")      # the kill -9 trials: the window a kill lands in
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    _fsync_tree(tmp)
    _fault_pause("rename")
    if final.exists():  # re-saving a step after resuming from an earlier checkpoint
        old = run.path / f".{CHECKPOINT_PREFIX}{step}.old"
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(run.path)
    return final


def rotate_checkpoints(run: RunDirectory, limit: int) -> list[Path]:
    """Keep the newest ``limit`` complete checkpoints (-1 keeps all); returns those removed."""
    if limit is None or limit < 0:
        return []
    cps = run.checkpoints()
    keep = max(limit, 1)  # the newest complete checkpoint is never deleted
    removed = cps[:-keep] if len(cps) > keep else []
    for p in removed:
        doomed = p.with_name(f".{p.name}.deleting")
        os.rename(p, doomed)       # atomic: it stops looking complete at once
        _fault_pause("rotate")
        shutil.rmtree(doomed, ignore_errors=True)
    return removed


def clean_partial(run: RunDirectory) -> list[Path]:
    """Remove leftovers of writes a kill interrupted."""
    removed = []
    if run.path.is_dir():
        for p in run.path.iterdir():
            if p.name.startswith(f".{CHECKPOINT_PREFIX}") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
            elif p.name.startswith(".status.json.") and p.name.endswith(".tmp") and p.is_file():
                p.unlink(missing_ok=True)          # a status write a kill interrupted
                removed.append(p)
    return removed


def resolve_checkpoint(ref: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its latest complete checkpoint)."""
    p = Path(ref)
    if is_complete_checkpoint(p):
        return p
    if p.is_dir() and checkpoint_step(p) is not None:
        raise UserError(f"{p}: incomplete checkpoint (no trainer_state.json; a write was interrupted)")
    if p.is_dir():
        latest = RunDirectory(p).latest_checkpoint()
        if latest is not None:
            return latest
        if (p / "adapter_config.json").is_file() or (p / "config.json").is_file():
            return p  # a plain adapter or model folder, not one of ours
        raise UserError(f"{p}: no complete checkpoint in this directory")
    raise UserError(f"{p}: no such checkpoint or run directory")


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{ckpt}: unreadable trainer_state.json ({e})") from None


def _fault_pause(stage: str) -> None:
    """Tests' kill -9 trials: TUNEDECK_FAULT_CHECKPOINT_DELAY seconds at TUNEDECK_FAULT_CHECKPOINT_STAGE
    (files: every file written but trainer_state.json; rename: all written, before the rename; rotate:
    an old checkpoint renamed for deletion, not yet deleted)."""
    faults.pause("TUNEDECK_FAULT_CHECKPOINT_DELAY", stage, "TUNEDECK_FAULT_CHECKPOINT_STAGE")
