"""Run preparation and launching, shared by the CLI verbs and the demos: the run directory laid out
and claimed (one trainer per directory, engine/train/runlock.py), resume rules, a detached worker,
torchrun, and the training itself with status.json kept right whatever happens.

Which Trainer class a recipe needs is the caller's choice (``trainer_for``): this package knows nothing
of LLaVA's subclass; engine/workflow/train.py picks it. The TUI starts the same verbs as processes."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.core.errors import UserError
from engine.recipe.paths import check_local_paths, resolve_paths
from engine.train.multinode import Nodes, deepspeed_command, torchrun_command
from engine.train.runlock import FD_ENV as LOCK_FD_ENV
from engine.train.runlock import LOCK_FILE, RunLock, claim

if TYPE_CHECKING:
    from engine.recipe.schema import Recipe
    from engine.train.runs import RunDirectory
    from engine.train.trainer import Trainer

log = logging.getLogger("tunedeck.train")


def config_path(ref: str) -> Path:
    p = Path(ref)
    if p.is_file():
        return p
    if p.suffix in (".yaml", ".yml") or os.sep in ref:
        raise UserError(f"{ref}: no such config file")
    from engine.recipe.catalogue import find

    return find(ref).path


def _holds_files(folder: Path) -> bool:
    """Anything in it but the run lock's own file."""
    return any(p.name != LOCK_FILE for p in folder.iterdir())


def _unique_run_dir(root: Path, stem: str) -> Path:
    cand = root / stem
    n = 2
    while cand.exists() and (_holds_files(cand) or RunLock(cand).holder() is not None):
        cand = root / f"{stem}_{n}"
        n += 1
    return cand


def _latest_run(root: Path, stem: str) -> Path | None:
    from engine.train.runs import find_runs

    pattern = re.compile(rf"^{re.escape(stem)}(_\d+)?$")
    runs = [r for r in find_runs(root) if pattern.match(r.path.name)]
    with_checkpoint = [r for r in runs if r.latest_checkpoint() is not None]
    # the newest run that can be continued (a failed attempt without checkpoints does not hide an older one)
    return (with_checkpoint or runs)[0].path if runs else None


def prepare_run(config: str, overrides: list[str], *, work_dir: str | None, resume: str | None,
                deepspeed: str | None, base_dir: Path | None = None,
                force: bool = False) -> tuple[Path, Path | None, str]:
    """Validate the recipe and lay out the run directory; returns (run_dir, checkpoint, name). The run
    directory's lock is taken here and held until the run ends (``train_here`` / ``start_detached``)."""
    from engine.recipe.catalogue import deepspeed_config_path
    from engine.recipe.schema import RecipeDocument, load_recipe
    from engine.train.checkpoint import read_trainer_state, resolve_checkpoint
    from engine.train.runs import checkpoint_step

    base_dir = base_dir or Path.cwd()
    cfg_path = config_path(config)
    overrides = list(overrides)
    if deepspeed:
        deepspeed_config_path(deepspeed)
        overrides.append(f"deepspeed={deepspeed.removeprefix('deepspeed_')}")
    doc, recipe = load_recipe(cfg_path, overrides)
    recipe = resolve_paths(recipe, base_dir)
    check_local_paths(recipe)              # before a run directory exists, and before detaching
    stem = cfg_path.stem
    root = base_dir / "work_dirs"
    ckpt: Path | None = None
    if work_dir:
        work = (base_dir / Path(work_dir).expanduser()).resolve()     # before anything runs elsewhere
        if work.exists() and not work.is_dir():
            raise UserError(f"--work-dir {work_dir}: is a file, not a directory")
    if resume and resume != "latest":
        ckpt = resolve_checkpoint(str((base_dir / Path(resume).expanduser()).resolve()))
        run_dir = work if work_dir else (ckpt.parent if checkpoint_step(ckpt) is not None else None)
        if run_dir is None:
            raise UserError(f"--resume {resume}: not a tunedeck checkpoint; give --work-dir for the run")
    elif resume == "latest":
        run_dir = work if work_dir else _latest_run(root, stem)
        if run_dir is None:
            raise UserError(f"--resume: no earlier run of {stem} under {root}")
    else:
        run_dir = work if work_dir else _unique_run_dir(root, stem)
    run_dir = run_dir.resolve()
    existed = run_dir.exists()
    lock = claim(run_dir)                  # one trainer per run directory, from here to the run's end
    try:
        if resume is not None:
            _refuse_non_run(run_dir)
        if resume == "latest":
            ckpt = _checkpoint_or_restart(run_dir)
        elif resume is None and work_dir:
            _check_fresh_work_dir(run_dir)
        if ckpt is not None:
            read_trainer_state(ckpt)       # an unreadable checkpoint is refused here, not in a detached worker
            _check_checkpoint_fits(ckpt, recipe, force)
            _check_nothing_after(run_dir, ckpt, force)
        resolved = RecipeDocument(doc.data)
        resolved.set("model.path", recipe.model.path)
        resolved.set("data.data_path", recipe.data.data_path)
        if recipe.llava.enabled:
            for key in ("visual_encoder", "pretrained_pth", "image_folder", "evaluation_images"):
                resolved.set(f"llava.{key}", getattr(recipe.llava, key))
        if ckpt is not None and (run_dir / "config.yaml").is_file():
            _check_same_recipe(run_dir, resolved, force)
        resolved.save(run_dir / "config.yaml")
        (run_dir / "source.json").write_text(json.dumps({"config": str(cfg_path.resolve()), "name": stem,
                                                          "overrides": overrides}, ensure_ascii=False))
    except BaseException:
        lock.release(remove=not (run_dir / "status.json").exists())    # a refused start leaves nothing behind
        if not existed:
            with contextlib.suppress(OSError):
                run_dir.rmdir()
        raise
    _HELD_LOCKS[run_dir] = lock
    return run_dir, ckpt, stem


