"""The app as a person drives it at 80x24: keys pressed, not widget values set. One test per defect a
user met: letters typed on a tree, digits after switching screens, q while typing, escape, the blank
footer, `?`, quitting with a service running, names that leave the workspace, stale chat answers,
defaults that grow the file, unsaved edits, a too-small terminal, runs that end unseen, the palette."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import DEMO_RECIPE
from test_tui import built, wait_for

from engine.recipe.catalogue import COPIED_FROM

SIZE = (80, 24)


@pytest.fixture
def ws(tmp_path) -> Path:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "mine.yaml").write_text(f"{COPIED_FROM}demo_tiny_qlora_self\n" + DEMO_RECIPE.read_text())
    (tmp_path / "configs" / "other.yaml").write_text(DEMO_RECIPE.read_text())
    return tmp_path


def finished_run(ws: Path, name: str, steps: tuple[int, ...], **status) -> Path:
    """work_dirs/NAME, finished, with a (stand-in) checkpoint at each step."""
    run = ws / "work_dirs" / name
    for step in steps:
        (run / f"checkpoint-{step}").mkdir(parents=True)
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"step": step}))
    (run / "status.json").write_text(json.dumps({"state": "finished", **status}))
    return run


def app_for(ws: Path):
    from tui.app import TunedeckApp

    return TunedeckApp(ws)


def active(app) -> str:
    return app.query_one("#tabs").active


async def test_letters_typed_on_the_configs_tree_filter_and_never_quit(ws):
    from textual.widgets import Input, Tree

    app = app_for(ws)
    async with app.run_test(size=SIZE) as pilot:
        await built(pilot)
        assert isinstance(app.focused, Tree)
        await pilot.press(*"qwen")                        # q of qwen: not quit
        await pilot.pause()
        assert app.is_running and app.query_one("#cfg-filter", Input).value == "qwen"
        tree = app.query_one("#cfg-tree", Tree)
        families = [str(n.label) for n in tree.root.children[1:]]
        assert families == ["qwen2_5"]
        await pilot.press("escape")                       # back to the tree, the filter kept
        assert isinstance(app.focused, Tree)
        app.query_one("#cfg-filter", Input).value = ""
        await pilot.press(*"internlm2")                   # the 2 of internlm2 is typed, not the Editor
        await pilot.pause()
        assert active(app) == "configs" and app.query_one("#cfg-filter", Input).value == "internlm2"


async def test_digits_after_switching_screens_switch_again_instead_of_typing(ws):
    from textual.widgets import Input

    app = app_for(ws)
    async with app.run_test(size=SIZE) as pilot:
        await built(pilot)
        for key, tab in (("2", "editor"), ("4", "chat"), ("6", "data"), ("3", "runs"), ("4", "chat"),
                         ("1", "configs")):
            await pilot.press(key)
            await pilot.pause()
            assert active(app) == tab
        assert all(not w.value or w.value in ("0", "128", "10000", "data/personal_assistant.json")
                   or w.id == "id-answer" for w in app.query(Input))        # no digit ended up in a field
        assert app.query_one("#id-name", Input).value == ""


async def test_escape_leaves_a_field_and_the_footer_never_goes_blank(ws):
    from textual.widgets import Input

    app = app_for(ws)
    async with app.run_test(size=SIZE) as pilot:
        await built(pilot)
        await pilot.press("6")
        await pilot.pause()
        app.query_one("#id-name", Input).focus()
        await pilot.pause()
        shown = [b.description for _, b, enabled, _ in app.screen.active_bindings.values() if b.show and enabled]
        assert "Leave field" in shown                     # the footer says how out, while typing
        await pilot.press(*"Ada", "escape")
        await pilot.pause()
        assert app.query_one("#id-name", Input).value == "Ada" and not isinstance(app.focused, Input)
        await pilot.press("3")                            # and a digit switches screens again
        await pilot.pause()
        assert active(app) == "runs"


async def test_question_mark_lists_the_screens_keys(ws):
    from textual.widgets import DataTable

    app = app_for(ws)
    async with app.run_test(size=SIZE) as pilot:
        await built(pilot)
        await pilot.press("3", "?")
        await wait_for(pilot, lambda: app.screen.query("#keys-table"), 10, "the keys screen")
        table = app.screen.query_one("#keys-table", DataTable)
        rows = [tuple(str(c) for c in table.get_row_at(i)) for i in range(table.row_count)]
        keys = {k for k, _ in rows}
        assert {"n", "s", "r", "d", "p", "q", "?", "ctrl+q"} <= keys and ("3", "the Runs screen") in rows
        await pilot.press("escape")
        await pilot.pause()
        assert not app.screen.query("#keys-table")


async def test_quitting_with_a_service_the_app_started_asks(ws, monkeypatch):
    app = app_for(ws)
    async with app.run_test(size=SIZE) as pilot:
        await built(pilot)
        monkeypatch.setattr(app.service, "started_here", lambda: True)
        monkeypatch.setattr(app.service, "describe", lambda: "the inference service for tiny at :8000")
        await pilot.press("3", "q")
        await wait_for(pilot, lambda: app.screen.query("#choice-keep"), 10, "the quit question")
        await pilot.press("escape")                       # stay
        await pilot.pause()
        assert app.is_running
        await pilot.press("q")
        await wait_for(pilot, lambda: app.screen.query("#choice-keep"), 10, "the quit question")
        await pilot.click("#choice-keep")
        await pilot.pause()
    assert app.service.keep                               # the service is left running


async def test_the_copy_dialog_keeps_names_inside_the_workspace(ws):
    from textual.widgets import Input, Tree

    app = app_for(ws)
    async with app.run_test(size=SIZE) as pilot:
        await built(pilot)
        tree = app.query_one("#cfg-tree", Tree)
        mine = next(n for n in tree.root.children[0].children if str(n.label) == "mine")
        tree.move_cursor(mine)
        await pilot.press("f5")
        await wait_for(pilot, lambda: app.screen.query("#new-name"), 10, "the copy dialog")
        app.screen.query_one("#new-name", Input).value = ""
        await pilot.press(*"../../evil name", "enter")
        await pilot.pause(0.3)
    assert not (ws.parent / "evil name.yaml").exists() and not list(ws.parent.glob("evil*"))
    assert sorted(p.name for p in (ws / "configs").iterdir()) == ["mine.yaml", "other.yaml"]


async def test_a_default_value_adds_no_key_and_unsaved_edits_are_never_dropped(ws):
    from textual.widgets import Input

    from tui.messages import EditConfig

    before = (ws / "configs" / "mine.yaml").read_text()
    app = app_for(ws)
    async with app.run_test(size=SIZE) as pilot:
        await built(pilot)
        app.post_message(EditConfig(ws / "configs" / "mine.yaml"))
        await wait_for(pilot, lambda: app.query("#f-train--lr") and active(app) == "editor", 30, "the editor")
        await pilot.pause(0.5)
        alpha = app.query_one("#f-llava--visual_encoder_lora_alpha", Input)
        alpha.value = "32"
        await pilot.pause()
        assert "modified" in str(app.query_one("#ed-title").render())
        alpha.value = "16"                                # back to its default
        await pilot.pause()
        await pilot.press("ctrl+s")
        await pilot.pause(0.3)
        assert (ws / "configs" / "mine.yaml").read_text() == before          # no llava key appended
        assert "modified" not in str(app.query_one("#ed-title").render())
        app.query_one("#f-train--lr", Input).value = "1e-5"
        await pilot.pause()
        app.post_message(EditConfig(ws / "configs" / "other.yaml"))     # another recipe, edits unsaved
        await wait_for(pilot, lambda: app.screen.query("#yes"), 10, "the unsaved-changes question")
        await pilot.press("escape")                       # keep them
        await pilot.pause()
        assert app.query_one("#f-train--lr", Input).value == "1e-5"
        assert "mine.yaml" in str(app.query_one("#ed-title").render())


async def test_a_terminal_below_80x24_says_so(ws):
    app = app_for(ws)
    async with app.run_test(size=(60, 20)) as pilot:
        await built(pilot)
        note = app.query_one("#too-small")
        assert note.display and "60×20" in str(note.render()) and "80×24" in str(note.render())
        assert not app.query_one("#tabs").display


async def test_a_run_that_ends_is_announced_on_any_screen(ws, monkeypatch):
    run = ws / "work_dirs" / "r1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(DEMO_RECIPE.read_text())
    status = {"state": "running", "pid": 1, "step": 3, "total_steps": 10}
    (run / "status.json").write_text(json.dumps(status))
    app = app_for(ws)
    notes, bells = [], []
    async with app.run_test(size=SIZE) as pilot:
        await built(pilot)
        monkeypatch.setattr(app, "notify", lambda msg, **kw: notes.append((msg, kw.get("severity"))))
        monkeypatch.setattr(app, "bell", lambda: bells.append(1))
        pane = await app.pane("runs")
        pane.tick()
        await pilot.press("5")                           # the user is elsewhere
        (run / "status.json").write_text(json.dumps({**status, "state": "failed", "error": "CUDA out of memory"}))
        pane.tick()
        await pilot.pause()
    assert ("r1 failed: CUDA out of memory", "error") in notes and bells


async def test_changing_the_checkpoint_clears_both_sides(ws):
    from textual.widgets import Select

    app = app_for(ws)
    async with app.run_test(size=SIZE) as pilot:
        await built(pilot)
        pane = await app.pane("chat")
        for side in ("#chat-left", "#chat-right"):
            t = pane.query_one(side)
            t.ask("who are you?")
            t.piece("the old model's answer")
            t.done("who are you?")
        sel = pane.query_one("#chat-ckpt", Select)
        sel.set_options([("run-checkpoint-4", str(ws / "nowhere"))])
        sel.value = str(ws / "nowhere")
        await pilot.pause(0.3)
        assert all("old model" not in str(pane.query_one(s).text) and not pane.query_one(s).history
                   for s in ("#chat-left", "#chat-right"))


async def test_the_palette_lists_tunedecks_actions_first(ws):
    from textual.command import CommandList

    app = app_for(ws)
    async with app.run_test(size=(100, 30)) as pilot:
        await built(pilot)
        await pilot.press("ctrl+p")
        await pilot.pause(0.5)
        options = app.screen.query_one(CommandList)
        names = [str(options.get_option_at_index(i).prompt).split("\n")[0] for i in range(options.option_count)]
        assert names[0] == "Show Configs"
        for wanted in ("Save recipe as", "Merge checkpoint", "Check a recipe's data", "Archive or delete run"):
            assert wanted in names
        tunedeck = max(names.index(n) for n in names if n.startswith(("Show ", "Keys of")))
        assert all(names.index(n) > tunedeck for n in ("Quit", "Keys") if n in names)   # Textual's after ours


async def test_the_data_wizard_confines_its_file_and_asks_before_overwriting(ws):
    from textual.widgets import Input

    app = app_for(ws)
    notes = []
    async with app.run_test(size=SIZE) as pilot:
        await built(pilot)
        app.notify = lambda msg, **kw: notes.append(msg)
        await pilot.press("6")
        app.query_one("#id-name", Input).value = "Ada"
        app.query_one("#id-n", Input).value = "3"
        app.query_one("#id-out", Input).value = "../outside.json"
        await pilot.click("#id-generate")
        await pilot.pause()
        assert not (ws.parent / "outside.json").exists() and "not a file in the workspace" in notes[-1]
        (ws / "data").mkdir()
        (ws / "data" / "mine.json").write_text("[]")
        app.query_one("#id-out", Input).value = "data/mine.json"
        await pilot.pause(0.3)                            # a button takes no second press within 0.2 s
        await pilot.click("#id-generate")
        await wait_for(pilot, lambda: app.screen.query("#yes"), 10, "the overwrite question")
        await pilot.press("escape")
        await pilot.pause()
        assert (ws / "data" / "mine.json").read_text() == "[]"                # not without asking
        assert not any("--force" in n or "-o" in n for n in notes)



async def test_at_80x24_the_run_log_keeps_eight_rows_and_pickers_stay_on_one_line(ws):
    run = ws / "work_dirs" / "r1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(DEMO_RECIPE.read_text())
    (run / "status.json").write_text(json.dumps({"state": "finished", "pid": 1, "step": 3, "total_steps": 3}))
    (run / "train.log").write_text("".join(f"line {i}\n" for i in range(40)))
    app = app_for(ws)
    async with app.run_test(size=SIZE) as pilot:
        await built(pilot)
        await pilot.press("3")
        await wait_for(pilot, lambda: "line 39" in "".join(app.query_one("#rv-log").lines), 10, "the log")
        assert app.query_one("#rv-log").content_region.height >= 8
        for picker in ("#start-config", "#start-deepspeed"):
            assert app.query_one(picker).region.height == 1
        await pilot.press("4")
        await pilot.pause()
        for widget in ("#chat-ckpt", "#chat-temperature", "#chat-max-tokens", "#chat-input"):
            assert app.query_one(widget).region.height == (3 if widget == "#chat-input" else 1)
        assert app.query_one("#chat-left").region.height >= 6


def burst(app, keys: str | list[str]) -> None:
    """Keys arriving together, as over SSH where one packet carries several: all posted to the app
    before it handles the first (Pilot.press waits between keys; a person's terminal does not)."""
    from textual import events
    from textual.keys import _character_to_key

    for k in keys:
        char = k if len(k) == 1 else ("\r" if k == "enter" else None)
        app.post_message(events.Key(_character_to_key(k) if len(k) == 1 else k, char))


async def test_keys_typed_ahead_reach_what_the_keys_before_them_opened(ws):
    """`/lr⏎5e-3` in one packet sets lr (the keys behind `/` went to the form and were lost); F5 and the
    new name in one packet name the copy (the name went to the Configs filter); a digit and the keys
    after it act on the new screen."""
    from textual.widgets import Input

    from engine.recipe.schema import RecipeDocument

    app = app_for(ws)
    async with app.run_test(size=SIZE) as pilot:
        await built(pilot)
        burst(app, [*"mine", "escape", "f5", *"copy", "enter"])
        await wait_for(pilot, lambda: (ws / "configs" / "copy.yaml").is_file(), 10, "the copy")
        assert app.query_one("#cfg-filter", Input).value == "mine"
        await pilot.pause(0.3)
        burst(app, ["enter"])                            # edit the copy (the cursor is on it)
        await wait_for(pilot, lambda: "copy.yaml" in str(app.query_one("#ed-title").render()), 10, "the editor")
        burst(app, [*"/lr", "enter", *"5e-3", "escape", "ctrl+s", "3"])
        await wait_for(pilot, lambda: active(app) == "runs", 10, "the Runs screen")
        await pilot.pause(0.3)
        assert float(RecipeDocument.load(ws / "configs" / "copy.yaml").get("train.lr")) == 5e-3
        assert app.query_one("#ed-jump", Input).value == ""


async def test_asking_on_chat_without_any_checkpoint_says_what_to_do(ws):
    app = app_for(ws)
    notes: list[str] = []
    async with app.run_test(size=SIZE) as pilot:
        await built(pilot)
        app.notify = lambda msg, **kw: notes.append(msg)
        await pilot.press("4", *"hi", "enter")
        await pilot.pause()
        assert notes == ["no checkpoint to chat with yet: train a run first (3 Runs)"]
        assert app.query_one("#chat-input").value == "hi"        # kept, not thrown away
        assert app.query_one("#chat-pane").pending is None


@pytest.mark.parametrize("answer", ["save", "discard"])
async def test_quitting_with_unsaved_edits_asks_and_saves_or_discards_them(ws, answer):
    """q with the form edited asks first: escape keeps the app and the edit; Save and quit writes the
    file (and with a value the schema refuses it stays open and says why); Quit without saving leaves
    the file as it was."""
    from engine.recipe.schema import RecipeDocument

    path = ws / "configs" / "mine.yaml"
    before = path.read_text()
    app = app_for(ws)
    async with app.run_test(size=SIZE) as pilot:
        await built(pilot)
        await pilot.press(*"mine", "escape", "enter", "/", *"lr", "enter", *"abc")
        await wait_for(pilot, lambda: "modified" in str(app.query_one("#ed-title").render()), 10, "the edit")
        await pilot.press("escape", "q")
        await wait_for(pilot, lambda: app.screen.query("#choice-save"), 10, "the unsaved-changes question")
        await pilot.press("escape")                           # Cancel: nothing is lost
        await pilot.pause()
        assert app.is_running and "modified" in str(app.query_one("#ed-title").render())
        if answer == "save":
            await pilot.press("q")
            await wait_for(pilot, lambda: app.screen.query("#choice-save"), 10, "the question")
            await pilot.click("#choice-save")                 # 'abc' is no learning rate: not saved
            await pilot.pause(0.3)
            assert app.is_running and path.read_text() == before
            await pilot.press("/", *"lr", "enter", *"3e-4", "escape", "q")
            await wait_for(pilot, lambda: app.screen.query("#choice-save"), 10, "the question")
            await pilot.click("#choice-save")
            await wait_for(pilot, lambda: not app.is_running, 10, "the app to close")
            assert float(RecipeDocument.load(path).get("train.lr")) == 3e-4
        else:
            await pilot.press("q")
            await wait_for(pilot, lambda: app.screen.query("#choice-discard"), 10, "the question")
            await pilot.click("#choice-discard")
            await wait_for(pilot, lambda: not app.is_running, 10, "the app to close")
            assert path.read_text() == before


async def test_asking_again_retries_a_checkpoint_that_failed_to_start(ws):
    """A checkpoint whose start failed (here it names no base model) is tried again when a question is
    asked; the question never waits on a failure: it goes back into the prompt."""
    ck = finished_run(ws, "broken", (1,)) / "checkpoint-1"
    app = app_for(ws)
    async with app.run_test(size=SIZE) as pilot:
        await built(pilot)
        pane = app.query_one("#chat-pane")
        tries = []
        real = pane._connect_lora
        pane._connect_lora = lambda c: tries.append(c) or real(c)
        await pilot.press("4", *"hi", "enter")                   # the newest checkpoint: this one
        await wait_for(pilot, lambda: "no tunedeck.json" in str(pane.query_one("#chat-status").render()), 10,
                       "the failure")
        await wait_for(pilot, lambda: pane.query_one("#chat-input").value == "hi", 10, "the question back")
        assert pane.pending is None
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(tries) == 2, 10, "a second try")
        await wait_for(pilot, lambda: pane.query_one("#chat-input").value == "hi", 10, "the question back again")
        assert tries == [ck, ck] and pane.pending is None


