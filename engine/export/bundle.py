"""``tunedeck export --format bundle``: the tutorial's deploy step as one folder.

    OUT/model/            the merged model (InternLM2 in its own format, others in transformers')
    OUT/README.md         model card: base, data, recipe, training curve, evaluation answers, how to start
    OUT/recipe.yaml       the run's resolved recipe
    OUT/requirements.txt  the exact versions serving needs, pinned from this installation
    OUT/app/engine/       tunedeck's engine, which ``serve`` runs (no wheel to build, nothing else to fetch)
    OUT/start.sh          makes OUT/.venv from requirements.txt on first use, then serves the web chat

The folder is written beside OUT and renamed into place; an existing OUT is replaced only with --force.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import shlex
import shutil
from pathlib import Path
from typing import Any

from engine.core.errors import UserError
from engine.export.merge import base_model_of, merge
from engine.model.loading import read_adapter_meta
from engine.train.checkpoint import resolve_checkpoint
from engine.train.runs import RunDirectory

# What `tunedeck serve` imports, by distribution name; their own requirements are pinned with them.
SERVE_DISTRIBUTIONS = ("torch", "transformers", "tokenizers", "safetensors", "sentencepiece", "protobuf", "numpy",
                       "accelerate", "pydantic", "starlette", "uvicorn", "psutil", "nvidia-ml-py", "pillow")
_SPARK = "▁▂▃▄▅▆▇█"


def pinned_requirements(names: tuple[str, ...] = SERVE_DISTRIBUTIONS) -> list[str]:
    """``name==version`` for each distribution and everything it requires on this platform, as installed
    here (torch without its local build tag, so pip can find it in any index)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins: dict[str, str] = {}
    todo = list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in pins:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            raise UserError(f"the bundle needs {name}, which is not installed here") from None
        pins[name] = dist.version.split("+")[0]
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return [f"{n}=={v}" for n, v in sorted(pins.items())]


def sparkline(values: list[float]) -> str:
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(_SPARK[min(len(_SPARK) - 1, int((v - lo) / span * len(_SPARK)))] for v in values)


def _curve(run: RunDirectory | None) -> list[str]:
    rows = [m for m in (run.metrics() if run else []) if isinstance(m.get("loss"), (int, float))]
    if not rows:
        return ["No training metrics were found beside this checkpoint."]
    picks = rows if len(rows) <= 10 else [rows[round(i * (len(rows) - 1) / 9)] for i in range(10)]
    out = [f"`{sparkline([m['loss'] for m in rows])}`  loss {rows[0]['loss']:.4f} → {rows[-1]['loss']:.4f} "
           f"over {rows[-1].get('step', len(rows))} steps", "", "| step | loss | lr |", "|---:|---:|---:|"]
    out += [f"| {m.get('step', '')} | {m['loss']:.4f} | {m.get('lr') or 0:.3g} |" for m in picks]
    return out


def _evals(run: RunDirectory | None) -> list[str]:
    evals = run.evals() if run else []
    if not evals:
        return ["No evaluation answers were recorded."]
    last = max(e.get("step", 0) for e in evals)
    out = [f"The evaluation prompts at step {last}, the last one evaluated:", ""]
    for e in (e for e in evals if e.get("step", 0) == last):
        out += [f"**{e.get('prompt', '')}**", "", "> " + str(e.get("answer", "")).replace("\n", "\n> "), ""]
    return out


def _data_line(recipe: dict[str, Any]) -> str:
    data = recipe.get("data") or {}
    path = data.get("data_path") or data.get("path") or ""
    count = ""
    try:
        with open(path, encoding="utf-8") as f:
            count = f" ({sum(1 for line in f if line.strip())} records)"
    except (OSError, TypeError, UnicodeDecodeError):
        pass
    return f"{path}{count}" if path else "not recorded"


