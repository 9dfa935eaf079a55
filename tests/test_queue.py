"""The run queue: order, device choice with stand-in GPUs, a failing run not holding up the next,
a paused queue, and a scheduler killed with -9 and started again that starts nothing twice."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import run_cli

from engine.workflow import queue as rq
from engine.workflow.queue import Gpu


def fake_run(root: Path, name: str, state: str) -> Path:
    run = root / "work_dirs" / name
    run.mkdir(parents=True, exist_ok=True)
    (run / "status.json").write_text(json.dumps({"state": state, "pid": os.getpid(), "step": 1}))
    return run


def test_entries_start_in_order_on_free_gpus(tmp_path):
    a = rq.add(tmp_path, "a.yaml", gpus=2)
    b = rq.add(tmp_path, "b.yaml", gpus=1)
    c = rq.add(tmp_path, "c.yaml", devices=[0])
    d = rq.add(tmp_path, "d.yaml", gpus=1)
    gpus = [Gpu(0, busy=True), Gpu(1, False), Gpu(2, False), Gpu(3, False)]     # GPU 0: someone else's job
    launched = []

    def launcher(ws, entry, devices):
        launched.append((entry["config"], devices))
        return fake_run(ws, entry["config"].removesuffix(".yaml"), "running")

    for _ in range(4):
        rq.tick(tmp_path, gpus, launcher)
    # a takes two free GPUs, b the third; c waits for GPU 0 and d, behind it, is not let past
    assert launched == [("a.yaml", [1, 2]), ("b.yaml", [3])]
    states = {e["id"]: e["state"] for e in rq.read_queue(tmp_path)["entries"]}
    assert states == {a["id"]: "started", b["id"]: "started", c["id"]: "waiting", d["id"]: "waiting"}
    gpus[0] = Gpu(0, busy=False)                    # the other job ended
    rq.tick(tmp_path, gpus, launcher)
    assert launched[-1] == ("c.yaml", [0])
    fake_run(tmp_path, "b", "failed")               # b failed: its GPU is free again, and d goes on
    rq.tick(tmp_path, gpus, launcher)
    assert launched[-1] == ("d.yaml", [3])


def test_without_gpus_one_at_a_time_and_a_failure_never_blocks(tmp_path):
    for name in ("bad", "one", "two"):
        rq.add(tmp_path, f"{name}.yaml")

    def launcher(ws, entry, devices):
        if entry["config"] == "bad.yaml":
            raise rq.UserError("bad.yaml: no such recipe")
        return fake_run(ws, entry["config"].removesuffix(".yaml"), "running")

    assert rq.tick(tmp_path, None, launcher)["state"] == "failed"
    assert rq.tick(tmp_path, None, launcher)["config"] == "one.yaml"
    assert rq.tick(tmp_path, None, launcher) is None             # one trains: two waits
    fake_run(tmp_path, "one", "finished")
    rq.set_paused(tmp_path, True)
    assert rq.tick(tmp_path, None, launcher) is None             # paused
    rq.set_paused(tmp_path, False)
    assert rq.tick(tmp_path, None, launcher)["config"] == "two.yaml"
    entries = rq.read_queue(tmp_path)["entries"]
    assert entries[0]["error"] == "bad.yaml: no such recipe"
    with pytest.raises(rq.UserError, match="is started"):
        rq.remove(tmp_path, entries[1]["id"])
    rq.remove(tmp_path, entries[0]["id"])                        # a failed one leaves the list
    assert [e["config"] for e in rq.read_queue(tmp_path)["entries"]] == ["one.yaml", "two.yaml"]


def test_an_entry_left_starting_is_never_launched_again(tmp_path):
    e = rq.add(tmp_path, "a.yaml")
    with rq._locked(tmp_path) as q:                 # a scheduler killed between "starting" and the launch's end
        q["entries"][0]["state"] = "starting"
    rq.recover(tmp_path)
    assert rq.read_queue(tmp_path)["entries"][0]["state"] == "unknown"
    assert rq.tick(tmp_path, None, lambda *a: pytest.fail("launched twice")) is None
    assert e["id"]


def test_the_scheduler_survives_kill_9_and_starts_each_run_once(workspace, capsys):
    quick = ["--set", "max_steps=2", "--set", "evaluation_inputs=[]", "--set", "save_steps=100"]
    env_slow = {"TUNEDECK_FAULT_STEP_DELAY": "0.8", "TUNEDECK_QUEUE_INTERVAL_S": "0.3"}
    os.environ.update(env_slow)                     # the runs the scheduler starts inherit it
    try:
        assert run_cli("queue", "add", "demo.yaml", *quick) == 0
        assert run_cli("queue", "add", "demo.yaml", *quick) == 0
        deadline = time.time() + 30
        while (pid := rq.scheduler_pid(workspace)) is None:       # it takes its lock as it starts
            assert time.time() < deadline
            time.sleep(0.1)
        deadline = time.time() + 60
        while not any(e["state"] == "started" for e in rq.read_queue(workspace)["entries"]):
            assert time.time() < deadline, rq.read_queue(workspace)
            time.sleep(0.2)
        os.kill(pid, signal.SIGKILL)                # the scheduler dies while the first run trains
        time.sleep(0.5)
        assert rq.scheduler_pid(workspace) is None
        assert run_cli("queue", "resume") == 0      # started again
        deadline = time.time() + 120
        while not all(e["state"] == "started" for e in rq.read_queue(workspace)["entries"]):
            assert time.time() < deadline, rq.read_queue(workspace)
            time.sleep(0.3)
    finally:
        for k in env_slow:
            os.environ.pop(k, None)
        if (p := rq.scheduler_pid(workspace)):
            os.kill(p, signal.SIGKILL)
    entries = rq.read_queue(workspace)["entries"]
    runs = [e["run"] for e in entries]
    assert len(set(runs)) == 2                      # two runs, each started once
    assert sorted(p.name for p in (workspace / "work_dirs").iterdir() if not p.name.startswith(".")) == \
        sorted(Path(r).name for r in runs)
    assert run_cli("queue", "list") == 0
    out = capsys.readouterr().out
    assert out.count("started") == 2 and "scheduler pid" in out


async def test_the_runs_screen_shows_the_queue_and_edits_it(tmp_path, monkeypatch):
    """u queues the chosen recipe; the entry is a row of the run list (after the runs, in order); d takes
    it out after asking; a failed entry says why."""
    from conftest import DEMO_RECIPE
    from test_tui import built, wait_for
    from textual.widgets import DataTable, Static

    import tui.screens.runs as runs_screen
    from tui.app import TunedeckApp
    from tui.dialogs import ConfirmDialog

    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "mine.yaml").write_text(DEMO_RECIPE.read_text())
    (tmp_path / "models" / "tiny-chat").mkdir(parents=True)          # what the recipe names is there
    (tmp_path / "models" / "tiny-chat" / "config.json").write_text("{}")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "personal_assistant.jsonl").write_text("")
    started = []
    monkeypatch.setattr(runs_screen, "ensure_scheduler", lambda ws: started.append(ws))
    failed = rq.add(tmp_path, "gone.yaml")
    with rq._locked(tmp_path) as q:
        q["entries"][0].update(state="failed", error="gone.yaml: no such recipe")
    app = TunedeckApp(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await built(pilot)
        await pilot.press("3")
        await pilot.pause(0.3)
        await pilot.press("u")
        table = app.query_one("#runs-table", DataTable)
        await wait_for(pilot, lambda: table.row_count == 2, 5, "the queued row")
        names = [str(table.get_row_at(i)[1]) for i in range(2)]
        assert names == ["⧗ gone", "⧗ mine"] and started
        assert "no such recipe" in str(app.query_one("#rv-title", Static).render())       # the first row: why
        await pilot.press("down", "d")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmDialog)
        await pilot.click("#yes")
        await wait_for(pilot, lambda: table.row_count == 1, 5, "the entry to go")
    entries = rq.read_queue(tmp_path)["entries"]
    assert [e["id"] for e in entries] == [failed["id"]]
