"""train, runs, stop, and the detached worker's own entry point."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from engine.cli.common import add_set, add_verb
from engine.core.constants import DEEPSPEED_CHOICES
from engine.core.errors import UserError


def register(sub) -> None:
    p = add_verb(sub, "train", "train a recipe (QLoRA, LoRA or full; one GPU, several, or the CPU)",
                 "tunedeck train my_recipe.yaml --detach",
                 "tunedeck train my_recipe.yaml --resume",
                 "tunedeck train my_recipe.yaml --deepspeed zero2 --devices 0,1",
                 description="Train a recipe into a run directory (config.yaml, status.json, metrics.jsonl, "
                             "train.log, checkpoints). One trainer per run directory; --resume continues at the "
                             "exact step of the latest checkpoint.")
    p.add_argument("config", help="a recipe file or a built-in recipe name")
    p.add_argument("--work-dir", help="the run directory (default: work_dirs/<recipe name>, numbered if taken)")
    add_set(p)
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CKPT",
                   help="continue the latest run of this recipe, or the given checkpoint or run directory, "
                        "at its exact step")
    p.add_argument("--deepspeed", metavar="CONFIG",
                   help="train under DeepSpeed with a shipped config: " + " | ".join(DEEPSPEED_CHOICES[1:]))
    p.add_argument("--gpus", type=int, default=None,
                   help="GPUs to train on, data parallel through torchrun (default: one per --devices entry, "
                        "else 1)")
    p.add_argument("--devices", help="which GPUs, e.g. 0 or 1,3 (sets CUDA_VISIBLE_DEVICES for the run)")
    p.add_argument("--detach", action="store_true", help="run in the background, in its own session; print the "
                                                         "run directory")
    p.add_argument("--dry-run", action="store_true",
                   help="start nothing: print the estimated peak GPU memory (weights, LoRA and optimizer state, "
                        "activations, logits) and whether it fits each visible GPU; exit 1 when it fits none")
    p.add_argument("--json", action="store_true", help="with --dry-run: the estimate as JSON")
    p.add_argument("--force", action="store_true",
                   help="with --resume: go on even though the recipe differs from the run's own config.yaml, or "
                        "from a checkpoint that later ones came after (they are replaced)")
    nodes = p.add_argument_group("several machines (run the same command on every node; --work-dir on a shared "
                                 "filesystem)")
    nodes.add_argument("--nnodes", type=int, help="how many machines train together (default: $NNODES, else 1)")
    nodes.add_argument("--node-rank", type=int, help="this machine's number, 0 on the first (default: $NODE_RANK)")
    nodes.add_argument("--master-addr", help="the first node's address every node reaches (default: $MASTER_ADDR)")
    nodes.add_argument("--master-port", type=int,
                       help="its port for the rendezvous (default: $MASTER_PORT, else 29500)")
    nodes.add_argument("--rdzv-id", help="torchrun's rendezvous id, the same on every node (default: one made from "
                                         "--work-dir, address, port and --nnodes)")
    nodes.add_argument("--rdzv-endpoint", help="torchrun's c10d rendezvous endpoint HOST:PORT (default: "
                                               "--master-addr:--master-port)")
    nodes.add_argument("--max-restarts", type=int, help="torchrun's restarts of a failed node's ranks (default: 0)")
    nodes.add_argument("--hostfile", help="with --deepspeed: DeepSpeed's hostfile ('HOST slots=GPUS' a line); its "
                                          "launcher starts every host from here")
    p.set_defaults(verb_handler=train)

    p = add_verb(sub, "slurm", "write an sbatch script that trains a recipe on several nodes (srun + torchrun)",
                 "tunedeck slurm my_recipe.yaml --nodes 2 --gpus-per-node 8",
                 "tunedeck slurm my_recipe.yaml --nodes 4 --gpus-per-node 4 --partition gpu --time 12:00:00 "
                 "-o train.sbatch")
    p.add_argument("config", help="a recipe file or a built-in recipe name")
    p.add_argument("--nodes", type=int, required=True, help="machines to train on")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs of each machine")
    p.add_argument("--work-dir", help="the run directory, on a shared filesystem (default: work_dirs/<recipe name>)")
    p.add_argument("--partition", help="Slurm partition")
    p.add_argument("--time", dest="time_limit", help="Slurm time limit, e.g. 12:00:00")
    p.add_argument("--cpus-per-task", type=int, help="CPUs of each node's task")
    p.add_argument("--job-name", help="Slurm job name (default: the recipe's name)")
    p.add_argument("--master-port", type=int, default=29500, help="the rendezvous port on the head node")
    p.add_argument("--deepspeed", metavar="CONFIG", help="train under DeepSpeed: " + " | ".join(DEEPSPEED_CHOICES[1:]))
    add_set(p)
    p.add_argument("-o", "--output", help="the script's file (default: <recipe name>.sbatch; an existing file is "
                                          "kept unless --force)")
    p.add_argument("--force", action="store_true", help="overwrite --output")
    p.set_defaults(verb_handler=slurm)

    p = add_verb(sub, "runs", "list runs with their state, progress, loss and ETA",
                 "tunedeck runs", "tunedeck runs --json")
    p.add_argument("--root", default="work_dirs", help="the folder the run directories are in")
    p.add_argument("--json", action="store_true", help="machine-readable: one object per run")
    p.set_defaults(verb_handler=runs)

    p = add_verb(sub, "compare", "compare runs: loss curves, the recipe settings that differ, evaluation answers",
                 "tunedeck compare my_recipe my_recipe_2", "tunedeck compare work_dirs/a work_dirs/b --json")
    p.add_argument("runs", nargs="+", metavar="RUN", help="two or more run directories, or their names under --root")
    p.add_argument("--root", default="work_dirs", help="the folder the run directories are in")
    p.add_argument("--json", action="store_true", help="machine-readable: curves, differences and answers")
    p.set_defaults(verb_handler=compare)

    p = add_verb(sub, "stop", "save a checkpoint and stop a running training",
                 "tunedeck stop my_recipe", "tunedeck stop work_dirs/my_recipe_2 --wait 300")
    p.add_argument("run", help="the run directory, or its name under --root")
    p.add_argument("--root", default="work_dirs", help="the folder the run directories are in")
    p.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the checkpoint")
    p.set_defaults(verb_handler=stop)


def worker_parser() -> argparse.ArgumentParser:
    """The detached / torchrun training process's own arguments (not a verb people type)."""
    p = argparse.ArgumentParser(prog="tunedeck _worker")
    p.add_argument("run_dir")
    p.add_argument("--resume-from")
    p.add_argument("--gpus", type=int, default=1)
    p.set_defaults(verb_handler=worker)
    return p


