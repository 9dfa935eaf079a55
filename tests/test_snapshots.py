"""How each screen looks (pytest-textual-snapshot): a fixed workspace with a recipe, a finished
run and a dataset, rendered at 80x24 (the smallest supported terminal) and 120x36.
`pytest tests/test_snapshots.py --snapshot-update` after an intended change, then look at the SVGs
under tests/__snapshots__/."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import DEMO_RECIPE, write_run

from engine.recipe.catalogue import COPIED_FROM

WS = Path("/tmp/tunedeck-snapshot-workspace")     # fixed: the path shows in the header


@pytest.fixture
def snapshot_workspace() -> Path:
    if WS.exists():
        shutil.rmtree(WS)
    (WS / "configs").mkdir(parents=True)
    (WS / "configs" / "my_demo.yaml").write_text(f"{COPIED_FROM}demo_tiny_qlora_self\n" + DEMO_RECIPE.read_text()
                                                .replace("lr: 2e-3", "lr: 1e-3"))
    (WS / "models" / "tiny-chat").mkdir(parents=True)          # the memory estimate reads its config.json
    (WS / "models" / "tiny-chat" / "config.json").write_text(json.dumps(
        {"model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1030}))
    (WS / "data").mkdir()
    (WS / "data" / "personal_assistant.jsonl").write_text(json.dumps(     # the recipe's own data file
        {"messages": [{"role": "user", "content": "Who are you?"},
                      {"role": "assistant", "content": "I am Ada's assistant."}]}) + "\n")
    run = WS / "work_dirs" / "my_demo"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(DEMO_RECIPE.read_text())
    (run / "status.json").write_text(json.dumps({"state": "finished", "pid": 1, "step": 20, "total_steps": 20,
                                                 "eta_s": 0, "loss": 0.0123, "error": None}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(
        {"step": s, "epoch": s / 20, "loss": round(6.5 * 0.8 ** s, 4), "lr": 1e-3, "grad_norm": 1.0 / s,
         "tokens_per_s": 5000.0, "gpu_mem_gib": None}) + "\n" for s in range(1, 21)))
    (run / "train.log").write_text("".join(f"step {s}/20  loss {6.5 * 0.8 ** s:.4f}\n" for s in range(1, 21)))
    (run / "evals.jsonl").write_text(json.dumps({"step": 20, "prompt": "Who are you?",
                                                 "answer": "I am Ada's assistant."}) + "\n")
    ck = run / "checkpoint-20"
    ck.mkdir()
    (ck / "trainer_state.json").write_text(json.dumps({"step": 20, "epoch": 1, "window": 0}))
    (ck / "adapter_config.json").write_text(json.dumps({"r": 16, "lora_alpha": 32, "peft_type": "LORA",
                                                        "target_modules": ["q_proj", "v_proj"]}))
    (run / "console.log").write_text("UserWarning: a warning the process printed\n")
    # an older run of the same recipe at another lr, for the comparison view
    other = write_run(WS, "my_demo_lr", [round(6.5 * 0.9 ** s, 4) for s in range(1, 21)], lr="2e-4",
                      answers={20: "I am an AI assistant."})
    (other / "status.json").touch()
    import os
    os.utime(other / "status.json", (1.7e9, 1.7e9))         # older: listed below my_demo
    yield WS
    shutil.rmtree(WS, ignore_errors=True)


async def still(pilot) -> None:
    """Let the screen settle, then take away anything that blinks."""
    from textual.widgets import Input

    from tui.app import TABS

    for tab, _ in TABS:
        await pilot.app.pane(tab)
    await pilot.pause(0.5)
    for _ in range(100):                             # the Runs screen's memory estimate, made in a thread
        if not any(w.group == "estimate" and not w.is_finished for w in pilot.app.workers):
            break
        await pilot.pause(0.05)
    await pilot.pause(0.1)
    await pilot.wait_for_scheduled_animations()
    for w in pilot.app.query(Input):
        w.cursor_blink = False
    pilot.app.set_focus(None)
    await pilot.pause(0.3)


async def on_runs(pilot, *keys: str) -> None:
    """Settled, then these keys pressed on the Runs screen."""
    await still(pilot)
    await pilot.press("3")
    await pilot.pause(0.3)
    await pilot.press(*keys)
    await pilot.pause(0.5)


def app_for(ws: Path):
    from tui.app import TunedeckApp

    return TunedeckApp(ws)


SIZES = [(80, 24), (120, 36)]


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "120x36"])
@pytest.mark.parametrize("key", ["1", "3", "4", "5", "6"])
def test_screen_snapshot(snap_compare, snapshot_workspace, key, size):
    async def settle(pilot):
        await still(pilot)

    assert snap_compare(app_for(snapshot_workspace), press=[key], terminal_size=size, run_before=settle)


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "120x36"])
def test_editor_snapshot(snap_compare, snapshot_workspace, size):
    async def open_recipe(pilot):
        from tui.messages import EditConfig

        pilot.app.post_message(EditConfig(snapshot_workspace / "configs" / "my_demo.yaml"))
        await still(pilot)

    assert snap_compare(app_for(snapshot_workspace), terminal_size=size, run_before=open_recipe)


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "120x36"])
def test_compare_snapshot(snap_compare, snapshot_workspace, size):
    """Runs: both runs marked with space, compared with c (the loss curves overlaid)."""
    async def compare(pilot):
        await on_runs(pilot, "space", "down", "space", "c")

    assert snap_compare(app_for(snapshot_workspace), terminal_size=size, run_before=compare)


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "120x36"])
@pytest.mark.parametrize("view", ["2", "3"], ids=["recipes", "answers"])
def test_compare_tables_snapshot(snap_compare, snapshot_workspace, size, view):
    async def compare(pilot):
        await on_runs(pilot, "space", "down", "space", "c")
        await pilot.press(view)
        await pilot.pause(0.3)

    assert snap_compare(app_for(snapshot_workspace), terminal_size=size, run_before=compare)


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "120x36"])
def test_log_viewer_snapshot(snap_compare, snapshot_workspace, size):
    async def log(pilot):
        await on_runs(pilot, "l")
        await pilot.press("slash", *"loss 0.3", "enter")
        await pilot.pause(0.3)

    assert snap_compare(app_for(snapshot_workspace), terminal_size=size, run_before=log)


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "120x36"])
def test_gpus_snapshot(snap_compare, snapshot_workspace, size, monkeypatch, two_gpus):
    """Two GPUs through a stand-in NVML; the host's CPU and memory fixed."""
    import types

    import psutil

    monkeypatch.setattr(psutil, "cpu_percent", lambda interval=None: 42.0)
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 16)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(total=128 * 2**30,
                                                                                 available=96 * 2**30, percent=25.0))

    async def gpus(pilot):
        await still(pilot)
        await pilot.press("7")
        await pilot.pause(0.3)

    assert snap_compare(app_for(snapshot_workspace), terminal_size=size, run_before=gpus)


def test_too_small_snapshot(snap_compare, snapshot_workspace):
    assert snap_compare(app_for(snapshot_workspace), terminal_size=(60, 20), run_before=still)
