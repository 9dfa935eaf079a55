"""Configs: the built-in catalogue as a tree (family → recipe) and the workspace's own recipes;
filter as you type; YAML preview; copy a recipe into the workspace under a new name."""

from __future__ import annotations

from pathlib import Path

from textual import events, on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, Input, Static, Tree

from engine.core.errors import UserError
from engine.recipe import catalogue
from engine.recipe.xtuner import import_xtuner, write_recipe

from ..dialogs import NameDialog, PathPicker, recipe_name_check
from ..highlight import highlight_yaml
from ..messages import ConfigsChanged, EditConfig
from ..typing import type_into
from ..workspace import workspace_configs


class ConfigsPane(Vertical):

    def __init__(self, workspace: Path, **kw):
        super().__init__(**kw)
        self.workspace = workspace
        self.selected: Path | None = None

    def compose(self) -> ComposeResult:
        yield Input(placeholder="type to filter recipes (/), esc to the tree…", id="cfg-filter", compact=True,
                    select_on_focus=False)
        with Horizontal():
            tree: Tree[Path] = Tree("recipes", id="cfg-tree")
            tree.show_root = False
            yield tree
            with VerticalScroll(id="cfg-preview-box"):
                yield Static("", id="cfg-preview")
        with Horizontal(classes="buttons"):
            yield Button("Copy to workspace (F5)", id="cfg-copy", compact=True)
            yield Button("Edit (F4 / enter)", id="cfg-edit", compact=True)
            yield Button("Import XTuner .py (F6)", id="cfg-import", compact=True)

    def on_mount(self) -> None:
        self.refresh_tree()

    def on_key(self, event: events.Key) -> None:
        type_into(self, event, "#cfg-filter")     # "qwen" typed on the tree filters (and never quits)

    def refresh_tree(self, pattern: str = "", select: Path | None = None) -> None:
        tree = self.query_one("#cfg-tree", Tree)
        tree.clear()
        mine = [p for p in workspace_configs(self.workspace) if pattern.lower() in p.stem.lower()]
        ws = tree.root.add(f"workspace ({self.workspace.name})", expand=True)
        first = None
        for p in mine:
            node = ws.add_leaf(p.stem, data=p)
            first = first or node
            if select is not None and p == select:
                first = node
        families: dict[str, object] = {}
        for e in catalogue.list_cfg(pattern or None):
            fam = families.get(e.family)
            if fam is None:
                fam = families[e.family] = tree.root.add(e.family, expand=bool(pattern) or e.family == "demo")
            leaf = fam.add_leaf(e.name, data=e.path)
            first = first or leaf
        # the cursor on a recipe, never on a heading (so F5 / enter act on it); once the tree has laid out
        # its lines, and only for the newest refresh, unless someone has put it on a recipe meanwhile
        self._generation = getattr(self, "_generation", 0) + 1
        generation = self._generation

        def place() -> None:
            node = tree.cursor_node
            if first is not None and generation == self._generation and (
                    select is not None or node is None or node.data is None):
                tree.move_cursor(first)

        self.call_after_refresh(place)

    @on(Input.Changed, "#cfg-filter")
    def filter_changed(self, event: Input.Changed) -> None:
        self.refresh_tree(event.value.strip())

    @on(Tree.NodeHighlighted, "#cfg-tree")
    def highlighted(self, event: Tree.NodeHighlighted) -> None:
        path = event.node.data
        self.selected = path
        preview = self.query_one("#cfg-preview", Static)
        if path is None:
            preview.update("")
            return
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            preview.update(f"cannot read {path}: {e.strerror}")
            return
        preview.update(highlight_yaml(text))

    @on(Tree.NodeSelected, "#cfg-tree")
    def selected_node(self, event: Tree.NodeSelected) -> None:
        if event.node.data is not None:
            self.action_edit(event.node.data)

    def is_builtin(self, path: Path) -> bool:
        return catalogue.CONFIG_ROOT in path.resolve().parents

    def action_focus_filter(self) -> None:
        self.screen.set_focus(self.query_one("#cfg-filter", Input))

    def _current(self) -> Path | None:
        """The recipe under the tree's cursor (what F5 / F4 act on)."""
        node = self.query_one("#cfg-tree", Tree).cursor_node
        return node.data if node is not None else None

    @on(Button.Pressed, "#cfg-copy")
    def action_copy(self) -> None:
        src = self._current()
        if src is None:
            self.app.notify("pick a recipe first", severity="warning")
            return
        src = Path(src)

        def done(name: str | None) -> None:
            if not name:
                return
            try:
                stem = catalogue.recipe_stem(name, "name")          # the dialog's words, not --as
                target = catalogue.copy_cfg(src.stem, self.workspace / "configs", stem) if self.is_builtin(src) \
                    else self._copy_own(src, stem)
            except UserError as e:
                self.app.notify(str(e), severity="error")
                return
            self.app.notify(f"copied to {target.relative_to(self.workspace)}")
            self.refresh_tree(select=target)
            self.post_message(ConfigsChanged(target))

        dialog = NameDialog(f"Copy [b]{src.stem}[/b] into the workspace as:",
                            src.stem.replace("_alpaca_", "_self_") + "_copy", ok="Copy", input_id="new-name",
                            check=recipe_name_check(self.workspace / "configs"))
        self.app.push_screen(dialog, done)

    def _copy_own(self, src: Path, stem: str) -> Path:
        target = self.workspace / "configs" / f"{stem}.yaml"
        if target.exists():
            raise UserError(f"{target}: already exists; not overwritten")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(src.read_text(encoding="utf-8"), encoding="utf-8")   # keeps its copied-from line
        return target

    @on(Button.Pressed, "#cfg-import")
    def action_import(self) -> None:
        """An XTuner .py config into the workspace as configs/<name>.yaml, read as data (never run)."""
        def picked(path: str | None) -> None:
            if not path:
                return
            src = Path(path)
            try:
                if src.suffix != ".py":
                    raise UserError(f"{src}: not an XTuner config (a .py file)")
                got = import_xtuner(src)
                target = write_recipe(got, src, self.workspace / "configs" / f"{src.stem}.yaml")
            except UserError as e:
                self.app.notify(str(e), severity="error")
                return
            left = f"; {len(got.unmapped)} setting(s) not mapped, listed in its header" if got.unmapped else ""
            self.app.notify(f"imported {src.name} as {target.relative_to(self.workspace)}{left}")
            self.refresh_tree(select=target)
            self.post_message(ConfigsChanged(target))

        self.app.push_screen(PathPicker(self.workspace), picked)

    @on(Button.Pressed, "#cfg-edit")
    def edit_pressed(self) -> None:
        self.action_edit()

    def action_edit(self, path: Path | None = None) -> None:
        path = path or self._current() or self.selected
        if path is None:
            return
        if self.is_builtin(Path(path)):
            self.app.notify("built-in recipes are read-only: copy it into the workspace first (F5)")
            return
        self.post_message(EditConfig(Path(path)))
