"""The app in a real terminal: tmux runs `tunedeck` at 80x24, send-keys types as a person types,
capture-pane shows what they would see."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (.ci/run installs it)")


def capture(session: str) -> str:
    return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout


class Terminal:
    """`tunedeck` in a real terminal (tmux) at 80x24, driven by keys as a person types them."""

    def __init__(self, cwd: Path, size=(80, 24)):
        self.cwd, self.size = cwd, size
        self.session = f"tunedeck-journey-{os.getpid()}"

    def open(self) -> None:
        exe = Path(sys.executable).with_name("tunedeck")
        subprocess.run(["tmux", "new-session", "-d", "-s", self.session, "-x", str(self.size[0]), "-y",
                        str(self.size[1]), f"cd {self.cwd} && TERM=xterm-256color {exe}"], check=True)
        self.wait_for("▼ workspace (")                  # the Configs screen built, not only the tab bar

    def keys(self, *keys: str) -> None:
        """Keys pressed one after another without waiting for the screen, as a quick typist's arrive over
        SSH (often several in one packet). Only after Escape a pause: a key within milliseconds of it
        would be read as Alt+key, by any terminal program."""
        for k in keys:
            subprocess.run(["tmux", "send-keys", "-t", self.session, k], check=True)
            if k == "Escape":
                time.sleep(0.15)

    def type(self, text: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.session, "-l", text], check=True)

    def screen(self) -> str:
        return capture(self.session)

    def wait_for(self, text: str, timeout: float = 30) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if text in (screen := self.screen()):
                return screen
            time.sleep(0.3)
        raise AssertionError(f"{text!r} never showed; the screen:\n{self.screen()}")

    def alive(self) -> bool:
        return subprocess.run(["tmux", "has-session", "-t", self.session], capture_output=True).returncode == 0

    def wait_closed(self, timeout: float = 20) -> None:
        deadline = time.time() + timeout
        while self.alive() and time.time() < deadline:
            time.sleep(0.3)
        assert not self.alive()

    def close(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.session], capture_output=True)


def stop_recorded_service(workspace: Path) -> None:
    """A service the app left running (a failed test closes the terminal under it) ends with the test."""
    import psutil

    try:
        pid = json.loads((workspace / "work_dirs" / "service.json").read_text())["pid"]
        psutil.Process(pid).terminate()
    except (OSError, ValueError, KeyError, TypeError, psutil.Error):
        pass


def test_a_journey_at_80x24_copy_edit_train_quit_reopen_compare_merge_chat(workspace):
    """Copy a recipe, change its lr through the form, start it, quit while it trains, reopen, compare it
    with the run of the original recipe, merge a checkpoint and chat with it beside the base model, quit
    (stopping the service the app started): every step by keys at 80x24, every step checked on the
    captured screen and on disk."""
    from conftest import DEMO_RECIPE

    from engine.recipe.schema import RecipeDocument

    (workspace / "configs").mkdir()
    doc = RecipeDocument.load(DEMO_RECIPE)
    for key, value in (("max_steps", "8"), ("save_steps", "4"), ("evaluation_freq", "0"), ("evaluation_inputs", "[]")):
        doc.set(key, value)
    doc.save(workspace / "configs" / "quick.yaml")
    # the run of the original recipe that the user's copy is compared with later, started from the shell
    subprocess.run([str(Path(sys.executable).with_name("tunedeck")), "train", "configs/quick.yaml", "--detach"],
                   cwd=workspace, check=True, capture_output=True)
    t = Terminal(workspace)
    try:
        t.open()
        # typed ahead of the screen throughout: each key acts on what the keys before it opened
        t.type("quick")                                  # letters on the tree filter it
        t.keys("Escape", "F5")                           # back on the tree (on a recipe), copy it
        t.type("mine")                                   # the name, into the dialog F5 opens
        t.keys("Enter")
        t.wait_for("copied to configs/mine.yaml")
        t.keys("Enter", "/")                             # edit it, find a field
        t.type("lr")
        t.keys("Enter")                                  # the lr field, its value selected
        t.type("5e-3")
        screen = t.wait_for("modified")
        assert "train.lr" in screen                      # the form, scrolled to the field
        t.keys("Escape", "C-s")
        t.wait_for("saved mine.yaml")
        assert float(RecipeDocument.load(workspace / "configs" / "mine.yaml").get("train.lr")) == 5e-3
        t.keys("3")
        t.wait_for("Start (n)")
        t.wait_for("peak on a GPU (no GPU here")          # the chosen recipe's memory estimate
        t.keys("n")                                      # the recipe just saved is the one to start
        t.wait_for("mine  running", 90)
        t.keys("q")                                      # the app started a run: it asks what to keep
        t.wait_for("Keep it and quit")
        t.keys("BTab", "Enter")                          # keep it: the run goes on without the app
        t.wait_closed()
        run = workspace / "work_dirs" / "mine"
        deadline = time.time() + 120
        while json.loads((run / "status.json").read_text()).get("state") != "finished" and time.time() < deadline:
            time.sleep(0.5)
        assert json.loads((run / "status.json").read_text())["state"] == "finished"

        t.open()                                         # reopened: the whole history is there
        t.keys("3")
        screen = t.wait_for("mine  finished")
        assert "8/8" in screen, [ln for ln in screen.splitlines() if "mine" in ln or "step" in ln]
        t.wait_for("quick  finished", 60)
        t.keys("Space", "Down", "Space", "c")            # mark both, compare them
        screen = t.wait_for("comparing")
        assert "mine" in screen and "quick" in screen and "step 8" in screen
        t.keys("2")                                      # the recipe settings that differ: lr alone
        screen = t.wait_for("train.lr")
        row = next(ln for ln in screen.splitlines() if "train.lr" in ln)
        assert "0.005" in row and "0.002" in row, row
        t.keys("Escape")
        t.wait_for("Start (n)")
        t.keys("5")
        t.wait_for("work_dirs")
        # a folder's entries are read after it opens: a person waits to see them, and so does the test
        t.keys("Down", "Down", "Down", "Down", "Enter")   # work_dirs
        t.wait_for("quick")
        t.keys("Down", "Enter")                          # work_dirs/mine
        t.wait_for("checkpoint-8")
        t.keys("Down")                                   # work_dirs/mine/checkpoint-4
        t.wait_for("checkpoint checkpoint-4")
        t.keys("C-p")
        t.type("merge checkpoint")
        t.keys("Enter")
        t.wait_for("write the model to")
        t.keys("Enter")                                  # the offered folder, inside the workspace
        t.wait_for("merged into", 120)
        assert (workspace / "merged" / "mine-checkpoint-4" / "config.json").is_file()
        t.keys("C-p")
        t.type("chat with checkpoint")
        t.keys("Enter")
        t.wait_for("ready:", 120)
        t.type("who are you")                            # typed anywhere on Chat: the prompt
        t.keys("Enter")
        deadline = time.time() + 120
        # both sides answered: each border shows its time to first token, or "no answer" where the model's
        # first token was its end of turn (a random base model may do that)
        done = lambda sc: sc.count("first token") + sc.count("no answer")      # noqa: E731
        while done(t.screen()) < 2 and time.time() < deadline:
            time.sleep(0.3)
        screen = t.screen()
        assert done(screen) == 2 and "mine-checkpoint-4" in screen and "base · " in screen, screen
        t.keys("Escape", "C-q")                          # the app started a service: it asks
        t.wait_for("Keep it and quit")
        t.keys("Tab", "Enter")                           # Stop it and quit
        t.wait_closed()
        assert not (workspace / "work_dirs" / "service.json").exists()
    finally:
        t.close()
        stop_recorded_service(workspace)


def test_a_service_outlives_a_closed_terminal_and_the_next_app_uses_it(workspace, trained_run):
    """The terminal closes (an SSH connection dropping) while the app has a service running: the service
    goes on and is recorded in the workspace, and the app opened next answers through it instead of
    starting a second copy of the model."""
    import psutil

    (workspace / "work_dirs").mkdir()
    (workspace / "work_dirs" / "demo").symlink_to(trained_run)
    record = workspace / "work_dirs" / "service.json"
    t = Terminal(workspace)
    try:
        t.open()
        t.keys("4")
        t.type("hi")
        t.keys("Enter")                                  # the newest checkpoint is taken, the service starts
        t.wait_for("ready:", 120)
        pid = json.loads(record.read_text())["pid"]
        assert psutil.pid_exists(pid)
        t.close()                                        # the terminal goes: the app gets SIGHUP
        time.sleep(1)
        assert psutil.pid_exists(pid) and json.loads(record.read_text())["pid"] == pid
        t.open()
        newest, older = sorted((p.name for p in trained_run.glob("checkpoint-*")),
                               key=lambda n: int(n.split("-")[1]), reverse=True)[:2]
        t.keys("4", "F2")                                # the checkpoint list, by key
        t.wait_for(f"/{older}")
        t.keys("Down", "Down", "Enter")                  # past the prompt and the newest: the older one
        t.type("hi")
        t.keys("Enter")
        screen = t.wait_for("ready:", 60)
        assert older in screen and newest not in screen, screen
        assert json.loads(record.read_text())["pid"] == pid
        serving = [p for p in psutil.process_iter(["cmdline", "cwd"])
                   if "serve" in (p.info["cmdline"] or []) and p.info["cwd"] == str(workspace)]
        assert [p.pid for p in serving] == [pid]                       # one copy of the model
        t.keys("Escape", "C-q")                          # not this app's service: nothing to ask
        t.wait_closed()
    finally:
        t.close()
        stop_recorded_service(workspace)


def test_the_identity_wizard_by_keys_a_name_typed_and_enter(workspace):
    """On Data a person types their name and presses enter: the dataset is written with it; enter again
    asks before overwriting, and escape keeps the file; q in a name is a letter, not quit."""
    t = Terminal(workspace)
    out = workspace / "data" / "personal_assistant.json"
    try:
        t.open()
        t.keys("6")
        t.type("Ada quick")                              # no field chosen first: typing goes to the name
        t.keys("Enter")
        t.wait_for("wrote 10001 records")
        records = json.loads(out.read_text())
        assert len(records) == 10001 and "我是Ada quick的小助手" in records[0]["messages"][1]["content"]
        before = out.read_bytes()
        t.keys("Enter")
        t.wait_for("Overwrite it")
        t.keys("Escape")
        time.sleep(0.5)
        assert out.read_bytes() == before and t.alive()
        t.keys("Escape", "C-q")
        t.wait_closed()
    finally:
        t.close()
