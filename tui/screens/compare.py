"""Runs side by side: their loss curves overlaid, the recipe settings that differ, and their
evaluation answers to each prompt at each checkpoint step. Pushed from Runs (mark runs with space,
then c); refreshed while any of them still trains."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Static, TabbedContent, TabPane

from engine.core.errors import UserError
from engine.train.compare import Comparison, compare_runs
from engine.train.runs import RunDirectory, format_loss

from ..widgets.plot import COLOURS, CurvesPlot


class CompareScreen(Screen):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("q", "app.pop_screen", "Back", show=False),
        Binding("1", "view('cmp-loss')", "Loss", key_display="1-3"),
        Binding("2", "view('cmp-config')", "Recipes", show=False),
        Binding("3", "view('cmp-answers')", "Answers", show=False),
    ]

    def __init__(self, runs: list[Path]):
        super().__init__()
        self.runs = [RunDirectory(p) for p in runs]
        self._signature: tuple | None = None

    def compose(self) -> ComposeResult:
        yield Static("", id="cmp-legend")
        with TabbedContent(initial="cmp-loss", id="cmp-tabs"):
            with TabPane("Loss (1)", id="cmp-loss"):
                yield CurvesPlot(id="cmp-plot")
            with TabPane("Recipe diff (2)", id="cmp-config"):
                with VerticalScroll():
                    yield Static("", id="cmp-diff")
            with TabPane("Answers (3)", id="cmp-answers"):
                with VerticalScroll():
                    yield Static("", id="cmp-evals")
        yield Footer()

    def on_mount(self) -> None:
        self.reload()
        self.set_interval(2.0, self.reload)

    def action_view(self, tab: str) -> None:
        self.query_one("#cmp-tabs", TabbedContent).active = tab

    def reload(self) -> None:
        try:
            cmp = compare_runs(self.runs)
        except UserError as e:
            self.query_one("#cmp-legend", Static).update(Text(str(e), style="red"))
            return
        signature = (tuple(len(c) for c in cmp.curves), len(cmp.answers), tuple(cmp.config_diff))
        if signature == self._signature:
            return
        self._signature = signature
        self.show(cmp)

    def show(self, cmp: Comparison) -> None:
        legend = Text("comparing ", style="bold")
        for i, (name, curve) in enumerate(zip(cmp.names, cmp.curves)):
            legend.append("  ━ ", style=COLOURS[i % len(COLOURS)])
            legend.append(name, style="bold")
            legend.append(f" {format_loss(curve[-1]) if curve else '-'} @{len(curve)}", style="dim")
        self.query_one("#cmp-legend", Static).update(legend)
        self.query_one("#cmp-plot", CurvesPlot).series = cmp.curves

        if cmp.config_diff:
            diff = Table(expand=True, show_lines=False, header_style="bold")
            diff.add_column("setting", style="bold", ratio=2, overflow="fold")
            for i, name in enumerate(cmp.names):
                diff.add_column(name, style=COLOURS[i % len(COLOURS)], ratio=3, overflow="fold")
            for key, values in cmp.config_diff:
                diff.add_row(key, *values)
            self.query_one("#cmp-diff", Static).update(diff)
        else:
            self.query_one("#cmp-diff", Static).update(Text("The runs' recipes are the same.", style="dim"))

        if cmp.answers:
            answers = Table(expand=True, show_lines=True, header_style="bold")
            answers.add_column("step", width=5, justify="right", style="dim")
            answers.add_column("prompt", ratio=2, overflow="fold", style="bold")
            for i, name in enumerate(cmp.names):
                answers.add_column(name, ratio=3, overflow="fold", header_style=COLOURS[i % len(COLOURS)])
            for step, prompt, per_run in cmp.answers:
                answers.add_row(str(step), prompt, *per_run)
            self.query_one("#cmp-evals", Static).update(answers)
        else:
            self.query_one("#cmp-evals", Static).update(
                Text("No evaluation answers yet (train.evaluation_inputs, every evaluation_freq steps).", style="dim"))