def train(args) -> int:
    if args.dry_run:
        return dry_run(args)
    from engine.train.multinode import nodes_from
    from engine.workflow.train import train

    nodes = nodes_from(args.nnodes, args.node_rank, args.master_addr, args.master_port, args.rdzv_id,
                       args.rdzv_endpoint, args.max_restarts, work_dir=args.work_dir)
    if args.hostfile:                        # DeepSpeed's launcher reads them from the environment
        for key, value in (("MASTER_ADDR", args.master_addr), ("MASTER_PORT", args.master_port)):
            if value:
                os.environ[key] = str(value)
    started = train(args.config, args.overrides, work_dir=args.work_dir, resume=args.resume,
                    deepspeed=args.deepspeed, force=args.force, gpus=args.gpus, devices=args.devices,
                    detach=args.detach, nodes=nodes, hostfile=args.hostfile)
    if args.detach:
        print(started.run_dir)
        print(f"started pid {started.pid}; follow with: tail -f {started.run_dir / 'train.log'}", file=sys.stderr)
    return started.rc


def dry_run(args) -> int:
    """`train --dry-run`: the memory estimate per visible GPU (no torch, nothing written)."""
    from engine.core.gpus import list_gpus
    from engine.train.estimate import GIB, describe, estimate_recipe, fit_on
    from engine.workflow.estimate import recipe_to_estimate

    recipe = recipe_to_estimate(args.config, Path.cwd(), args.overrides, args.deepspeed)
    devices = args.devices if args.devices is not None else os.environ.get("CUDA_VISIBLE_DEVICES")
    picked = [int(x) for x in devices.split(",") if x.strip().isdigit()] if devices else None
    gpus = list_gpus(picked)
    world = args.gpus or (len(picked) if picked else 1)
    fits = [(g, e, e.fits(g.free_bytes)) for g, e in fit_on(recipe, gpus, world)] if gpus else []
    if args.json:
        est = fits[0][1] if fits else estimate_recipe(recipe, None, world)
        print(json.dumps({"estimate": est.to_json(), "gpus": [
            {"index": g.index, "name": g.name, "free_gib": round(g.free_bytes / GIB, 2),
             "total_gib": round(g.mem_total_gib, 2), "fits": ok, "estimate": e.to_json()}
            for g, e, ok in fits]}, indent=1))
    else:
        if not fits:
            print("\n".join(describe(estimate_recipe(recipe, None, world))))
            print("no GPU visible here (NVML): nothing to check the estimate against")
        shown = None
        for g, e, ok in fits:
            if e.to_json() != shown:
                print("\n".join(describe(e)))
                shown = e.to_json()
            print(f"GPU {g.index} {g.name}: {g.free_bytes / GIB:.1f} of {g.mem_total_gib:.0f} GiB free: "
                  f"{'fits' if ok else 'does NOT fit'}")
    return 0 if not fits or any(ok for _, _, ok in fits) else 1


