"""The views over several runs and over the machine, driven by keys at 80x24: the comparison view
(space marks runs, c compares), the full-screen log (l: search, follow, wrap, stderr), the GPU
screen (7; NVML, or CPU and memory without it), setup progress in the run list and view, an offline
hub id failing in seconds, and quitting with a run the app started."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DEMO_RECIPE, run_cli, write_run
from test_tui import built, wait_for

SIZE = (80, 24)
CURVE_A = [3.0, 2.5, 2.1, 1.8, 1.6, 1.5]
CURVE_B = [3.0, 2.2, 1.5, 1.1, 0.9, 0.8, 0.75, 0.7]


def app_for(ws: Path):
    from tui.app import TunedeckApp

    return TunedeckApp(ws)


@pytest.fixture
def two_runs(tmp_path) -> Path:
    write_run(tmp_path, "slow_lr", CURVE_A, lr="2e-4", answers={4: "I am a language model.", 6: "I am Ada's helper."})
    time.sleep(0.01)
    write_run(tmp_path, "fast_lr", CURVE_B, lr="5e-3", answers={4: "I am Ada's assistant.", 8: "Ada's assistant."})
    return tmp_path


def test_compare_reads_curves_differences_and_answers_and_the_cli_prints_them(two_runs, capsys):
    from engine.train.compare import MISSING, compare_runs
    from engine.train.runs import RunDirectory

    runs = [RunDirectory(two_runs / "work_dirs" / n) for n in ("slow_lr", "fast_lr")]
    cmp = compare_runs(runs)
    assert cmp.curves == [CURVE_A, CURVE_B]
    assert cmp.config_diff == [("train.lr", ["0.0002", "0.005"])]          # nothing else differs
    assert cmp.answers[0] == (8, "Who are you?", [MISSING, "Ada's assistant."])   # the newest step first
    assert (4, "Who are you?", ["I am a language model.", "I am Ada's assistant."]) in cmp.answers
    os.chdir(two_runs)
    assert run_cli("compare", "slow_lr", "fast_lr", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["final_loss"] == {"slow_lr": 1.5, "fast_lr": 0.7}
    assert out["config_diff"] == [{"key": "train.lr", "values": {"slow_lr": "0.0002", "fast_lr": "0.005"}}]
    assert run_cli("compare", "slow_lr") == 2                              # one run: a user error
    assert "two or more runs" in capsys.readouterr().err


async def test_marking_two_runs_and_pressing_c_compares_them(two_runs):
    from textual.widgets import Static

    from tui.screens.compare import CompareScreen
    from tui.widgets.plot import CurvesPlot

    app = app_for(two_runs)
    notes = []
    async with app.run_test(size=SIZE) as pilot:
        await built(pilot)
        app.notify = lambda msg, **kw: notes.append(msg)
        await pilot.press("3")
        await pilot.pause()
        await pilot.press("space", "c")                  # one run marked: says what to do
        await pilot.pause()
        assert not isinstance(app.screen, CompareScreen) and any("mark two or more" in n for n in notes)
        await pilot.press("down", "space", "c")          # the newest (fast_lr) first, then slow_lr
        await wait_for(pilot, lambda: isinstance(app.screen, CompareScreen), 5, "the comparison view")
        await pilot.pause(0.3)
        screen = app.screen
        assert screen.query_one("#cmp-plot", CurvesPlot).series == [CURVE_B, CURVE_A]
        legend = str(screen.query_one("#cmp-legend", Static).render())
        assert "fast_lr 0.7000 @8" in legend and "slow_lr 1.5000 @6" in legend
        await pilot.press("2")                           # the recipe diff
        assert screen.query_one("#cmp-tabs").active == "cmp-config"
        diff = screen.query_one("#cmp-diff", Static).content
        cells = [str(c) for col in diff.columns for c in col.cells]
        assert cells == ["train.lr", "0.005", "0.0002"]
        await pilot.press("3")                           # answers side by side per step
        table = screen.query_one("#cmp-evals", Static).content
        rows = list(zip(*[[str(c) for c in col.cells] for col in table.columns]))
        assert rows[0] == ("8", "Who are you?", "Ada's assistant.", "—")
        assert ("4", "Who are you?", "I am Ada's assistant.", "I am a language model.") in rows
        await pilot.press("1", "escape")                 # digits were the view's, escape goes back
        assert not isinstance(app.screen, CompareScreen) and app.query_one("#tabs").active == "runs"


async def test_the_log_viewer_searches_follows_wraps_and_shows_stderr(tmp_path):
    from textual.widgets import Static, TextArea

    from tui.screens.logview import LogScreen

    run = write_run(tmp_path, "r1", CURVE_A, log_lines=400)
    app = app_for(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await built(pilot)
        await pilot.press("3")
        await pilot.pause()
        await pilot.press("l")
        await wait_for(pilot, lambda: isinstance(app.screen, LogScreen), 5, "the log viewer")
        screen = app.screen
        area = screen.query_one("#log-text", TextArea)
        await pilot.pause(0.2)
        assert area.document.line_count == 400 and area.cursor_location[0] == 399      # following: at the end
        with open(run / "train.log", "a") as f:
            f.write("step 401/20  loss 0.1  a new line\n")
        await wait_for(pilot, lambda: area.document.line_count == 401, 3, "the appended line")
        await pilot.pause(0.1)
        assert area.cursor_location[0] == 400 and "a new line" in area.document.get_line(400)
        await pilot.press("slash", *"line 123", "enter")             # search: the first match selected
        await pilot.pause()
        assert area.selected_text == "line 123" and area.selection.start[0] == 122
        status = str(screen.query_one("#log-status", Static).render())
        assert "follow off" in status and "/line 123: 1 of 1 line" in status
        await pilot.press(*"/line 12", "enter", "n")                # line 12, then line 120..129: next one
        assert area.selection.start[0] == 119 and area.selected_text == "line 12"
        assert "/line 12: 2 of 11 lines" in str(screen.query_one("#log-status", Static).render())
        await pilot.press("N")
        assert area.selection.start[0] == 11
        with open(run / "train.log", "a") as f:                      # not following: the match stays in view
            f.write("another line\n")
        await wait_for(pilot, lambda: area.document.line_count == 402, 3, "the second appended line")
        assert area.selection.start[0] == 11
        await pilot.press("w")
        assert area.soft_wrap and "wrap on" in str(screen.query_one("#log-status", Static).render())
        await pilot.press("e")                                       # the process's own stderr
        assert "UserWarning" in area.text and "console.log" in str(screen.query_one("#log-status", Static).render())
        await pilot.press("escape")
        assert not isinstance(app.screen, LogScreen)


def table_rows(table) -> list[list[str]]:
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


async def test_the_gpu_screen_shows_each_gpu_and_which_run_holds_it(tmp_path, two_gpus):
    from textual.widgets import DataTable, Static

    trainer = subprocess.Popen([sys.executable, "-c", "import time, subprocess, sys; "
                                "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                                "print(c.pid, flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(trainer.stdout.readline())       # a torchrun-style worker: a child of the run's process
        write_run(tmp_path, "busy", CURVE_A, state="running", pid=trainer.pid)
        two_gpus.pids = {1: [worker], 0: [999_999_999]}
        app = app_for(tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            await built(pilot)
            await pilot.press("7")
            await pilot.pause(0.3)
            rows = table_rows(app.query_one("#gpu-table", DataTable))
            assert rows[1][:3] == ["1", "H100 80GB HBM3", " 87%"] and "11.0/80G" in rows[1][3]
            assert rows[1][4:] == ["61°C", "512/700W", "busy"]
            assert rows[0][4:] == ["34°C", "71/700W", "+1 other"]
            runs = table_rows(app.query_one("#gpu-runs", DataTable))
            assert runs[0][0] == "busy" and runs[0][1] == str(trainer.pid) and runs[0][4] == "1"
            assert "CPU" in str(app.query_one("#gpu-host", Static).render())
    finally:
        trainer.kill()
        subprocess.run(["pkill", "-f", "import time; time.sleep(60)"])


async def test_without_a_gpu_the_gpu_screen_shows_cpu_and_memory(tmp_path, monkeypatch):
    from textual.widgets import DataTable, Static

    import engine.core.gpus

    monkeypatch.setattr(engine.core.gpus, "_nvml", False)           # NVML proved unusable: no driver
    app = app_for(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await built(pilot)
        await pilot.press("7")
        await pilot.pause(0.3)
        assert "No NVIDIA GPU here" in str(app.query_one("#gpu-summary", Static).render())
        assert not app.query_one("#gpu-table", DataTable).display
        host = str(app.query_one("#gpu-host", Static).render())
        assert f"of {os.cpu_count()} cores" in host and "GiB" in host


async def test_setup_progress_and_compiling_show_instead_of_an_eta(tmp_path):
    from textual.widgets import DataTable, Static

    run = write_run(tmp_path, "warming", [], state="starting", pid=os.getpid())
    status = json.loads((run / "status.json").read_text())
    (run / "status.json").write_text(json.dumps({**status, "phase": "loading the model 40%", "step": 0}))
    app = app_for(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await built(pilot)
        await pilot.press("3")
        await pilot.pause(0.3)
        table = app.query_one("#runs-table", DataTable)
        assert table_rows(table)[0][-1] == "load 40%"
        assert "loading the model 40%" in str(app.query_one("#rv-numbers", Static).render())
        (run / "status.json").write_text(json.dumps({**status, "state": "running", "phase": "compiling", "step": 0,
                                                     "eta_s": 999}))
        pane = await app.pane("runs")
        pane.tick()
        await pilot.pause()
        assert table_rows(table)[0][-1] == "compiling"


def test_a_run_reports_loading_progress_up_to_100_percent(workspace, tiny_model, monkeypatch):
    """The model-loading percentage comes from transformers' own weight loop (a private name that a new
    transformers may move: then this fails rather than the app silently showing no progress)."""
    from engine.model.loading import load_model, pick_precision

    seen: list[tuple[int, int]] = []
    load_model(str(tiny_model), precision=pick_precision("no", "float32", device="cpu"),
               progress=lambda done, total: seen.append((done, total)))
    assert seen and seen[-1][0] == seen[-1][1] and seen[-1][1] > 10
    assert all(a[0] < b[0] for a, b in zip(seen, seen[1:]))


async def test_an_offline_hub_id_fails_in_seconds_with_one_line(tmp_path, monkeypatch):
    from textual.widgets import Static

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")          # nothing listens there
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "hub.yaml").write_text(
        DEMO_RECIPE.read_text().replace("path: ./models/tiny-chat", "path: internlm/internlm2-chat-1_8b"))
    assert "internlm/internlm2-chat-1_8b" in (tmp_path / "configs" / "hub.yaml").read_text()
    from engine.data.identity import identity_records, write_identity

    write_identity(tmp_path / "data" / "personal_assistant.jsonl", identity_records("X", 3))
    app = app_for(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await built(pilot)
        await pilot.press("3")
        await pilot.pause(0.3)
        t0 = time.time()
        await pilot.press("n")
        title = app.query_one("#rv-title", Static)
        await wait_for(pilot, lambda: "failed" in str(title.render()), 60, "the run to fail")
        took = time.time() - t0
        text = str(title.render())
        assert "internlm/internlm2-chat-1_8b" in text and "hub cannot be reached" in text, text
        assert took < 30, took


async def test_quitting_with_a_run_the_app_started_asks_and_stop_saves_it(tmp_path):
    from tui.dialogs import ChoiceDialog

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run = write_run(tmp_path, "mine", CURVE_A, state="running", pid=sleeper.pid)
        app = app_for(tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            await built(pilot)
            pane = await app.pane("runs")
            pane.started.append(run)                   # as if started with n
            await pilot.press("ctrl+q")
            await pilot.pause()
            assert isinstance(app.screen, ChoiceDialog) and "the run mine (step 6/20)" in app.screen.question
            await pilot.press("escape")                # cancel: nothing happens
            await pilot.pause()
            assert app.is_running and sleeper.poll() is None
            await pilot.press("ctrl+q")
            await pilot.pause()
            await pilot.click("#choice-stop")
            await pilot.pause()
        assert sleeper.wait(10) == -15                 # asked to stop (SIGTERM: the trainer saves, then stops)
    finally:
        sleeper.kill()
