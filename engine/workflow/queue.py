"""A run queue for a shared GPU box: `tunedeck queue add CFG` lines runs up; a small scheduler, in a
session of its own (it survives the app and SSH closing, like a detached run), starts the next one
when its GPUs are free -- free by NVML (no compute process on them, none of the queue's own runs on
them); on a box without GPUs one run at a time.

    work_dirs/.queue/queue.json      the entries, in order, and whether the queue is paused
    work_dirs/.queue/queue.lock      held (flock) while anyone reads-modifies-writes queue.json
    work_dirs/.queue/scheduler.lock  held by the live scheduler (one per workspace)
    work_dirs/.queue/scheduler.log   what it did

An entry goes waiting → starting → started (with its run directory), or → failed (it could not be
started: the reason is kept). "starting" is written before the run is launched: a scheduler killed
in between finds it on restart and marks it ``unknown`` instead of launching it a second time, so
nothing starts twice. A run that fails does not hold up the next one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.core.errors import UserError
from engine.core.files import atomic_write_text
from engine.core.gpus import list_gpus
from engine.train.runs import RunDirectory, pid_alive

log = logging.getLogger("tunedeck.queue")

WAITING, STARTING, STARTED, FAILED, UNKNOWN = "waiting", "starting", "started", "failed", "unknown"


def queue_dir(workspace: Path) -> Path:
    return Path(workspace) / "work_dirs" / ".queue"


@contextlib.contextmanager
def _locked(workspace: Path) -> Iterator[dict[str, Any]]:
    """queue.json, read and written back under queue.lock."""
    d = queue_dir(workspace)
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d / "queue.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        path = d / "queue.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {"paused": False, "entries": []}
        before = json.dumps(data, sort_keys=True)
        yield data
        if json.dumps(data, sort_keys=True) != before:
            atomic_write_text(path, json.dumps(data, ensure_ascii=False, indent=1))
    finally:
        os.close(fd)


def read_queue(workspace: Path) -> dict[str, Any]:
    try:
        return json.loads((queue_dir(workspace) / "queue.json").read_text())
    except (OSError, ValueError):
        return {"paused": False, "entries": []}


def check_entry(workspace: Path, config: str, overrides: list[str] | None = None,
                deepspeed: str | None = None) -> None:
    """The recipe, its overrides and its local model and data, checked as `train` would check them, so a
    mistake is said when it is queued, not hours later when its turn comes. A LLaVA finetune's pretrain
    checkpoint may not exist yet: the pretrain can be queued ahead of it."""
    from engine.recipe.catalogue import deepspeed_config_path
    from engine.recipe.paths import check_local_paths, resolve_paths
    from engine.recipe.schema import load_recipe

    if deepspeed:
        deepspeed_config_path(deepspeed)
    check_local_paths(resolve_paths(load_recipe(config, overrides or [])[1], Path(workspace)),
                      pretrain_may_come_later=True)


def add(workspace: Path, config: str, *, overrides: list[str] | None = None, gpus: int = 1,
        devices: list[int] | None = None, deepspeed: str | None = None) -> dict[str, Any]:
    if gpus < 1:
        raise UserError(f"--gpus: {gpus} is not allowed: must be >= 1")
    if devices is not None and len(devices) < gpus:
        gpus = len(devices)
    entry = {"id": uuid.uuid4().hex[:6], "config": str(config), "overrides": list(overrides or []), "gpus": gpus,
             "devices": devices, "deepspeed": deepspeed, "state": WAITING, "added": time.time(), "run": None,
             "error": None}
    with _locked(workspace) as q:
        q["entries"].append(entry)
    return entry


def remove(workspace: Path, entry_id: str) -> dict[str, Any]:
    with _locked(workspace) as q:
        for e in q["entries"]:
            if e["id"] == entry_id:
                if e["state"] not in (WAITING, FAILED, UNKNOWN):    # a failed entry goes from the list too
                    raise UserError(f"queue remove: {entry_id} is {e['state']}"
                                    + (f" as {e['run']}; stop it with tunedeck stop" if e.get("run") else ""))
                q["entries"].remove(e)
                return e
    raise UserError(f"queue remove: no entry {entry_id!r} (tunedeck queue list shows them)")


def set_paused(workspace: Path, paused: bool) -> None:
    with _locked(workspace) as q:
        q["paused"] = paused


# ---------------------------------------------------------------- choosing what starts
@dataclass(frozen=True)
class Gpu:
    index: int
    busy: bool               # a compute process holds it


def nvml_gpus() -> list[Gpu] | None:
    """The machine's GPUs and whether a process holds each (NVML); None without NVML (no GPUs)."""
    return [Gpu(g.index, bool(g.pids)) for g in list_gpus()] or None


