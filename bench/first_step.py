"""Seconds to the first step: from `tunedeck train` being spawned to the end of its step 1, once with
empty compile caches (a fresh machine) and once more with the caches the first run left (a second run
of the same model) -- for this checkout and, in the same call, for a baseline checkout
(`--baseline-repo`, e.g. a git worktree of an older commit), each with a temporary folder and a
cache folder of its own.

    python bench/first_step.py [--baseline-repo PATH] [--steps 2]

On a GPU: the tutorial's recipe on the random-init InternLM2-1.8B shape (bench/engine_gpu.py builds
it); goals 30 s cold and 10 s warm. On a CPU: the embedded demo's tiny model with `model.compile: on`,
the same compile path with C++ kernels instead of Triton's (no goal; the ratios to the baseline say
what changed). Step 1's loss must agree between every run: the same math, whatever was cached.
Writes bench/results/first_step_<GPU or cpu>.json and exits 1 when a goal is missed or a loss
disagrees.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from machine import cpu_model  # noqa: E402

WORK = Path("/tmp/tunedeck_first_step")
GOALS = {"cold_s": 30.0, "warm_s": 10.0}          # on a GPU


def case(gpu: bool, steps: int) -> tuple[Path, list[str]]:
    """The recipe and its --set overrides."""
    common = [f"max_steps={steps}", f"save_steps={steps + 10}", "evaluation_inputs=[]"]
    if gpu:
        from engine_gpu import MODEL, RECIPE, build_data, build_model

        build_model()
        data = WORK / "identity.json"
        build_data(data)
        return RECIPE, [f"model.path={MODEL}", "model.trust_remote_code=false", f"data.data_path={data}", *common]
    sys.path.insert(0, str(REPO))
    from engine.workflow.demo import prepare_workspace

    model, data, recipe = prepare_workspace(WORK / "demo", "tunedeck")
    return recipe, [f"model.path={model}", f"data.data_path={data}", "model.compile=on", *common]


def first_step(repo: Path, home: Path, recipe: Path, sets: list[str], name: str) -> dict:
    """One `tunedeck train` of ``repo``'s code with ``home``'s caches: seconds from spawn to the end of
    step 1 (its metrics line's time), step 1's own time and loss."""
    work = home / "runs" / name
    shutil.rmtree(work, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    env.update(TUNEDECK_CACHE=str(home / "cache"), TMPDIR=str(home / "tmp"), PYTHONPATH=str(repo))
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "engine.cli", "train", str(recipe), "--work-dir", str(work)]
    for kv in sets:
        cmd += ["--set", kv]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.time() - t0
    try:
        first = json.loads((work / "metrics.jsonl").read_text().splitlines()[0])
    except (OSError, IndexError, ValueError):
        return {"returncode": proc.returncode, "error": (proc.stderr or proc.stdout)[-1500:]}
    return {"to_step1_end_s": round(first["time"] - t0, 2), "step1_s": round(first["step_time_s"], 2),
            "loss_step1": first["loss"], "wall_s": round(wall, 1), "returncode": proc.returncode}


def measure(label: str, repo: Path, recipe: Path, sets: list[str]) -> dict:
    home = WORK / label
    for sub in ("cache", "tmp"):
        shutil.rmtree(home / sub, ignore_errors=True)        # cold: nothing compiled before
    cold = first_step(repo, home, recipe, sets, "cold")
    warm = first_step(repo, home, recipe, sets, "warm")
    compiled = home / "cache" / "compile"
    return {"repo": str(repo), "commit": git_commit(repo), "cold": cold, "warm": warm,
            "files_in_tunedeck_compile_cache": sum(1 for p in compiled.rglob("*") if p.is_file())
            if compiled.exists() else 0}


def git_commit(repo: Path) -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                           capture_output=True, text=True).stdout.strip()
    return (out.stdout.strip() or "unknown") + ("+changes" if dirty else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline-repo", type=Path, help="another checkout, measured the same way in this call")
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    import torch

    gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if gpu else "cpu"
    WORK.mkdir(parents=True, exist_ok=True)
    recipe, sets = case(gpu, args.steps)
    result: dict = {"device": device, "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "recipe": recipe.name, "sets": sets, "runs": {}}
    runs = [("tunedeck", REPO)] + ([("baseline", args.baseline_repo.resolve())] if args.baseline_repo else [])
    for label, repo in runs:
        result["runs"][label] = r = measure(label, repo, recipe, sets)
        cold, warm = r["cold"].get("to_step1_end_s"), r["warm"].get("to_step1_end_s")
        print(f"{label} ({r['commit']}): cold {cold} s, warm {warm} s to the end of step 1", flush=True)
    problems = []
    losses = {f"{label}/{w}": r[w].get("loss_step1") for label, r in result["runs"].items() for w in ("cold", "warm")}
    if None in losses.values():
        problems.append(f"a run failed: {[k for k, v in losses.items() if v is None]}")
    else:
        ref = losses["tunedeck/cold"]
        tol = 0.01 if gpu else 1e-4                         # bf16 on the GPU, fp32 on the CPU
        off = {k: v for k, v in losses.items() if abs(v - ref) > tol * max(1.0, abs(ref))}
        if off:
            problems.append(f"step 1's loss differs from tunedeck/cold's {ref}: {off}")
    ours = result["runs"]["tunedeck"]
    if "baseline" in result["runs"] and not problems:
        base = result["runs"]["baseline"]
        result["speedup"] = {w: round(base[w]["to_step1_end_s"] / ours[w]["to_step1_end_s"], 2)
                             for w in ("cold", "warm")}
    if gpu and not problems:
        result["goals"] = {k: {"goal_s": g, "measured_s": ours[k[:4]]["to_step1_end_s"],
                               "met": ours[k[:4]]["to_step1_end_s"] <= g} for k, g in GOALS.items()}
        problems += [f"{k}: {v['measured_s']} s, goal {v['goal_s']} s"
                     for k, v in result["goals"].items() if not v["met"]]
    result["problems"] = problems
    name = device.replace(" ", "_") if gpu else "cpu"
    out = REPO / "bench" / "results" / f"first_step_{name}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    if os.environ.get("OUT"):
        shutil.copy(out, Path(os.environ["OUT"]) / out.name)
    print(json.dumps({k: result.get(k) for k in ("device", "cpu", "speedup", "goals", "problems")}, indent=1))
    print("wrote", out.relative_to(REPO))
    if problems:
        print("NOT MET: " + "; ".join(problems))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
