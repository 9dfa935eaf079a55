"""The TUI driven by Pilot against the real engine on the tiny demo."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from engine.recipe import catalogue


def test_the_tui_never_imports_torch_transformers_or_peft(tmp_path):
    code = f"""
import sys, asyncio
for name in ("torch", "transformers", "peft", "bitsandbytes", "deepspeed"):
    sys.modules[name] = None          # any import of them now fails
from tui.app import TunedeckApp

async def main():
    app = TunedeckApp({str(tmp_path)!r})
    async with app.run_test(size=(100, 30)) as pilot:
        for key in ("1", "2", "3", "4", "5", "6", "1"):
            await pilot.press(key)
            await pilot.pause()
        for tab in ("configs", "editor", "runs", "chat", "files", "data"):
            await app.pane(tab)                 # each screen really built
    print("ok")

asyncio.run(main())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.stdout.strip().endswith("ok"), out.stderr[-2000:]


async def wait_for(pilot, cond, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        await pilot.pause(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def built(pilot):
    """The app is up with every screen built (they are built just after the first frame)."""
    from tui.app import Deferred

    await wait_for(pilot, lambda: not pilot.app.query(Deferred), 20, "the screens to be built")


async def test_pick_copy_edit_and_save_a_recipe(tmp_path):
    from textual.widgets import Button, Input, Label, Tree

    from tui.app import TunedeckApp

    app = TunedeckApp(tmp_path)
    async with app.run_test(size=(110, 36)) as pilot:
        await built(pilot)
        await pilot.click("#cfg-filter")
        await pilot.press(*"qlora_alpaca")
        tree = app.query_one("#cfg-tree", Tree)
        await pilot.pause()
        leaves = [n for n in tree.root.children[1].children]          # first family under the workspace node
        assert all("qlora_alpaca" in str(n.label) for n in leaves)
        target = next(n for n in leaves if str(n.label) == "internlm2_chat_1_8b_qlora_alpaca_e3")
        tree.move_cursor(target)
        await pilot.pause()
        tree.focus()
        await pilot.press("f5")
        await wait_for(pilot, lambda: app.screen.query("#new-name"), 20, "the copy dialog")
        name = app.screen.query_one("#new-name", Input)
        name.value = "internlm2_chat_1_8b_qlora_self_e2"
        await pilot.press("enter")
        await pilot.pause()
        copied = tmp_path / "configs" / "internlm2_chat_1_8b_qlora_self_e2.yaml"
        assert catalogue.copied_from(copied) == "internlm2_chat_1_8b_qlora_alpaca_e3"

        app.query_one("#configs-pane").selected = copied
        app.query_one("#configs-pane").action_edit()
        await wait_for(pilot, lambda: app.query("#f-train--lr") and app.query_one("#tabs").active == "editor",
                       30, "the editor form")
        lr = app.query_one("#f-train--lr", Input)
        lr.value = "abc"
        await pilot.pause()
        assert "train.lr: 'abc' is not allowed" in str(app.query_one("#f-train--lr-error", Label).render())
        assert app.query_one("#ed-save", Button).disabled
        lr.value = "1e-4"
        app.query_one("#f-train--max_epochs", Input).value = "2"
        await pilot.pause()
        assert str(app.query_one("#f-train--lr-error", Label).render()) == ""
        assert "changed from internlm2_chat_1_8b_qlora_alpaca_e3" in str(app.query_one("#ed-diff").render())
        await pilot.press("ctrl+s")
        await pilot.pause()
    text = copied.read_text()
    assert "lr: 1e-4" in text and "max_epochs: 2" in text, [
        ln for ln in text.splitlines() if "lr:" in ln or "epochs" in ln]
    assert "  max_norm: 1  # grad clip" in text                  # comments kept


@pytest.fixture
def run_workspace(workspace) -> Path:
    cfg = (REPO / "configs/demo/demo_tiny_qlora_self.yaml").read_text()
    cfg = cfg.replace("  seed: 0\n", "  seed: 0\n  max_steps: 80\n").replace("save_steps: 20", "save_steps: 1000")
    cfg = cfg.replace("evaluation_freq: 20", "evaluation_freq: 100")
    (workspace / "configs").mkdir()
    (workspace / "configs" / "tiny.yaml").write_text(cfg)
    (workspace / "demo.yaml").unlink()
    return workspace


async def test_start_watch_stop_resume_and_reopen_a_run(run_workspace, two_gpus, monkeypatch):
    from textual.widgets import Log, Select, Sparkline

    from engine.train.runs import RunDirectory, find_runs
    from tui.app import TunedeckApp
    from tui.widgets.plot import LossPlot

    ws = run_workspace
    # steps of at least 0.05 s, so the run is still going when the stop comes on any machine (a fast one
    # had trained all 120 steps of the run before it)
    monkeypatch.setenv("TUNEDECK_FAULT_STEP_DELAY", "0.05")
    app = TunedeckApp(ws)
    async with app.run_test(size=(120, 36)) as pilot:
        await built(pilot)
        await pilot.press("3")
        await pilot.pause()
        app.query_one("#start-config", Select).value = str(ws / "configs" / "tiny.yaml")
        gpus = app.query_one("#start-gpus", Select)            # several GPUs: choose one (or all)
        assert gpus.display and gpus.value == "0,1"
        gpus.value = "1"
        await pilot.press("n")
        await wait_for(pilot, lambda: find_runs(ws / "work_dirs"), 60, "the run to appear")
        run = RunDirectory(find_runs(ws / "work_dirs")[0].path)
        assert run.status()["devices"] == [1]
        spark = app.query_one("#rv-loss", Sparkline)
        await wait_for(pilot, lambda: len(spark.data or []) >= 5, 120, "the sparkline to gain points")
        first = len(spark.data)
        await wait_for(pilot, lambda: len(spark.data) > first, 30, "more points")
        gpu_line = str(app.query_one("#rv-gpus").render())
        assert "GPU 1 H100 80GB HBM3: 87% busy, 11.0/80 GiB" in gpu_line and "GPU 0" not in gpu_line
        await pilot.press("p")                                   # the larger loss plot instead of the log
        await pilot.pause(0.3)
        plot = app.query_one("#rv-plot", LossPlot)
        assert plot.display and not app.query_one("#rv-log", Log).display
        assert len(plot.data) >= first and "⠀" in str(plot.render())
        await pilot.press("p")
        await pilot.pause(0.2)
        assert app.query_one("#rv-log", Log).display
        await pilot.press("s")
        await wait_for(pilot, lambda: app.screen.query("#yes"), 20, "the stop confirmation")
        await pilot.press("enter")                                # the focused button is Cancel: nothing stops
        await pilot.pause(0.5)
        assert run.status().get("state") == "running"
        await pilot.press("s")
        await wait_for(pilot, lambda: app.screen.query("#yes"), 20, "the stop confirmation")
        await pilot.click("#yes")
        await pilot.pause(0.5)
        await wait_for(pilot, lambda: run.status().get("state") == "stopped", 60,
                       f"the run to stop (status {run.status()})")
        stopped_at = run.status()["step"]
        assert run.latest_checkpoint().name == f"checkpoint-{stopped_at}"
        await pilot.pause(0.6)
        await pilot.press("r")
        await wait_for(pilot, lambda: run.status().get("state") == "finished", 240, "the resumed run to finish")
        await pilot.pause(1.0)
    assert run.status()["devices"] == [1]                        # resumed on the GPU it ran on
    total = run.status()["total_steps"]
    assert [m["step"] for m in run.metrics()] == list(range(1, total + 1))
    # quit and reopen: the finished run's whole history is there
    app = TunedeckApp(ws)
    async with app.run_test(size=(120, 36)) as pilot:
        await built(pilot)
        await pilot.press("3")
        await pilot.pause(0.8)
        assert len(app.query_one("#rv-loss", Sparkline).data) == total
        assert "finished" in str(app.query_one("#rv-title").render())
        assert "step 80/80" in str(app.query_one("#rv-numbers").render())


@pytest.fixture
def trained_workspace(workspace, trained_run) -> Path:
    (workspace / "work_dirs").mkdir()
    (workspace / "work_dirs" / "demo").symlink_to(trained_run)
    return workspace


async def test_files_screen_shows_a_checkpoints_step_and_adapter_rank(trained_workspace):
    from engine.train.runs import RunDirectory
    from tui.app import TunedeckApp

    ckpt = RunDirectory(trained_workspace / "work_dirs" / "demo").latest_checkpoint()
    app = TunedeckApp(trained_workspace)
    async with app.run_test(size=(120, 36)) as pilot:
        await built(pilot)
        await pilot.press("5")
        await pilot.pause()
        pane = app.query_one("#files-pane")
        pane.show(ckpt)
        await pilot.pause()
        info = str(app.query_one("#files-info").render())
        assert f"step {ckpt.name.split('-')[1]}" in info and "LoRA rank 16" in info and "q_proj" in info
        assert app.query_one("#ckpt-actions").display
        pane.show(trained_workspace / "demo.yaml")
        await pilot.pause()
        assert "demo.yaml" in str(app.query_one("#files-info").render())
        assert not app.query_one("#ckpt-actions").display


async def test_data_screen_generates_identity_data_and_checks_a_dataset(workspace):
    import json as _json

    from textual.widgets import Input, Select, Static

    from tui.app import TunedeckApp

    app = TunedeckApp(workspace)
    async with app.run_test(size=(120, 40)) as pilot:
        await built(pilot)
        await pilot.press("6")
        await pilot.pause()
        app.query_one("#id-name", Input).value = "Ada"
        app.query_one("#id-n", Input).value = "5"
        app.query_one("#id-out", Input).value = "data/ada.json"
        await pilot.click("#id-generate")
        await pilot.pause()
        recs = _json.loads((workspace / "data" / "ada.json").read_text())
        assert len(recs) == 6 and "Ada" in recs[0]["messages"][1]["content"]
        app.query_one("#ds-config", Select).value = str(workspace / "demo.yaml")
        await pilot.click("#ds-check")
        view = app.query_one("#ds-view", Static)
        await wait_for(pilot, lambda: "records" in str(view.render()), 120, "the dataset view")
        text = str(view.render())
        assert "201 records" in text and "token lengths" in text and "sample 0" in text


async def test_chat_streams_two_different_answers_side_by_side(trained_workspace):
    """Asked before any checkpoint is picked, as a person does after training: the newest checkpoint is
    taken, the service starts, and the question goes to both sides once it is ready."""
    from textual.widgets import Select

    from engine.data.identity import DEFAULT_ANSWER
    from engine.train.runs import RunDirectory
    from tui.app import TunedeckApp

    identity = DEFAULT_ANSWER.format(name="NagatoYuki")
    ckpt = RunDirectory(trained_workspace / "work_dirs" / "demo").latest_checkpoint()
    app = TunedeckApp(trained_workspace)
    notes: list[str] = []
    async with app.run_test(size=(120, 36)) as pilot:
        await built(pilot)
        app.notify = lambda msg, **kw: notes.append(msg)
        await pilot.press("4", *"请做一下自我介绍", "enter")       # typed anywhere on Chat: the prompt
        pane = app.query_one("#chat-pane")
        assert Path(str(app.query_one("#chat-ckpt", Select).value)).resolve() == ckpt.resolve()
        assert any("newest checkpoint" in n for n in notes), notes
        left, right = app.query_one("#chat-left"), app.query_one("#chat-right")
        await wait_for(pilot, lambda: len(left.history) == 2 and len(right.history) == 2, 180, "both answers")
        assert pane.right_model is not None and pane.pending is None
        assert right.history[0]["content"] == "请做一下自我介绍"
        assert right.history[1]["content"] == identity
        assert left.history[1]["content"] and left.history[1]["content"] != identity
        assert app.service.proc is not None
    assert app.service.proc is None            # the service this app started stopped with it


async def test_opening_and_saving_a_recipe_unchanged_keeps_the_file_byte_for_byte(tmp_path):
    from tui.app import TunedeckApp
    from tui.messages import EditConfig

    src = REPO / "configs/demo/demo_tiny_qlora_self.yaml"
    mine = tmp_path / "configs" / "mine.yaml"
    mine.parent.mkdir()
    mine.write_text(src.read_text())
    app = TunedeckApp(tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await built(pilot)
        app.post_message(EditConfig(mine))
        await wait_for(pilot, lambda: app.query("#f-model--dtype"), 30, "the editor form")
        await pilot.pause(0.5)
        assert str(app.query_one("#f-model--dtype").value) == "float32"      # not the first choice
        await pilot.press("ctrl+s")
        await pilot.pause(0.3)
    assert mine.read_text() == src.read_text()