async def test_keys_typed_while_the_app_is_busy_wait_for_it(ws, monkeypatch):
    """While the app is busy (here opening the editor takes 2.5 s, as on a loaded machine; the keys
    had been let through after 2 s) the keys typed behind Enter wait for it and still reach lr."""
    import asyncio

    from textual.widgets import Input

    from engine.recipe.schema import RecipeDocument
    from tui.screens.editor import EditorPane

    real = EditorPane.load

    async def slow_load(self, *a, **k):
        await asyncio.sleep(2.5)
        return await real(self, *a, **k)

    monkeypatch.setattr(EditorPane, "load", slow_load)
    app = app_for(ws)
    async with app.run_test(size=SIZE) as pilot:
        await built(pilot)
        burst(app, [*"mine", "escape", "enter", *"/lr", "enter", *"5e-3", "escape", "ctrl+s"])
        lr = lambda: float(RecipeDocument.load(ws / "configs" / "mine.yaml").get("train.lr"))   # noqa: E731
        await wait_for(pilot, lambda: lr() != 2e-3, 30, "the save")   # a loaded machine: time, not order
        assert lr() == 5e-3
        assert app.query_one("#ed-jump", Input).value == ""


async def test_keys_typed_on_a_screen_not_built_yet_wait_for_it(ws):
    """Right after start the hidden screens are still being built: a digit and a question typed behind
    it go to that screen once it is there (they went nowhere)."""
    app = app_for(ws)
    notes: list[str] = []
    async with app.run_test(size=SIZE) as pilot:
        app.notify = lambda msg, **kw: notes.append(msg)
        burst(app, ["4", *"hi", "enter"])                 # before any screen but Configs is built
        await wait_for(pilot, lambda: notes, 10, "the Chat screen to take the question")
        assert notes == ["no checkpoint to chat with yet: train a run first (3 Runs)"]
        assert app.query_one("#chat-input").value == "hi"


