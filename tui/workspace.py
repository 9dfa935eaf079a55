"""Where the TUI's files live, and how it starts engine processes (never importing torch)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ENGINE_ROOT = Path(__file__).resolve().parent.parent


def workspace_configs(workspace: Path) -> list[Path]:
    found = []
    for d in (workspace, workspace / "configs", workspace / "config"):
        if d.is_dir():
            found += sorted(p for p in d.glob("*.yaml") if p.is_file())
    return found


def engine_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "engine.cli", *args]


def engine_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ENGINE_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_engine(workspace: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a CLI verb in the workspace; its one-line errors come back in stderr."""
    return subprocess.run(engine_command(*args), cwd=workspace, env=engine_env(), capture_output=True,
                          text=True, timeout=timeout)
