"""Small modal dialogs shared by the screens."""

from __future__ import annotations

from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, DirectoryTree, Input, Label


class NameDialog(ModalScreen[str | None]):
    """Ask for a name; dismisses with it (None on cancel)."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, prompt: str, default: str, ok: str = "OK", input_id: str = "name"):
        super().__init__()
        self.prompt, self.default, self.ok_label, self.input_id = prompt, default, ok, input_id

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self.prompt)
            yield Input(value=self.default, id=self.input_id)
            with Horizontal(classes="buttons"):
                yield Button(self.ok_label, variant="primary", id="ok")
                yield Button("Cancel", id="cancel")

    @on(Button.Pressed, "#ok")
    @on(Input.Submitted)
    def ok(self) -> None:
        self.dismiss(self.query_one(Input).value.strip() or None)

    @on(Button.Pressed, "#cancel")
    def cancel(self) -> None:
        self.dismiss(None)


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
