"""A run's log, full screen: train.log or the process's own output (console.log: its stderr, with
warnings and tracebacks), searched with `/`, n and N, followed as it grows (f) and wrapped or not (w).
Pushed from Runs with l."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Input, Static, TextArea
from textual.widgets.text_area import Selection

from engine.train.runs import RunDirectory

from ..tail import LogTail

SOURCES = {"train": ("train.log", "log"), "console": ("console.log", "stdout+stderr")}


class LogScreen(Screen):
    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("q", "app.pop_screen", "Back", show=False),
        Binding("slash", "search", "Search"),
        Binding("n", "next_match(1)", "Next/prev", key_display="n/N"),
        Binding("N", "next_match(-1)", "Previous match", show=False),
        Binding("f", "follow", "Follow"),
        Binding("w", "wrap", "Wrap"),
        Binding("e", "switch_source", "stderr"),
        Binding("g", "top", "Top", show=False),
        Binding("G", "bottom", "Bottom", show=False),
    ]

    def __init__(self, run: Path, source: str = "train", max_bytes: int = 2 << 20):
        super().__init__()
        self.run = RunDirectory(run)
        self.source = source
        self.max_bytes = max_bytes
        self.follow = True
        self.query_text = ""
        self.matches = 0
        self.tail: LogTail | None = None

    def compose(self) -> ComposeResult:
        yield Static("", id="log-status")
        yield TextArea("", read_only=True, soft_wrap=False, show_line_numbers=True, id="log-text")
        yield Input(placeholder="search (enter: find, escape: back to the log)", id="log-search")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#log-search", Input).display = False
        self.open_source(self.source)
        self.set_interval(0.5, self.poll)
        self.query_one("#log-text", TextArea).focus()

    @property
    def path(self) -> Path:
        return self.run.path / SOURCES[self.source][0]

    def open_source(self, source: str) -> None:
        self.source = source
        self.tail = LogTail(self.path, self.max_bytes)
        area = self.query_one("#log-text", TextArea)
        lines = self.tail.read_new()
        area.load_text("\n".join(lines))
        if self.follow:
            self.action_bottom()
        self.show_status()

    def poll(self) -> None:
        if self.tail is None:
            return
        lines = self.tail.read_new()
        if self.tail.restarted:                      # rewritten (a new attempt): read it again
            self.open_source(self.source)
            return
        if not lines:
            return
        area = self.query_one("#log-text", TextArea)
        prefix = "\n" if area.document.text else ""
        area.insert(prefix + "\n".join(lines), area.document.end, maintain_selection_offset=True)
        if self.follow:
            self.action_bottom()
        self.show_status()

    def show_status(self) -> None:
        area = self.query_one("#log-text", TextArea)
        where = self.path.relative_to(self.run.path.parent) if self.path.is_file() else self.path
        lines = area.document.line_count if area.document.text else 0
        text = Text.assemble((f"{where}", "bold"), (f" ({SOURCES[self.source][1]})  ", "dim"),
                             (f"{lines} line{'s' if lines != 1 else ''}", "dim"), "  follow ",
                             ("on" if self.follow else "off", "green" if self.follow else "yellow"),
                             "  wrap ", ("on" if area.soft_wrap else "off", "green" if area.soft_wrap else "dim"))
        if not self.path.is_file():
            text.append(f"  (no {SOURCES[self.source][0]}: e shows the other)", style="yellow")
        if self.query_text:
            # which of the matching lines the selection is on, when it is on one
            needle, row = self.query_text.lower(), area.selection.start[0]
            at = (sum(needle in line.lower() for line in area.document.lines[:row + 1])
                  if self.matches and needle in area.document.get_line(row).lower() else 0)
            text.append(f"  /{self.query_text}: " + (f"{at} of " if at else "")
                        + f"{self.matches} line{'s' if self.matches != 1 else ''}",
                        style="magenta" if self.matches else "red")
        self.query_one("#log-status", Static).update(text)

    # -- actions
    def action_back(self) -> None:
        search = self.query_one("#log-search", Input)
        if search.has_focus:
            search.display = False
            self.query_one("#log-text", TextArea).focus()
        else:
            self.app.pop_screen()

    def action_search(self) -> None:
        search = self.query_one("#log-search", Input)
        search.display = True
        search.focus()

    @on(Input.Submitted, "#log-search")
    def searched(self, event: Input.Submitted) -> None:
        self.query_text = event.value.strip()
        event.input.display = False
        area = self.query_one("#log-text", TextArea)
        area.focus()
        needle = self.query_text.lower()
        self.matches = sum(needle in line.lower() for line in area.document.lines) if needle else 0
        if needle:
            self.follow = False                      # a match stays where it is
            self.find(1, from_start=True)
        self.show_status()

    def action_next_match(self, direction: int) -> None:
        if self.query_text:
            self.follow = False
            self.find(direction)
            self.show_status()

    def find(self, direction: int, from_start: bool = False) -> bool:
        """Select the next (or previous) occurrence of the search text after (before) the cursor,
        wrapping around the end; False when there is none."""
        area = self.query_one("#log-text", TextArea)
        text, needle = area.document.text.lower(), self.query_text.lower()
        if not needle:
            return False
        doc = area.document
        here = 0 if from_start else doc.get_index_from_location(area.selection.end if direction > 0
                                                                 else area.selection.start)
        if direction > 0:
            at = text.find(needle, here)
            at = text.find(needle) if at < 0 else at
        else:
            at = text.rfind(needle, 0, max(here, 0))
            at = text.rfind(needle) if at < 0 else at
        if at < 0:
            return False
        start, end = doc.get_location_from_index(at), doc.get_location_from_index(at + len(needle))
        area.selection = Selection(start, end)
        area.scroll_cursor_visible(center=True)
        return True

    def action_follow(self) -> None:
        self.follow = not self.follow
        if self.follow:
            self.action_bottom()
        self.show_status()

    def action_wrap(self) -> None:
        area = self.query_one("#log-text", TextArea)
        area.soft_wrap = not area.soft_wrap
        self.show_status()

    def action_switch_source(self) -> None:
        self.open_source("console" if self.source == "train" else "train")

    def action_top(self) -> None:
        self.follow = False
        area = self.query_one("#log-text", TextArea)
        area.move_cursor((0, 0))
        area.scroll_home(animate=False)
        self.show_status()

    def action_bottom(self) -> None:
        area = self.query_one("#log-text", TextArea)
        area.move_cursor(area.document.end)
        area.scroll_end(animate=False)