async def test_a_name_typed_on_data_goes_into_the_wizard_and_enter_writes_it(ws):
    """Letters typed on Data with no field chosen are the name (its first letter too, a capital), `q` is
    one of them, and enter writes the dataset."""
    app = app_for(ws)
    notes: list[str] = []
    async with app.run_test(size=SIZE) as pilot:
        await built(pilot)
        app.notify = lambda msg, **kw: notes.append(msg)
        burst(app, ["6", *"Quinn", "enter"])
        await wait_for(pilot, lambda: notes, 10, "the dataset to be written")
        assert app.is_running and notes == ["wrote 10001 records to data/personal_assistant.json"]
        records = json.loads((ws / "data" / "personal_assistant.json").read_text())
        assert "我是Quinn的小助手" in records[0]["messages"][1]["content"]


async def test_f2_on_chat_opens_the_checkpoint_list_and_enter_picks_one(ws):
    from textual.widgets import Select

    finished_run(ws, "r1", (4, 8))
    app = app_for(ws)
    async with app.run_test(size=SIZE) as pilot:
        await built(pilot)
        pane = app.query_one("#chat-pane")
        picked = []
        pane._connect = lambda c: picked.append(c)                # no service: which one was picked
        await pilot.press("4", "f2")
        await pilot.pause()
        assert app.query_one("#chat-ckpt", Select).expanded
        await pilot.press("down", "down", "enter")               # past the prompt and the newest
        await wait_for(pilot, lambda: picked, 10, "a checkpoint picked")
        assert picked == [ws / "work_dirs" / "r1" / "checkpoint-4"]
        await pilot.press(*"hi")                                  # and typing goes to the prompt again
        assert app.query_one("#chat-input").value == "hi"

    empty = app_for(ws.parent / "empty")
    (ws.parent / "empty").mkdir()
    notes: list[str] = []
    async with empty.run_test(size=SIZE) as pilot:
        await built(pilot)
        empty.notify = lambda msg, **kw: notes.append(msg)
        await pilot.press("4", "f2")
        await wait_for(pilot, lambda: notes, 10, "the note")
        assert notes == ["no checkpoint to chat with yet: train a run first (3 Runs)"]


