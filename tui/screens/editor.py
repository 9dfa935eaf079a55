"""Editor: a form built from the recipe schema — each field with its help, type-aware inputs,
inline validation with the engine's messages, a diff against the recipe it came from, save
(comments kept), save as, and "open in $EDITOR"."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, Input, Label, Select, Static, Switch

from engine.core.errors import ConfigError, UserError
from engine.recipe import catalogue

from ..dialogs import NameDialog, PathPicker
from ..messages import ConfigsChanged
from ..widgets.select import chosen


def _config():
    import engine.recipe.schema as c  # pydantic and ruamel load when the editor is first used

    return c


PATH_FIELDS = {"model.path", "data.data_path"}


def widget_id(path: str) -> str:
    return "f-" + path.replace(".", "--")


def as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value), ensure_ascii=False)
    return str(value)


class EditorPane(Vertical):

    def __init__(self, workspace: Path, **kw):
        super().__init__(**kw)
        self.workspace = workspace
        self.doc = None   # an engine.config.RecipeDocument once a recipe is open
        self._loading = False

    def compose(self) -> ComposeResult:
        yield Static("No recipe open: pick one in Configs (copy a built-in one first).", id="ed-title")
        with Horizontal(classes="buttons"):
            yield Button("Save (ctrl+s)", variant="primary", id="ed-save", disabled=True)
            yield Button("Save as", id="ed-save-as", disabled=True)
            yield Button("$EDITOR (ctrl+e)", id="ed-external", disabled=True)
            yield Static("", id="ed-status")
        yield VerticalScroll(id="ed-form")

    def _field_rows(self) -> list[Vertical]:
        """The form, built the first time a recipe is opened (not at start-up)."""
        rows = []
        for spec in _config().field_specs():
            if spec.annotation is bool:
                widget = Switch(id=widget_id(spec.path))
            elif spec.choices:
                widget = Select([(c, c) for c in spec.choices], allow_blank=False, id=widget_id(spec.path))
            else:
                widget = Input(id=widget_id(spec.path))
            parts = [widget]
            if spec.path in PATH_FIELDS:
                parts.append(Button("…", id=widget_id(spec.path) + "-pick", classes="pick"))
            rows.append(Vertical(
                Label(f"[b]{spec.path}[/b]  [dim]{spec.help}[/dim]", classes="field-label"),
                Horizontal(*parts, classes="field-input"),
                Label("", classes="field-error", id=widget_id(spec.path) + "-error"),
                classes="field", id=widget_id(spec.path) + "-row"))
        rows.append(Static("", id="ed-diff"))
        return rows

    # -- loading
    async def load(self, path: Path) -> None:
        try:
            doc = _config().RecipeDocument.load(path)
        except ConfigError as e:
            self.app.notify(str(e), severity="error")
            return
        form = self.query_one("#ed-form", VerticalScroll)
        if not form.children:
            self._loading = True
            await form.mount_all(self._field_rows())
        self.doc = doc
        self._loading = True
        try:
            for spec in _config().field_specs():
                value = self.doc.get(spec.path)
                if value is None:
                    value = spec.default
                w = self.query_one("#" + widget_id(spec.path))
                if isinstance(w, Switch):
                    w.value = bool(value)
                elif isinstance(w, Select):
                    if value in (spec.choices or ()):
                        w.value = value
                else:
                    w.value = as_text(value)
        finally:
            self._loading = False
        rel = path.relative_to(self.workspace) if self.workspace in path.resolve().parents else path
        self.query_one("#ed-title", Static).update(f"[b]{rel}[/b]")
        for b in ("#ed-save", "#ed-save-as", "#ed-external"):
            self.query_one(b, Button).disabled = False
        self.revalidate()

    # -- editing
    def _apply(self, path: str, raw: Any) -> None:
        if self.doc is None or self._loading:
            return
        spec = next(s for s in _config().field_specs() if s.path == path)
        new = _config().parse_value(raw) if isinstance(raw, str) else raw
        current = self.doc.get(path)
        if current is None:
            current = spec.default           # a key the file leaves out has its default
        if new == current or (raw == "" and current is None) or (
                isinstance(current, (list, tuple)) and isinstance(new, (list, tuple)) and list(new) == list(current)):
            return          # echoes of loading the form (widgets report their values late)
        if isinstance(raw, str) and raw == "" and not spec.required and spec.default is None:
            self.doc.unset(path)
        else:
            self.doc.set(path, raw)
        self.revalidate()

    def revalidate(self) -> list[str]:
        if self.doc is None:
            return []
        problems = self.doc.problems()
        for spec in _config().field_specs():
            mine = [p for p in problems if p.startswith(spec.path + ":") or p.startswith(spec.path + ".")]
            self.query_one("#" + widget_id(spec.path) + "-error", Label).update("\n".join(mine))
            self.query_one("#" + widget_id(spec.path) + "-row").set_class(bool(mine), "invalid")
        status = self.query_one("#ed-status", Static)
        status.update(f"[red]{len(problems)} problem(s)[/red]" if problems else "[green]valid[/green]")
        self.query_one("#ed-save", Button).disabled = bool(problems)
        self.query_one("#ed-save-as", Button).disabled = bool(problems)
        self._show_diff(problems)
        return problems

    def _show_diff(self, problems: list[str]) -> None:
        box = self.query_one("#ed-diff", Static)
        source = self.source_recipe()
        if self.doc is None or source is None or problems:
            box.update("")
            return
        try:
            base = _config().validate(_config().RecipeDocument.load(catalogue.find(source).path).data)
        except UserError:
            box.update("")
            return
        changes = _config().diff(base, self.doc.validate())
        lines = [f"[b]changed from {source}[/b]"] + [f"  {p}: {a!r} → [yellow]{b!r}[/yellow]" for p, a, b in changes]
        box.update("\n".join(lines) if changes else f"[dim]same values as {source}[/dim]")

    def source_recipe(self) -> str | None:
        if self.doc is None or self.doc.path is None:
            return None
        return catalogue.copied_from(self.doc.path)

    @on(Input.Changed)
    def input_changed(self, event: Input.Changed) -> None:
        if event.input.id and event.input.id.startswith("f-"):
            self._apply(event.input.id[2:].replace("--", "."), event.input.value)

    @on(Switch.Changed)
    def switch_changed(self, event: Switch.Changed) -> None:
        if event.switch.id and event.switch.id.startswith("f-"):
            self._apply(event.switch.id[2:].replace("--", "."), event.switch.value)

    @on(Select.Changed)
    def select_changed(self, event: Select.Changed) -> None:
        if event.select.id and event.select.id.startswith("f-") and chosen(event.select.value):
            self._apply(event.select.id[2:].replace("--", "."), event.select.value)

    @on(Button.Pressed, ".pick")
    def pick_path(self, event: Button.Pressed) -> None:
        target = "#" + (event.button.id or "").removesuffix("-pick")

        def done(value: str | None) -> None:
            if value:
                p = Path(value)
                shown = str(p.relative_to(self.workspace)) if self.workspace in p.parents else value
                self.query_one(target, Input).value = shown if shown.startswith(("/", ".")) else f"./{shown}"

        self.app.push_screen(PathPicker(self.workspace), done)

    # -- saving
    @on(Button.Pressed, "#ed-save")
    def action_save(self) -> None:
        if self.doc is None:
            return
        try:
            path = self.doc.save()
        except ConfigError as e:
            self.app.notify("\n".join(e.problems), severity="error")
            return
        self.app.notify(f"saved {path.name}")
        self.post_message(ConfigsChanged(path))

    @on(Button.Pressed, "#ed-save-as")
    def save_as(self) -> None:
        if self.doc is None or self.doc.path is None:
            return

        def done(name: str | None) -> None:
            if not name or self.doc is None:
                return
            target = self.doc.path.with_name(f"{name.removesuffix('.yaml')}.yaml")
            try:
                self.doc.save(target, overwrite=False)
            except ConfigError as e:
                self.app.notify("\n".join(e.problems), severity="error")
                return
            self.app.notify(f"saved as {target.name}")
            self.app.call_later(self.load, target)
            self.post_message(ConfigsChanged(target))

        self.app.push_screen(NameDialog("Save as (name, without .yaml):", f"{self.doc.path.stem}_2", ok="Save",
                                        input_id="save-as-name"), done)

    @on(Button.Pressed, "#ed-external")
    def action_external(self) -> None:
        if self.doc is None or self.doc.path is None:
            return
        editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
        with self.app.suspend():
            subprocess.call([*shlex.split(editor), str(self.doc.path)])
        self.app.call_later(self.load, self.doc.path)