def worker(args) -> int:
    from engine.workflow.train import work

    return work(args.run_dir, args.resume_from, args.gpus)


def runs(args) -> int:
    from engine.train.runs import find_runs, format_eta, format_loss

    rows = [r.summary() for r in find_runs(args.root)]
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=1))
        return 0
    if not rows:
        print(f"no runs under {args.root}")
        return 0
    print(f"{'RUN':<40} {'STATE':<9} {'STEP':>11} {'LOSS':>8} {'ETA':>8}  INFO")
    for r in rows:
        prog = f"{r['step']}/{r['total_steps'] or '?'}"
        info = r["error"] if r["state"] == "failed" else (r["phase"] or r["latest_checkpoint"] or "")
        eta = format_eta(r["eta_s"]) if r["state"] == "running" and not r["phase"] else "-"
        rel = os.path.relpath(r["run"])
        shown = r["run"] if rel.startswith("..") else rel
        print(f"{shown:<40} {r['state']:<9} {prog:>11} {format_loss(r['loss']):>8} {eta:>8}  {info}")
    return 0


def _tunedeck_command() -> str:
    """This tunedeck, by its absolute path when it is a script (the job's nodes may have another PATH)."""
    argv0 = Path(sys.argv[0])
    return str(argv0.resolve()) if argv0.name == "tunedeck" and argv0.exists() else "tunedeck"


def slurm(args) -> int:
    from engine.core.files import atomic_write_text
    from engine.recipe.catalogue import recipe_stem
    from engine.train.multinode import sbatch_script

    for flag, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node)):
        if value < 1:
            raise UserError(f"{flag}: {value} is not allowed: must be >= 1")
    stem = recipe_stem(Path(args.config).name, "config")
    work_dir = args.work_dir or f"work_dirs/{stem}"
    out = Path(args.output or f"{stem}.sbatch")
    if out.exists() and not args.force:
        raise UserError(f"{out}: exists; pass --force to overwrite it, or -o another file")
    text = sbatch_script(args.config, work_dir, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                         job_name=args.job_name or stem, partition=args.partition, time_limit=args.time_limit,
                         cpus_per_task=args.cpus_per_task, port=args.master_port, overrides=args.overrides,
                         deepspeed=args.deepspeed, tunedeck=_tunedeck_command())
    Path(work_dir).parent.mkdir(parents=True, exist_ok=True)      # where Slurm writes the job's output
    atomic_write_text(out, text)
    print(f"wrote {out}: {args.nodes} nodes x {args.gpus_per_node} GPUs into {work_dir}")
    print(f"submit it with: sbatch {out}   (then: tunedeck runs, or squeue -u $USER)")
    return 0


def compare(args) -> int:
    from engine.train.compare import compare_runs
    from engine.train.runs import format_loss, resolve_run

    cmp = compare_runs([resolve_run(r, args.root) for r in args.runs])
    if args.json:
        print(json.dumps(cmp.to_json(), ensure_ascii=False, indent=1))
        return 0
    width = max(len(n) for n in cmp.names)
    print("loss (first, lowest, last over steps):")
    for name, curve in zip(cmp.names, cmp.curves):
        if curve:
            print(f"  {name:<{width}}  {format_loss(curve[0])} {format_loss(min(curve))} {format_loss(curve[-1])}"
                  f"  {len(curve)} steps")
        else:
            print(f"  {name:<{width}}  no steps yet")
    print("recipe settings that differ:" if cmp.config_diff else "recipe settings: the same")
    for key, values in cmp.config_diff:
        print(f"  {key}: " + " | ".join(f"{n}={v}" for n, v in zip(cmp.names, values)))
    if cmp.answers:
        print("evaluation answers (newest step first):")
    for step, prompt, answers in cmp.answers:
        print(f"  @{step} {prompt}")
        for name, answer in zip(cmp.names, answers):
            print(f"    {name:<{width}}  {answer}")
    return 0


def stop(args) -> int:
    from engine.train.runs import resolve_run

    run = resolve_run(args.run, args.root)
    st = run.request_stop(args.wait)
    print(f"{st.get('state')} at step {st.get('step')}; latest checkpoint: {run.latest_checkpoint() or 'none'}")
    return 0 if st.get("state") in ("stopped", "finished") else 1