async def test_a_model_path_that_is_not_there_is_a_warning_in_the_editor_and_saves(ws):
    """A mistyped local model folder: the recipe is still valid and saves (the folder may come later), but
    the editor says at once that it is not there, instead of a run failing when it starts."""
    from engine.recipe.schema import RecipeDocument

    (ws / "models" / "tiny-chat").mkdir(parents=True)
    (ws / "models" / "tiny-chat" / "config.json").write_text("{}")
    (ws / "data").mkdir()
    (ws / "data" / "d.jsonl").write_text("")
    doc = RecipeDocument.load(ws / "configs" / "mine.yaml")
    doc.set("model.path", "./models/tiny-chat")
    doc.set("data.data_path", "./data/d.jsonl")
    doc.save()
    app = app_for(ws)
    async with app.run_test(size=SIZE) as pilot:
        await built(pilot)
        status = lambda: str(app.query_one("#ed-status").render())     # noqa: E731
        await pilot.press(*"mine", "escape", "enter")
        await wait_for(pilot, lambda: status() == "valid", 10, "the recipe, valid")
        await pilot.press("/", *"path", "enter", *"./models/tiny-chta", "escape")
        await wait_for(pilot, lambda: "valid, but" in status(), 10, "the warning")
        assert status() == f"valid, but model.path: '{ws}/models/tiny-chta': no such model directory"
        assert not app.query_one("#ed-save").disabled
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: RecipeDocument.load(ws / "configs" / "mine.yaml").get("model.path")
                       == "./models/tiny-chta", 10, "the save")
        await pilot.press("/", *"path", "enter", *"./models/tiny-chat", "escape")
        await wait_for(pilot, lambda: status() == "valid", 10, "the warning gone")


