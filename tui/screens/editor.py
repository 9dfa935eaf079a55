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
from textual.widgets import Button, Collapsible, Input, Label, Select, Static, Switch

from engine.core.errors import ConfigError, UserError
from engine.recipe import catalogue

from ..dialogs import ConfirmDialog, NameDialog, PathPicker, recipe_name_check
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
        self.doc = None   # an engine.recipe.schema.RecipeDocument once a recipe is open
        self._loading = False
        self.dirty = False            # edits not saved yet
        self.loaded_keys: set[str] = set()

    def compose(self) -> ComposeResult:
        yield Static("No recipe open: pick one in Configs (copy a built-in one first).", id="ed-title")
        with Horizontal(id="ed-buttons"):
            yield Button("Save (ctrl+s)", variant="primary", id="ed-save", disabled=True, compact=True)
            yield Button("Save as", id="ed-save-as", disabled=True, compact=True)
            yield Button("$EDITOR (ctrl+o)", id="ed-external", disabled=True, compact=True)
            yield Input(placeholder="jump to field…", id="ed-jump", compact=True)
        yield Static("", id="ed-status")
        yield VerticalScroll(id="ed-form")

    def _field_rows(self) -> list[Collapsible | Static]:
        """The form, one section per part of the recipe, built the first time a recipe is opened (not
        at start-up)."""
        sections: dict[str, list[Vertical]] = {}
        for spec in _config().field_specs():
            rows = sections.setdefault(spec.path.split(".", 1)[0], [])
            if spec.annotation is bool:
                widget = Switch(id=widget_id(spec.path))
            elif spec.choices:
                widget = Select([(c, c) for c in spec.choices], allow_blank=False, id=widget_id(spec.path),
                                compact=True)
            else:
                widget = Input(id=widget_id(spec.path), compact=True)
            parts = [widget]
            if spec.path in PATH_FIELDS:
                parts.append(Button("…", id=widget_id(spec.path) + "-pick", classes="pick", compact=True))
            rows.append(Vertical(
                Label(f"[b]{spec.path}[/b]  [dim]{spec.help}[/dim]", classes="field-label"),
                Horizontal(*parts, classes="field-input"),
                Label("", classes="field-error", id=widget_id(spec.path) + "-error"),
                classes="field", id=widget_id(spec.path) + "-row"))
        out: list[Collapsible | Static] = [Collapsible(*rows, title=name, collapsed=False, id=f"sec-{name}")
                                           for name, rows in sections.items()]
        out.append(Static("", id="ed-diff"))
        return out

    # -- loading
    async def load(self, path: Path, *, discard: bool = False) -> None:
        if self.dirty and not discard and self.doc is not None:
            name = self.doc.path.name if self.doc.path else "this recipe"

            def answered(yes: bool | None) -> None:
                if yes:
                    self.app.call_later(self.load, path, discard=True)

            self.app.push_screen(ConfirmDialog(f"{name} has unsaved changes. Discard them and open {path.name}?",
                                               yes="Discard"), answered)
            return
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
        self.loaded_keys = self._keys_in_file()
        self.query_one("#sec-llava").display = bool(self.doc.get("llava.enabled"))   # LLaVA recipes only
        self.set_dirty(False)
        for b in ("#ed-save", "#ed-save-as", "#ed-external"):
            self.query_one(b, Button).disabled = False
        self.revalidate()

    def _keys_in_file(self) -> set[str]:
        """The fields the recipe file sets (a value back at its default adds no key for the others)."""
        return {spec.path for spec in _config().field_specs() if self.doc.get(spec.path) is not None}

    def set_dirty(self, dirty: bool) -> None:
        self.dirty = dirty
        if self.doc is None or self.doc.path is None:
            return
        path = self.doc.path
        rel = path.relative_to(self.workspace) if self.workspace in path.resolve().parents else path
        mark = "  [yellow]● modified (ctrl+s saves)[/yellow]" if dirty else ""
        self.query_one("#ed-title", Static).update(f"[b]{rel}[/b]{mark}")

    @on(Input.Submitted, "#ed-jump")
    def jump(self, event: Input.Submitted) -> None:
        """Focus the first field whose name holds what was typed (lr, max_length, lora.r …)."""
        text = event.value.strip().lower()
        specs = _config().field_specs()
        match = next((s for s in specs if s.path.split(".", 1)[1] == text or s.path == text), None) or \
            next((s for s in specs if text and text in s.path), None)
        if match is None:
            self.app.notify(f"no field matches {event.value!r}", severity="warning")
            return
        self.query_one(f"#sec-{match.path.split('.', 1)[0]}", Collapsible).collapsed = False
        widget = self.query_one("#" + widget_id(match.path))
        self.screen.set_focus(widget, scroll_visible=False)   # at once: what is typed next is its value
        widget.scroll_visible(top=True, animate=False)
        event.input.value = ""

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
        default = list(spec.default) if isinstance(spec.default, tuple) else spec.default
        if (isinstance(raw, str) and raw == "" and not spec.required and spec.default is None) or (
                path not in self.loaded_keys and (list(new) if isinstance(new, tuple) else new) == default):
            self.doc.unset(path)             # back to its default: the file does not grow a key for it
        else:
            self.doc.set(path, raw)
        self.set_dirty(True)
        self.revalidate()

    def revalidate(self) -> list[str]:
        if self.doc is None:
            return []
        # a valid recipe whose local model or data is not there is still saved (it may be copied in
        # later), with a warning: starting it would fail at once
        try:
            problems, missing = [], self._missing_paths(self.doc.validate())
        except _config().ConfigError as e:
            problems, missing = e.problems, []
        for spec in _config().field_specs():
            mine = [p for p in problems if p.startswith(spec.path + ":") or p.startswith(spec.path + ".")]
            warn = [p for p in missing if p.startswith(spec.path + ":")]
            label = self.query_one("#" + widget_id(spec.path) + "-error", Label)
            label.update("\n".join(mine) or "\n".join(warn))
            label.set_class(bool(warn) and not mine, "warning")
            self.query_one("#" + widget_id(spec.path) + "-row").set_class(bool(mine), "invalid")
            self.query_one("#" + widget_id(spec.path) + "-row").set_class(bool(warn), "missing")
        status = self.query_one("#ed-status", Static)
        # the first problem in full, where it is seen without scrolling to its field
        status.update(f"[red]{len(problems)} problem(s): {problems[0]}[/red]" if problems else
                      f"[yellow]valid, but {missing[0]}[/yellow]" if missing else "[green]valid[/green]")
        self.query_one("#ed-save", Button).disabled = bool(problems)
        self.query_one("#ed-save-as", Button).disabled = bool(problems)
        self._show_diff(problems)
        return problems

    def _missing_paths(self, recipe) -> list[str]:
        """Local model, data and image paths of the recipe that are not there (relative ones are relative
        to the workspace, where the app starts runs)."""
        from engine.recipe.paths import local_path_problems, resolve_paths

        return local_path_problems(resolve_paths(recipe, self.workspace))

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
        self.loaded_keys = self._keys_in_file()
        self.set_dirty(False)
        self.app.notify(f"saved {path.name}")
        self.post_message(ConfigsChanged(path))

    @on(Button.Pressed, "#ed-save-as")
    def save_as(self) -> None:
        if self.doc is None or self.doc.path is None:
            return

        def done(name: str | None) -> None:
            if not name or self.doc is None:
                return
            try:
                target = self.doc.path.with_name(f"{catalogue.recipe_stem(name, 'name')}.yaml")
                self.doc.save(target, overwrite=False)
            except UserError as e:
                self.app.notify("\n".join(e.problems or [str(e)]), severity="error")
                return
            self.app.notify(f"saved as {target.name}")
            self.app.call_later(self.load, target)
            self.post_message(ConfigsChanged(target))

        self.app.push_screen(NameDialog("Save as (name, without .yaml):", f"{self.doc.path.stem}_2", ok="Save",
                                        input_id="save-as-name", check=recipe_name_check(self.doc.path.parent)),
                             done)

    @on(Button.Pressed, "#ed-external")
    def action_external(self) -> None:
        if self.doc is None or self.doc.path is None:
            return
        if self.dirty:                   # the editor opens the file: the form's edits would be lost
            def answered(yes: bool | None) -> None:
                if yes:
                    self.action_save()
                    if not self.dirty:
                        self.action_external()

            self.app.push_screen(ConfirmDialog("Save the form's changes first? $EDITOR opens the file as saved.",
                                               yes="Save and open"), answered)
            return
        editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
        before = self.doc.path.stat().st_mtime_ns if self.doc.path.exists() else None
        try:
            with self.app.suspend():
                rc = subprocess.call([*shlex.split(editor), str(self.doc.path)])
        except OSError as e:
            self.app.notify(f"$EDITOR ({editor}): {e.strerror or e}", severity="error")
            return
        changed = self.doc.path.exists() and self.doc.path.stat().st_mtime_ns != before
        self.app.notify(f"{editor} exited with {rc}" if rc else
                        (f"reloaded {self.doc.path.name}" if changed else f"{self.doc.path.name}: unchanged"),
                        severity="warning" if rc else "information")
        self.app.call_later(self.load, self.doc.path, discard=True)
