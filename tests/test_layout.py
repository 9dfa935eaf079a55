"""The layering in pyproject.toml's import-linter contracts holds (engine packages import only those
below them, no cycles among any package's modules, the engine never imports textual or the TUI, the
TUI never imports torch, transformers or peft), it names every engine package, and it really fails
when a lower package reaches up; the CLI module stays light."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")


def lint(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache"], cwd=cwd, capture_output=True, text=True)


def layers() -> list[str]:
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    spec = next(c for c in contracts if c["type"] == "layers")["layers"]
    return [name.strip() for line in spec for name in line.split("|")]


def test_the_import_contracts_hold():
    out = lint(REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_the_layers_name_every_engine_package():
    packages = {f"engine.{p.name}" for p in (REPO / "engine").iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(layers())
    assert not [p.name for p in (REPO / "engine").glob("*.py") if p.name != "__init__.py"], \
        "modules belong in a package"


def test_the_contracts_fail_when_a_lower_package_reaches_up(tmp_path):
    for name in ("engine", "tui"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    runs = tmp_path / "engine" / "train" / "runs.py"
    runs.write_text(runs.read_text() + "\n\ndef _up():\n    from engine.serve import server  # noqa\n")
    app = tmp_path / "tui" / "app.py"
    app.write_text(app.read_text() + "\n\ndef _heavy():\n    import torch  # noqa\n")
    out = lint(tmp_path)
    assert out.returncode != 0
    assert "engine.train.runs -> engine.serve.server" in out.stdout
    assert "tui.app -> torch" in out.stdout


def test_the_cli_module_imports_no_torch():
    code = "import sys, engine.cli; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_ruff_is_clean():
    out = subprocess.run([str(Path(sys.executable).with_name("ruff")), "check", "engine", "tui", "tests", "bench"],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:]