async def test_f3_then_an_image_path_and_enter_leads_on_to_the_question(ws):
    """LLaVA on Chat: F3 is the image field; enter on a path that is there goes on to the prompt (the
    question typed next had gone into the path), on one that is not it says so and stays."""
    from PIL import Image
    from textual.widgets import Input

    Image.new("RGB", (8, 8), "red").save(ws / "red.png")
    app = app_for(ws)
    notes: list[str] = []
    async with app.run_test(size=SIZE) as pilot:
        await built(pilot)
        app.notify = lambda msg, **kw: notes.append(msg)
        await pilot.press("4", "f3")
        await pilot.pause()
        assert notes == ["images are for LLaVA checkpoints: pick one with F2"]
        app.query_one("#chat-pane").set_llava(True)              # as a LLaVA checkpoint's service does
        await pilot.press("f3", *"rde.png", "enter")
        await pilot.pause()
        assert notes[-1] == f"image: {ws}/rde.png: no such image"
        assert app.focused is app.query_one("#chat-image")
        await pilot.press("f3", *"red.png", "enter", *"What colour?")
        await pilot.pause()
        assert app.query_one("#chat-image", Input).value == "red.png"
        assert app.query_one("#chat-input", Input).value == "What colour?"


async def test_a_dataset_checked_by_keys_at_80x24_keeps_each_histogram_bar_on_its_line(workspace):
    """Data at 80x24: tab to the recipe picker, pick, tab to Check, enter; the histogram's bars fit the
    view beside their range and count (40-column bars had wrapped onto lines of their own)."""
    from textual.widgets import Static

    app = app_for(workspace)
    async with app.run_test(size=SIZE) as pilot:
        await built(pilot)
        await pilot.press("6", "tab", "enter", "down", "enter", "tab", "enter")
        view = app.query_one("#ds-view", Static)
        await wait_for(pilot, lambda: "token lengths" in str(view.render()), 120, "the dataset view")
        lines = str(view.render()).split("token lengths\n", 1)[1].split("\n\n", 1)[0].splitlines()
        assert lines and all(ln.rstrip().split()[-1].isdigit() for ln in lines), lines
        assert max(len(ln) for ln in lines) <= view.content_size.width, (view.content_size.width, lines)


