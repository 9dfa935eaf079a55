"""Two or more runs side by side: their loss curves, the recipe settings that differ, and their
evaluation answers to the same prompt at the same step. Torch-free: `tunedeck compare` and the app's
comparison view both read it from the run directories."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ruamel.yaml import YAML, YAMLError

from engine.core.errors import UserError
from engine.train.runs import RunDirectory

MISSING = "—"          # a setting one run's recipe does not have


@dataclass
class Comparison:
    names: list[str]
    curves: list[list[float]]                          # loss of steps 1..n, one list per run
    config_diff: list[tuple[str, list[str]]]           # (dotted key, the value in each run)
    answers: list[tuple[int, str, list[str]]] = field(default_factory=list)   # (step, prompt, answer per run)

    def to_json(self) -> dict[str, Any]:
        return {"runs": self.names,
                "loss": {n: c for n, c in zip(self.names, self.curves)},
                "final_loss": {n: (c[-1] if c else None) for n, c in zip(self.names, self.curves)},
                "config_diff": [{"key": k, "values": dict(zip(self.names, v))} for k, v in self.config_diff],
                "answers": [{"step": s, "prompt": p, "answers": dict(zip(self.names, a))}
                            for s, p, a in self.answers]}


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 2e-4}}`` → ``{"train.lr": 2e-4}``; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix: tree} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def _recipe(run: RunDirectory) -> dict[str, Any]:
    try:
        text = run.config_path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"{run.config_path}: cannot read the run's recipe ({e.strerror or e})") from None
    try:
        data = YAML(typ="safe").load(text) or {}
    except YAMLError as e:
        raise UserError(f"{run.config_path}: not YAML ({str(e).splitlines()[0]})") from None
    return flatten(data if isinstance(data, dict) else {})


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ", ".join(_shown(v) for v in value) or "[]"
    return str(value)


def compare_runs(runs: list[RunDirectory]) -> Comparison:
    if len(runs) < 2:
        raise UserError("compare: name two or more runs")
    names = [r.path.name for r in runs]
    if len(set(names)) < len(names):       # same directory names under different parents
        names = [str(r.path) for r in runs]
    curves = []
    for r in runs:
        by_step: dict[int, float] = {}
        for m in r.metrics():              # a resumed run rewrote steps: the last record of a step counts
            if isinstance(m.get("step"), int) and isinstance(m.get("loss"), (int, float)):
                by_step[m["step"]] = float(m["loss"])
        curves.append([by_step[s] for s in sorted(by_step)])
    recipes = [_recipe(r) for r in runs]
    keys = sorted(set().union(*recipes))
    diff = []
    for key in keys:
        values = [_shown(rec[key]) if key in rec else MISSING for rec in recipes]
        if len(set(values)) > 1:
            diff.append((key, values))
    # answers to the same prompt at the same step, every run's side by side (the newest step first)
    table: dict[tuple[int, str], list[str]] = {}
    for i, r in enumerate(runs):
        for e in r.evals():
            step, prompt = e.get("step"), e.get("prompt")
            if not isinstance(step, int) or not isinstance(prompt, str):
                continue
            label = f"[{e['image'].rsplit('/', 1)[-1]}] {prompt}" if e.get("image") else prompt
            table.setdefault((step, label), [MISSING] * len(runs))[i] = str(e.get("answer", ""))
    order = {key: n for n, key in enumerate(table)}       # the prompts in the recipe's order within a step
    answers = [(s, p, a) for (s, p), a in sorted(table.items(), key=lambda kv: (-kv[0][0], order[kv[0]]))]
    return Comparison(names, curves, diff, answers)
