"""Once in a real terminal: tmux runs `tunedeck` in a demo workspace, send-keys drives it to the
Runs screen, capture-pane shows the run list."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_snapshots import snapshot_workspace  # noqa: F401  (the fixed workspace with one finished run)

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (.ci/run installs it)")


def capture(session: str) -> str:
    return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout


def test_tunedeck_in_tmux_shows_the_run_list(snapshot_workspace):  # noqa: F811
    exe = Path(sys.executable).with_name("tunedeck")
    session = f"tunedeck-test-{os.getpid()}"
    cmd = f"cd {snapshot_workspace} && TERM=xterm-256color {exe}"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "35", cmd], check=True)
    try:
        deadline = time.time() + 60
        while "Configs" not in capture(session) and time.time() < deadline:
            time.sleep(0.3)
        assert "Configs" in capture(session)
        subprocess.run(["tmux", "send-keys", "-t", session, "3"], check=True)
        deadline = time.time() + 20
        while "finished" not in capture(session) and time.time() < deadline:
            time.sleep(0.3)
        screen = capture(session)
        assert "run" in screen and "state" in screen and "my_demo" in screen and "finished" in screen
        assert "20/20" in screen
        subprocess.run(["tmux", "send-keys", "-t", session, "q"], check=True)
        deadline = time.time() + 20
        while time.time() < deadline:
            alive = subprocess.run(["tmux", "has-session", "-t", session], capture_output=True).returncode == 0
            if not alive:
                break
            time.sleep(0.3)
        assert not alive                                   # q quits the app and the session ends
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