async def test_r_on_a_finished_run_and_u_on_a_recipe_without_its_model_say_why_and_start_nothing(ws):
    """r on a run that finished every step reloaded the model to do nothing (and announced it finished
    again); u queued a recipe whose model is not there, to fail when its turn came."""
    from engine.workflow.queue import read_queue

    run = finished_run(ws, "r1", (3,), pid=1, step=3, total_steps=3)
    (run / "config.yaml").write_text(DEMO_RECIPE.read_text())
    app = app_for(ws)
    notes: list[str] = []
    async with app.run_test(size=SIZE) as pilot:
        await built(pilot)
        app.notify = lambda msg, **kw: notes.append(msg)
        await pilot.press("3")
        await wait_for(pilot, lambda: "r1" in str(app.query_one("#rv-title").render()), 10, "the run")
        await pilot.press("r")
        await pilot.pause()
        assert notes == ["r1 finished at step 3/3: nothing to resume"]
        await pilot.press("u")
        await pilot.pause()
        assert notes[-1].startswith("model.path: ") and notes[-1].endswith("models/tiny-chat': no such model directory")
        assert read_queue(ws)["entries"] == []
    assert json.loads((run / "status.json").read_text())["state"] == "finished"


async def test_a_name_that_is_taken_or_not_a_name_keeps_the_dialog_open_to_correct_it(ws):
    """F5 with the name of a recipe already there, then with a folder in it: the dialog stays, says why
    and keeps what was typed (it had closed with a toast, and the name was typed again from the start);
    a good name copies."""
    from textual.widgets import Input, Label

    before = (ws / "configs" / "mine.yaml").read_text()
    app = app_for(ws)
    async with app.run_test(size=SIZE) as pilot:
        await built(pilot)
        await pilot.press(*"demo_tiny_qlora", "escape", "f5")
        await wait_for(pilot, lambda: app.screen.query("#new-name"), 10, "the name dialog")
        await pilot.press(*"mine", "enter")
        await pilot.pause()
        error = lambda: str(app.screen.query_one("#dialog-error", Label).render())      # noqa: E731
        assert error() == "mine.yaml already exists in configs/; choose another name"
        assert app.screen.query_one("#new-name", Input).value == "mine"
        await pilot.press(*"/x", "enter")
        await pilot.pause()
        assert "is not a recipe name" in error()
        await pilot.press("backspace", "backspace", *"2", "enter")
        await wait_for(pilot, lambda: (ws / "configs" / "mine2.yaml").is_file(), 10, "the copy")
    assert (ws / "configs" / "mine.yaml").read_text() == before


