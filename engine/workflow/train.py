"""``tunedeck train`` and the detached worker: the GPUs chosen, the run prepared and claimed, then
trained here, detached or under torchrun with the Trainer its recipe needs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from engine.core.errors import UserError
from engine.llava.train import LlavaTrainer
from engine.recipe.schema import Recipe
from engine.train.launch import deepspeed_launch, prepare_run, release, start_detached, torchrun, train_here
from engine.train.multinode import Nodes, positive_int, wait_for_shared_run
from engine.train.runlock import RunLock, claim
from engine.train.trainer import Trainer


def trainer_for(recipe: Recipe) -> type[Trainer]:
    """The Trainer class a recipe needs."""
    return LlavaTrainer if recipe.llava.enabled else Trainer


def parse_devices(text: str | None) -> list[int] | None:
    """``--devices 0`` or ``1,3``: distinct GPU indices, or None for whatever the process sees."""
    if text is None:
        return None
    try:
        devices = [int(x) for x in text.split(",")]
    except ValueError:
        devices = []
    if not devices or any(d < 0 for d in devices) or len(set(devices)) != len(devices):
        raise UserError(f"--devices: {text!r} is not allowed: give GPU indices like 0 or 1,3")
    return devices


@dataclass
class Started:
    run_dir: Path
    rc: int = 0
    pid: int | None = None          # a detached worker's


def train(config: str, overrides: list[str], *, work_dir: str | None = None, resume: str | None = None,
          deepspeed: str | None = None, force: bool = False, gpus: int | None = None, devices: str | None = None,
          detach: bool = False, nodes: Nodes | None = None, hostfile: str | None = None) -> Started:
    """Prepare a run of ``config`` and train it: detached (returns at once with the worker's pid), under
    torchrun for several GPUs or as one node of several, through DeepSpeed's launcher over a hostfile,
    or here."""
    chosen = parse_devices(devices)
    if gpus is None:
        per_node = positive_int("NPROC_PER_NODE", os.environ.get("NPROC_PER_NODE"), 1) if nodes else None
        gpus = len(chosen) if chosen else per_node or 1
    if gpus < 1:
        raise UserError(f"--gpus: {gpus} is not allowed: must be >= 1")
    if chosen is not None and gpus > len(chosen):
        raise UserError(f"--gpus: {gpus} is more than the {len(chosen)} GPU(s) in --devices {devices}")
    if (nodes or hostfile) and detach:
        raise UserError("--detach: not with several nodes; start each node's command under Slurm, tmux or nohup")
    if hostfile and not deepspeed:
        raise UserError("--hostfile: needs --deepspeed (DeepSpeed's launcher reads the hostfile)")
    if hostfile and nodes:
        raise UserError("--hostfile: not with --nnodes; DeepSpeed's launcher starts every node from this one")
    if chosen is not None and nodes is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, chosen))
    if nodes is not None and nodes.node_rank > 0:
        # node 0 prepares the run directory; this node trains in it once it can see it
        run_dir = Path(str(work_dir)).resolve()
        wait_for_shared_run(run_dir)
        from engine.train.runs import RunDirectory

        ckpt = None
        if resume:
            ckpt = RunDirectory(run_dir).latest_checkpoint() if resume == "latest" else Path(resume).resolve()
        return Started(run_dir, torchrun(run_dir, ckpt, gpus, nodes))
    run_dir, ckpt, _ = prepare_run(config, overrides, work_dir=work_dir, resume=resume, deepspeed=deepspeed,
                                   force=force)
    if chosen is not None:               # this process's children (detached worker, torchrun ranks) inherit it
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, chosen))
        os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"        # the numbering nvidia-smi and the TUI show
    from engine.train.runs import RunDirectory

    RunDirectory(run_dir).write_status(devices=chosen)       # None: whatever the process can see
    if detach:
        return Started(run_dir, pid=start_detached(run_dir, ckpt, gpus).pid)
    if hostfile:
        try:
            return Started(run_dir, deepspeed_launch(run_dir, ckpt, hostfile, os.environ.get("MASTER_ADDR"),
                                                     int(os.environ["MASTER_PORT"]) if os.environ.get("MASTER_PORT")
                                                     else None))
        finally:
            release(run_dir)
    if gpus > 1 or nodes is not None:
        try:
            return Started(run_dir, torchrun(run_dir, ckpt, gpus, nodes))
        finally:
            release(run_dir)
    return Started(run_dir, train_here(run_dir, ckpt, trainer_for=trainer_for))


def work(run_dir: str | Path, resume_from: str | None = None, gpus: int = 1) -> int:
    """The detached worker (or a torchrun rank): trains a prepared run directory."""
    run_dir = Path(run_dir).resolve()
    ckpt = Path(resume_from) if resume_from else None
    if gpus > 1 and "LOCAL_RANK" not in os.environ:
        lock = RunLock.adopt(run_dir) or claim(run_dir)     # held while the ranks train
        try:
            return torchrun(run_dir, ckpt, gpus)
        finally:
            lock.release()
    return train_here(run_dir, ckpt, trainer_for=trainer_for)