_HELD_LOCKS: dict[Path, RunLock] = {}      # run directories this process has claimed (prepare_run)


def _checkpoint_or_restart(run_dir: Path) -> Path | None:
    """--resume: the latest complete checkpoint; a run killed before its first one starts again from step 0."""
    from engine.train.runs import RunDirectory

    latest = RunDirectory(run_dir).latest_checkpoint()
    if latest is None:
        print(f"{run_dir}: no complete checkpoint yet; starting it again from step 0", file=sys.stderr)
        _clear_run_files(run_dir)
        return None
    return Path(latest)


def _refuse_non_run(run_dir: Path) -> None:
    if run_dir.is_dir() and _holds_files(run_dir) and not (run_dir / "status.json").exists():
        raise UserError(f"--work-dir {run_dir}: exists and is not a run directory (its files would be "
                        "overwritten); choose a new or empty directory")


def _clear_run_files(run_dir: Path) -> None:
    """A run without checkpoints, started again in place: its old curve and status go, its log stays."""
    for name in ("metrics.jsonl", "evals.jsonl", "status.json"):
        (run_dir / name).unlink(missing_ok=True)


def _check_fresh_work_dir(run_dir: Path) -> None:
    """--work-dir without --resume: an empty or new folder, or a run with no checkpoint to lose."""
    from engine.train.runs import RunDirectory

    if not run_dir.is_dir() or not _holds_files(run_dir):
        return
    if not (run_dir / "status.json").exists():
        raise UserError(f"--work-dir {run_dir}: exists and is not a run directory (its files would be "
                        "overwritten); choose a new or empty directory")
    if RunDirectory(run_dir).latest_checkpoint() is not None:
        raise UserError(f"--work-dir {run_dir}: already holds a run with checkpoints; pass --resume to continue "
                        "it or choose another directory")
    print(f"{run_dir}: a run without checkpoints; starting it again from step 0", file=sys.stderr)
    _clear_run_files(run_dir)