async def test_a_merge_folder_outside_the_workspace_keeps_the_dialog_open(ws):
    """Merge with a mistyped folder that leaves the workspace, then one that holds files: the dialog stays
    and says why (nothing is merged, the folder is untouched); escape closes it."""
    from textual.widgets import Label

    ck = ws / "work_dirs" / "r1" / "checkpoint-4"
    ck.mkdir(parents=True)
    (ck / "adapter_config.json").write_text(json.dumps({"r": 8, "base_model_name_or_path": str(ws / "base")}))
    (ws / "merged" / "full").mkdir(parents=True)
    (ws / "merged" / "full" / "mine.txt").write_text("mine")
    app = app_for(ws)
    async with app.run_test(size=SIZE) as pilot:
        await built(pilot)
        pane = await app.pane("files")
        merged = []
        pane._merge = lambda *a: merged.append(a)
        pane.selected = ck                                   # the checkpoint highlighted in the tree
        await pilot.press("ctrl+p", *"merge checkpoint", "enter")
        await wait_for(pilot, lambda: app.screen.query("#merge-dest"), 10, "the merge dialog")
        await pilot.press(*"../elsewhere", "enter")
        await pilot.pause()
        error = lambda: str(app.screen.query_one("#dialog-error", Label).render())      # noqa: E731
        assert error() == f"../elsewhere: outside the workspace; give a folder under {ws}"
        await pilot.press("ctrl+u", *"merged/full", "enter")         # ctrl+u: what is left of the cursor goes
        await pilot.pause()
        assert error() == "merged/full: exists and is not an empty folder; choose another"
        await pilot.press("escape")
        await pilot.pause()
        assert not app.screen.query("#merge-dest") and merged == []
    assert (ws / "merged" / "full" / "mine.txt").read_text() == "mine" and not (ws.parent / "elsewhere").exists()


async def test_letters_on_the_files_tree_jump_to_the_entry_and_q_is_one_of_them(ws):
    """Files: "wo" typed on the tree moves to work_dirs, "qu" (after a pause) to quick.txt; q had quit."""
    import time

    from textual.widgets import DirectoryTree

    (ws / "work_dirs").mkdir()
    (ws / "quick.txt").write_text("hi")
    app = app_for(ws)
    async with app.run_test(size=SIZE) as pilot:
        await built(pilot)
        await pilot.press("5")
        tree = app.query_one("#files-tree", DirectoryTree)
        await wait_for(pilot, lambda: tree.last_line >= 3, 10, "the tree's entries")
        name = lambda: tree.cursor_node.data.path.name             # noqa: E731
        await pilot.press(*"wo")
        assert name() == "work_dirs"
        time.sleep(1.1)                                             # a pause: a new name begins
        await pilot.press(*"qu")
        assert name() == "quick.txt" and app.is_running