def _live(entry: dict[str, Any]) -> bool:
    if entry["state"] != STARTED or not entry.get("run"):
        return False
    return RunDirectory(entry["run"]).status().get("state") in ("starting", "running")


def next_start(entries: list[dict[str, Any]], gpus: list[Gpu] | None) -> tuple[dict[str, Any], list[int] | None] | None:
    """The first waiting entry that can start now, and the GPUs it gets (None on a box without GPUs,
    where one queued run trains at a time). Entries keep their order: one that waits for GPUs is not
    overtaken by a smaller one behind it."""
    waiting = [e for e in entries if e["state"] == WAITING]
    if not waiting:
        return None
    live = [e for e in entries if _live(e)]
    head = waiting[0]
    if gpus is None:
        return (head, None) if not live else None
    taken = {d for e in live for d in (e.get("assigned") or [])}
    free = [g.index for g in gpus if not g.busy and g.index not in taken]
    if head.get("devices"):
        return (head, list(head["devices"])) if all(d in free for d in head["devices"]) else None
    if len(free) >= head["gpus"]:
        return head, free[:head["gpus"]]
    return None


# ---------------------------------------------------------------- the scheduler
def launch(workspace: Path, entry: dict[str, Any], devices: list[int] | None) -> Path:
    """Start one entry as a detached run (as `tunedeck train … --detach`); its run directory."""
    cmd = [sys.executable, "-m", "engine.cli", "train", entry["config"], "--detach"]
    for kv in entry.get("overrides") or []:
        cmd += ["--set", kv]
    if entry.get("deepspeed"):
        cmd += ["--deepspeed", entry["deepspeed"]]
    if devices:
        cmd += ["--devices", ",".join(map(str, devices)), "--gpus", str(len(devices))]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                         env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(cmd, cwd=workspace, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise UserError(lines[-1].removeprefix("error: ") if lines else f"exit {proc.returncode}")
    return Path(proc.stdout.strip().splitlines()[-1])


def tick(workspace: Path, gpus: list[Gpu] | None,
         launcher: Callable[[Path, dict[str, Any], list[int] | None], Path] = launch) -> dict[str, Any] | None:
    """One scheduling round: start the next entry if it can start; the entry started (or failed)."""
    with _locked(workspace) as q:
        if q.get("paused"):
            return None
        pick = next_start(q["entries"], gpus)
        if pick is None:
            return None
        entry, devices = pick
        entry.update(state=STARTING, assigned=devices, started=time.time())   # on disk before the launch
    try:
        run = launcher(workspace, entry, devices)
        update = {"state": STARTED, "run": str(run)}
    except UserError as e:
        update = {"state": FAILED, "error": str(e)}
    with _locked(workspace) as q:
        for e in q["entries"]:
            if e["id"] == entry["id"]:
                e.update(update)
                entry = e
    log.info("%s %s: %s", entry["id"], entry["config"], update.get("run") or update.get("error"))
    return entry


def recover(workspace: Path) -> None:
    """On (re)start: an entry left "starting" by a scheduler that died may or may not have launched;
    it is never launched again."""
    with _locked(workspace) as q:
        for e in q["entries"]:
            if e["state"] == STARTING:
                e.update(state=UNKNOWN, error="the scheduler stopped while starting it; `tunedeck runs` shows "
                                              "whether it runs")


def scheduler_lock(workspace: Path):
    from engine.train.runlock import RunLock

    return RunLock(queue_dir(workspace), "scheduler.lock")


def scheduler_pid(workspace: Path) -> int | None:
    pid = scheduler_lock(workspace).holder()
    return pid if pid and pid_alive(pid) else None


def run_scheduler(workspace: Path, interval_s: float | None = None, gpus: Callable[[], list[Gpu] | None] = nvml_gpus,
                  until_empty: bool = False) -> int:
    """The scheduler's loop (one per workspace: a second one exits at once)."""
    interval_s = interval_s or float(os.environ.get("TUNEDECK_QUEUE_INTERVAL_S", "2"))
    lock = scheduler_lock(workspace)
    if not lock.acquire():
        return 0
    try:
        recover(workspace)
        while True:
            tick(workspace, gpus())
            q = read_queue(workspace)
            if until_empty and not any(e["state"] in (WAITING, STARTING) for e in q["entries"]):
                return 0
            time.sleep(interval_s)
    finally:
        lock.release()


def ensure_scheduler(workspace: Path) -> int:
    """The workspace's scheduler, started in a session of its own if none is alive; its pid."""
    pid = scheduler_pid(workspace)
    if pid:
        return pid
    d = queue_dir(workspace)
    d.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                         env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with open(d / "scheduler.log", "ab") as out:
        cmd = [sys.executable, "-m", "engine.cli", "_queue-scheduler", str(Path(workspace).resolve())]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=workspace, env=env)
    return proc.pid
