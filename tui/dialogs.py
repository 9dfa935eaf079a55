"""Small modal dialogs shared by the screens."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, DirectoryTree, Input, Label


class NameDialog(ModalScreen[str | None]):
    """Ask for a name; dismisses with it (None on cancel). ``check`` says what is wrong with a name (or
    None): the dialog then stays open with the name and the reason, to be corrected."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, prompt: str, default: str, ok: str = "OK", input_id: str = "name",
                 check: Callable[[str], str | None] | None = None):
        super().__init__()
        self.prompt, self.default, self.ok_label, self.input_id = prompt, default, ok, input_id
        self.check = check

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self.prompt)
            yield Input(value=self.default, id=self.input_id)
            yield Label("", id="dialog-error")
            with Horizontal(classes="buttons"):
                yield Button(self.ok_label, variant="primary", id="ok")
                yield Button("Cancel", id="cancel")

    @on(Button.Pressed, "#ok")
    @on(Input.Submitted)
    def ok(self) -> None:
        name = self.query_one(Input).value.strip()
        problem = self.check(name) if self.check is not None and name else None
        if problem:
            self.query_one("#dialog-error", Label).update(problem)
            self.query_one(Input).focus()
            return
        self.dismiss(name or None)

    @on(Input.Changed)
    def edited(self) -> None:
        self.query_one("#dialog-error", Label).update("")

    @on(Button.Pressed, "#cancel")
    def cancel(self) -> None:
        self.dismiss(None)


def recipe_name_check(folder: Path) -> Callable[[str], str | None]:
    """For a NameDialog: what is wrong with a new recipe's name in ``folder`` (None when nothing)."""
    def check(name: str) -> str | None:
        from engine.core.errors import UserError
        from engine.recipe.catalogue import recipe_stem

        try:
            stem = recipe_stem(name, "name")
        except UserError as e:
            return str(e)
        if (folder / f"{stem}.yaml").exists():
            return f"{stem}.yaml already exists in {folder.name}/; choose another name"
        return None
    return check


class PathPicker(ModalScreen[str | None]):
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("Pick a file or folder (enter on a folder picks it; escape cancels)")
            yield DirectoryTree(str(self.root), id="picker")
            with Horizontal(classes="buttons"):
                yield Button("Use highlighted folder", id="use-dir")
                yield Button("Cancel", id="cancel")

    @on(DirectoryTree.FileSelected)
    def file_selected(self, event: DirectoryTree.FileSelected) -> None:
        self.dismiss(str(event.path))

    @on(Button.Pressed, "#use-dir")
    def use_dir(self) -> None:
        node = self.query_one(DirectoryTree).cursor_node
        if node is not None and node.data is not None:
            self.dismiss(str(node.data.path))

    @on(Button.Pressed, "#cancel")
    def cancel(self) -> None:
        self.dismiss(None)


class ConfirmDialog(ModalScreen[bool]):
    """A yes / no question; escape is no."""

    BINDINGS = [Binding("escape", "dismiss(False)", "Cancel")]

    def __init__(self, question: str, yes: str = "Yes", no: str = "Cancel"):
        super().__init__()
        self.question, self.yes, self.no = question, yes, no

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self.question)
            with Horizontal(classes="buttons"):
                yield Button(self.yes, variant="warning", id="yes")
                yield Button(self.no, id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()          # a stray enter never confirms

    @on(Button.Pressed, "#yes")
    def yes_pressed(self) -> None:
        self.dismiss(True)

    @on(Button.Pressed, "#no")
    def no_pressed(self) -> None:
        self.dismiss(False)


class KeysScreen(ModalScreen[None]):
    """`?`: every key of the current screen."""

    BINDINGS = [Binding("escape", "dismiss", "Close"), Binding("question_mark", "dismiss", "Close"),
                Binding("q", "dismiss", "Close")]

    def __init__(self, screen_name: str, rows: list[tuple[str, str]]):
        super().__init__()
        self.screen_name, self.rows = screen_name, rows

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(f"[b]Keys on {self.screen_name}[/b]  (esc closes)")
            table: DataTable = DataTable(id="keys-table", show_cursor=False, zebra_stripes=True)
            table.add_columns("key", "what it does")
            for key, what in self.rows:
                table.add_row(key, what)
            yield table


class ChoiceDialog(ModalScreen[str | None]):
    """A question with several answers (and Cancel, which escape also is); dismisses with the answer's id."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, question: str, choices: list[tuple[str, str]], warning: str | None = None):
        super().__init__()
        self.question, self.choices = question, choices
        self.warning = warning if warning is not None else choices[-1][0]     # the answer that costs something

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self.question)
            with Horizontal(classes="buttons"):
                for key, label in self.choices:
                    yield Button(label, id=f"choice-{key}", variant="warning" if key == self.warning else "default")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#cancel", Button).focus()

    @on(Button.Pressed)
    def pressed(self, event: Button.Pressed) -> None:
        bid = event.button.id or ""
        self.dismiss(bid.removeprefix("choice-") if bid.startswith("choice-") else None)