def _check_checkpoint_fits(ckpt: Path, recipe, force: bool) -> None:
    """Before any model is loaded: a LoRA checkpoint of another base model or another rank is refused
    in one line (not after a minute of setup, in a state_dict error)."""
    from engine.model.loading import read_adapter_meta

    meta = read_adapter_meta(ckpt)
    base = meta.get("base_model")
    if base and not force and Path(base).expanduser().resolve() != Path(recipe.model.path).expanduser().resolve() \
            and base != recipe.model.path:
        raise UserError(f"--resume {ckpt}: it was trained on {base}, the recipe loads {recipe.model.path}; "
                        "resume with the same model.path (or --force)")
    try:
        acfg = json.loads((ckpt / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return
    if recipe.lora.enabled and int(acfg.get("r", recipe.lora.r)) != recipe.lora.r:
        raise UserError(f"--resume {ckpt}: its adapter has rank {acfg.get('r')}, the recipe's lora.r is "
                        f"{recipe.lora.r}")


def _check_nothing_after(run_dir: Path, ckpt: Path, force: bool) -> None:
    """Resuming from an older checkpoint trains its later steps again and replaces the checkpoints
    saved after it: refused unless --force, so none is overwritten without asking."""
    from engine.train.runs import RunDirectory, checkpoint_step

    if checkpoint_step(ckpt) is None or ckpt.resolve().parent != run_dir.resolve():
        return
    later = [c.name for c in RunDirectory(run_dir).checkpoints_after(ckpt)]
    if later and not force:
        raise UserError(f"--resume {ckpt.name}: {', '.join(later)} came after it and would be replaced by training "
                        f"those steps again; resume from the latest, or pass --force to go on from {ckpt.name}")


def _check_same_recipe(run_dir: Path, resolved, force: bool) -> None:
    """Resuming with a recipe that differs from the run's own is refused unless --force (the run's
    config.yaml is then kept beside, as config.before-resume.yaml)."""
    from engine.recipe.schema import RecipeDocument

    try:
        old = _flat(RecipeDocument.load(run_dir / "config.yaml").data)
    except Exception:                 # an unreadable config.yaml: the new one is all there is
        return
    new = _flat(resolved.data)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if not changed:
        return
    if not force:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:6])
        more = f" (and {len(changed) - 6} more)" if len(changed) > 6 else ""
        raise UserError(f"--resume: the recipe differs from the run's own config.yaml in {shown}{more}; "
                        "resume with the run's config.yaml, or pass --force to continue with the new values")
    shutil.copy(run_dir / "config.yaml", run_dir / "config.before-resume.yaml")


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    if isinstance(data, list):
        return {prefix.rstrip("."): [(_flat(x) if isinstance(x, dict) else x) for x in data]}
    return {prefix.rstrip("."): data}


def release(run_dir: Path) -> None:
    lock = _HELD_LOCKS.pop(run_dir, None)
    if lock is not None:
        lock.release()


def _worker_cmd(run_dir: Path, ckpt: Path | None) -> list[str]:
    cmd = ["-m", "engine.cli", "_worker", str(run_dir)]
    return cmd + (["--resume-from", str(ckpt)] if ckpt else [])