def model_card(name: str, meta: dict[str, Any], recipe: dict[str, Any], run: RunDirectory | None,
               start: str) -> str:
    lora = recipe.get("lora") or {}
    train = recipe.get("train") or {}
    lines = [
        f"# {name}", "",
        f"Fine-tuned with tunedeck from **{meta.get('base_model') or 'its base model'}**, merged into one model "
        "(`model/`).", "",
        "| | |", "|---|---|",
        f"| base model | {meta.get('base_model') or 'not recorded'} |",
        f"| data | {_data_line(recipe)} |",
        f"| recipe | {meta.get('config_name') or 'recipe.yaml'} (`recipe.yaml`) |",
        f"| method | {recipe.get('model', {}).get('quantization') or 'none'} quantization, "
        f"{'LoRA r ' + str(lora.get('r')) if lora.get('enabled', True) and lora else 'full fine-tune'} |",
        f"| steps | {meta.get('step', '?')} (epochs {train.get('max_epochs', '?')}, lr {train.get('lr', '?')}) |",
        f"| chat template | {meta.get('prompt_template') or 'the tokenizer own'} |",
        f"| system prompt | {meta.get('system') or '(none)'} |",
        "", "## Training curve", "", *_curve(run), "",
        "## Evaluation answers", "", *_evals(run), "",
        "## Start it", "",
        "```sh", start, "```", "",
        "The first start makes `.venv/` here from `requirements.txt` (the versions this bundle was made with), "
        "then serves an OpenAI-compatible API under `/v1` and a web chat at `/` on 127.0.0.1:8000. "
        "`HOST=0.0.0.0 PORT=8080 ./start.sh` opens it to the network on another port; `PYTHON=/path/to/python "
        "./start.sh` uses a Python that already has the requirements instead of making `.venv/`.", "",
    ]
    return "\n".join(lines)


START_SH = """#!/bin/sh
# Serve this bundle's model: an OpenAI-compatible API under /v1 and a web chat at /.
# HOST (default 127.0.0.1) and PORT (default 8000) choose where; PYTHON, a Python that already has
# requirements.txt installed (otherwise .venv/ is made here on first use).
set -e
HERE="$(cd "$(dirname "$0")" && pwd)"
if [ -z "$PYTHON" ]; then
  PYTHON="$HERE/.venv/bin/python"
  if [ ! -f "$HERE/.venv/.installed" ]; then
    echo "making $HERE/.venv from requirements.txt (once)" >&2
    python3 -m venv "$HERE/.venv"
    "$PYTHON" -m pip install -q --disable-pip-version-check -r "$HERE/requirements.txt"
    touch "$HERE/.venv/.installed"
  fi
fi
export PYTHONPATH="$HERE/app${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m engine.cli serve "$HERE/model" --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}" %(args)s "$@"
"""


def _copy_engine(dst: Path) -> None:
    src = Path(__file__).resolve().parents[1]          # the engine package
    shutil.copytree(src, dst / "engine", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def export_bundle(source: str, out: str | Path, *, base: str | None = None, force: bool = False,
                  progress=print) -> Path:
    from ruamel.yaml import YAML

    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not force)):
        raise UserError(f"{out}: already exists and is not empty; choose another OUT or pass --force")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: no such folder for OUT")
    ckpt = resolve_checkpoint(source)
    if not (ckpt / "adapter_config.json").is_file():
        raise UserError(f"{ckpt}: the bundle is made from a LoRA/QLoRA run or checkpoint (no adapter_config.json)")
    meta = read_adapter_meta(ckpt)
    base = base_model_of(ckpt, base)
    run = RunDirectory(ckpt.parent) if RunDirectory(ckpt.parent).exists() else None
    recipe_text = run.config_path.read_text(encoding="utf-8") if run and run.config_path.is_file() else ""
    recipe = (YAML(typ="safe").load(recipe_text) or {}) if recipe_text else {}
    requirements = pinned_requirements()

    tmp = out.with_name(f".{out.name}.bundling")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        merge(base, str(ckpt), str(tmp / "model"), progress=progress)
        args = []
        if meta.get("prompt_template") and meta["prompt_template"] != "hf":
            args += ["--template", meta["prompt_template"]]
        if meta.get("system"):
            args += ["--system", meta["system"]]
        (tmp / "start.sh").write_text(START_SH % {"args": " ".join(shlex.quote(a) for a in args)}, encoding="utf-8")
        (tmp / "start.sh").chmod(0o755)
        (tmp / "requirements.txt").write_text(
            "# The versions this bundle was made and tested with (start.sh installs them into .venv/).\n"
            + "\n".join(requirements) + "\n", encoding="utf-8")
        if recipe_text:
            (tmp / "recipe.yaml").write_text(recipe_text, encoding="utf-8")
        _copy_engine(tmp / "app")
        name = out.resolve().name
        (tmp / "README.md").write_text(model_card(name, meta, recipe, run, f"cd {name} && ./start.sh"),
                                       encoding="utf-8")
        (tmp / "tunedeck-bundle.json").write_text(json.dumps(
            {"source": str(ckpt.resolve()), "base_model": base, "meta": meta}, ensure_ascii=False, indent=1) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