def start_detached(run_dir: Path, ckpt: Path | None, gpus: int = 1) -> subprocess.Popen:
    """Start training in its own session: it survives the terminal, the TUI and SSH closing."""
    from engine.train.runs import RunDirectory

    RunDirectory(run_dir).write_status(state="starting", pid=None, error=None, step=0)
    out = open(run_dir / "console.log", "ab")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                         env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    lock = _HELD_LOCKS.pop(run_dir, None) or claim(run_dir)
    fd = lock.hand_over()                 # the worker keeps this very lock: the directory is never unguarded
    env[LOCK_FD_ENV] = str(fd)
    try:
        proc = subprocess.Popen([sys.executable, *_worker_cmd(run_dir, ckpt), "--gpus", str(gpus)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=run_dir, env=env, pass_fds=(fd,))
    except BaseException:
        lock.release()
        raise
    lock.forget()
    RunDirectory(run_dir).write_status(pid=proc.pid)
    return proc


def torchrun(run_dir: Path, ckpt: Path | None, gpus: int, nodes: Nodes | None = None) -> int:
    """The ranks of this machine under torchrun: standalone, or one node of several (c10d rendezvous)."""
    cmd = torchrun_command(_worker_cmd(run_dir, ckpt), gpus, nodes)        # the worker in its -m form
    if nodes is None:
        return subprocess.call(cmd)
    return _node_agent(subprocess.Popen(cmd), run_dir)


def _node_agent(proc: subprocess.Popen, run_dir: Path) -> int:
    """Wait for this node's torchrun agent. When the node hosting the rendezvous store exits first, the
    other agents can wait for it at torchrun's exit barrier for minutes; once rank 0 has written the
    run's final state and this node's agent has had TUNEDECK_NODE_EXIT_GRACE_S to leave on its own, it
    is ended and the run's state decides the exit status."""
    from engine.train.runs import RunDirectory

    grace = float(os.environ.get("TUNEDECK_NODE_EXIT_GRACE_S", "60"))
    started = time.time()
    while True:
        try:
            return proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
        st = RunDirectory(run_dir).status()
        ended = st.get("state") in ("finished", "stopped", "failed") and float(st.get("finished") or 0) > started
        if ended and time.time() - float(st["finished"]) > grace:
            log.warning("torchrun's agent on this node is still waiting %.0f s after the run %s; ending it",
                        grace, st["state"])
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            print(f"{st['state']}: {run_dir} (this node's torchrun agent was ended after the run)", file=sys.stderr)
            return 0 if st["state"] in ("finished", "stopped") else 1


def deepspeed_launch(run_dir: Path, ckpt: Path | None, hostfile: str, master_addr: str | None,
                     master_port: int | None) -> int:
    """DeepSpeed's own launcher over the hosts of a hostfile."""
    return subprocess.call(deepspeed_command([sys.executable, *_worker_cmd(run_dir, ckpt)], hostfile, master_addr,
                                             master_port))


def train_here(run_dir: Path, ckpt: Path | None = None, *,
               trainer_for: Callable[[Recipe], type[Trainer]] | None = None) -> int:
    """Train in this process (a foreground run, a detached worker or one torchrun rank), holding the run
    directory's lock unless this is a torchrun rank (its launcher holds it). ``trainer_for`` picks the
    Trainer class for the run's recipe (default: the text trainer)."""
    run_dir = Path(run_dir).resolve()
    lock = None
    if "LOCAL_RANK" not in os.environ:
        lock = _HELD_LOCKS.pop(run_dir, None) or RunLock.adopt(run_dir) or claim(run_dir)
    try:
        return _train_locked(run_dir, ckpt, trainer_for)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(run_dir: Path, ckpt: Path | None, trainer_for: Callable[[Recipe], type[Trainer]] | None) -> int:
    from engine.recipe.schema import load_recipe
    from engine.train.runs import RunDirectory

    _, recipe = load_recipe(run_dir / "config.yaml")
    trainer_cls = trainer_for(recipe) if trainer_for else None
    try:
        name = json.loads((run_dir / "source.json").read_text()).get("name", run_dir.name)
    except (OSError, ValueError):
        name = run_dir.name
    run = RunDirectory(run_dir)
    try:
        state = run_training(recipe, run, resume_from=ckpt, config_name=name, trainer_cls=trainer_cls)
    except UserError:
        raise
    except Exception as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: training failed: {run.status().get('error') or type(e).__name__} "
                  f"(see {run.log_path})", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{state}: {run_dir}")
    return 0


def run_training(recipe: Recipe, run: RunDirectory, *, resume_from: Path | None = None,
                 config_name: str = "", console: bool = True, trainer_cls: type[Trainer] | None = None) -> str:
    """Train with status.json kept right whatever happens; returns the final state."""
    import torch

    from engine.train.checkpoint import clean_partial
    from engine.train.logs import setup_logging
    from engine.train.trainer import StoppedDuringSetup, Trainer

    rank = int(os.environ.get("RANK", "0"))
    run.path.mkdir(parents=True, exist_ok=True)
    setup_logging(run, console, rank)
    if rank == 0:
        clean_partial(run)
        run.write_status(state="starting", pid=os.getpid(), host=socket.gethostname(), step=0, error=None,
                         phase=None,
                         config_name=config_name, started=time.time(), resumed_from=str(resume_from or "") or None)
    trainer_cls = trainer_cls or Trainer
    if recipe.llava.enabled and trainer_cls is Trainer:
        raise TypeError("a LLaVA recipe needs LLaVA's trainer (engine.workflow.train.trainer_for)")
    trainer = trainer_cls(recipe, run, resume_from=resume_from, config_name=config_name)
    # SIGHUP: a foreground run whose terminal closed saves a checkpoint and stops, as `tunedeck stop` does
    old_handlers = {s: signal.signal(s, trainer.request_stop) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        trainer.setup()
        if resume_from is not None and rank == 0:
            _truncate_after(run, trainer.pos.step)
        return trainer.train()
    except StoppedDuringSetup:
        if rank == 0:
            run.write_status(state="stopped", finished=time.time(), phase=None,
                             **({"step": 0} if resume_from is None else {}))
            log.info("stopped before the first step (nothing trained, nothing saved)")
        return "stopped"
    except UserError as e:
        _fail(run, rank, str(e).replace("\n", "; "))
        raise
    except torch.cuda.OutOfMemoryError as e:
        msg = (f"CUDA out of memory ({str(e).splitlines()[0][:160]}); lower train.batch_size or "
               "data.max_length, or turn on model.gradient_checkpointing")
        _fail(run, rank, msg)
        raise UserError(msg) from None
    except BaseException as e:
        _fail(run, rank, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:500])
        log.exception("training failed")
        raise
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)


def _fail(run: RunDirectory, rank: int, msg: str) -> None:
    if rank == 0:
        run.write_status(state="failed", error=msg, finished=time.time(), phase=None)
        log.error("failed: %s", msg)


def _truncate_after(run: RunDirectory, step: int) -> None:
    """On resume, drop metrics and evals of the abandoned steps after the checkpoint."""
    for path in (run.metrics_path, run.evals_path):
        if not path.exists():
            continue
        keep = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                if line.strip() and json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except (ValueError, AttributeError):       # a line torn by a kill: it goes
                continue
        from engine.core.files import atomic_write_text

        atomic_write_text(path, "".join(x + "\n" for x in keep))
