"""Data: the identity dataset wizard (name, count, answer, varied questions) and a dataset view —
record count, token-length histogram, the first samples with the masked part dimmed, errors
with file:line."""

from __future__ import annotations

import json
from pathlib import Path

from rich.text import Text
from textual import events, on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, Input, Label, Select, Static, Switch

from engine.core.errors import UserError
from engine.data.identity import DEFAULT_ANSWER, identity_records, write_identity

from ..dialogs import ConfirmDialog
from ..typing import type_into
from ..widgets.select import chosen
from ..workspace import run_engine, workspace_configs

BARS = " ▁▂▃▄▅▆▇█"


def histogram_text(hist: list[list[int]], room: int = 60) -> Text:
    """One line a bucket: its range, a bar, its count, within ``room`` columns (bars 40 at most)."""
    peak = max((c for _, _, c in hist), default=1) or 1
    width = max(4, min(40, room - 14 - 1 - len(str(peak))))
    out = Text()
    for lo, hi, c in hist:
        bar = "█" * max(1 if c else 0, round(width * c / peak))
        out.append(f"{lo:>6}-{hi:<6} ", style="dim")
        out.append(bar, style="cyan")
        out.append(f" {c}\n")
    return out


class DataPane(Horizontal):
    def __init__(self, workspace: Path, **kw):
        super().__init__(**kw)
        self.workspace = workspace

    def compose(self) -> ComposeResult:
        with Vertical(id="wizard"):
            yield Label("[b]Identity dataset[/b]")
            yield Static("[dim]the tutorial's generate_data.py: one question, the answer naming you[/dim]")
            yield Label("whose assistant")
            yield Input(placeholder="your name (type it)", id="id-name", compact=True, select_on_focus=False)
            yield Label("repetitions (n+1 records)")
            yield Input("10000", id="id-n", type="integer", compact=True)
            yield Label("answer ({name} is replaced)")
            yield Input(DEFAULT_ANSWER, id="id-answer", compact=True)
            with Horizontal(classes="field-input"):
                yield Switch(True, id="id-varied")
                yield Label(" vary the question")
            yield Label("write to (in the workspace)")
            yield Input("data/personal_assistant.json", id="id-out", compact=True)
            yield Button("Generate", variant="primary", id="id-generate", compact=True)
        with Vertical(id="dataset"):
            with Horizontal(id="ds-row"):
                yield Select([], prompt="recipe whose data to check", id="ds-config", compact=True)
                yield Button("Check", id="ds-check", compact=True)
            with VerticalScroll(id="ds-box"):
                yield Static("", id="ds-view")

    def on_mount(self) -> None:
        self.refresh_configs()

    def on_key(self, event: events.Key) -> None:
        # a name typed on the wizard's resting place (its Generate button) goes into the name field;
        # the dataset side (its recipe picker) keeps its keys
        focused = self.app.focused
        if focused is None or any(getattr(n, "id", None) == "wizard" for n in focused.ancestors_with_self):
            type_into(self, event, "#id-name")

    @on(Input.Submitted, "#wizard Input")
    def submitted(self) -> None:
        self.generate()              # enter in any of the wizard's fields generates, as its button does

    def refresh_configs(self) -> None:
        self.query_one("#ds-config", Select).set_options(
            [(p.stem, str(p)) for p in workspace_configs(self.workspace)])

    @on(Button.Pressed, "#id-generate")
    def generate(self) -> None:
        name = self.query_one("#id-name", Input).value.strip()
        where = self.query_one("#id-out", Input).value.strip()
        try:
            n = int(self.query_one("#id-n", Input).value or "0")
            recs = identity_records(name, n, self.query_one("#id-answer", Input).value,
                                    self.query_one("#id-varied", Switch).value)
        except ValueError:
            self.app.notify(f"repetitions: {self.query_one('#id-n', Input).value!r} is not a whole number",
                            severity="error")
            return
        except UserError as e:
            self.app.notify(str(e).replace("--name", "whose assistant").replace("--n", "repetitions")
                            .replace("--answer", "answer"), severity="error")
            return
        out = (self.workspace / where).resolve()
        if not where or self.workspace.resolve() not in out.parents:
            self.app.notify(f"write to: {where!r} is not a file in the workspace", severity="error")
            return

        def write(overwrite: bool | None = False) -> None:
            if overwrite is None:
                return
            try:
                write_identity(out, recs, overwrite=bool(overwrite))
            except (UserError, OSError) as e:
                self.app.notify(str(e), severity="error")
                return
            self.app.notify(f"wrote {len(recs)} records to {out.relative_to(self.workspace.resolve())}")

        if out.exists():
            self.app.push_screen(ConfirmDialog(f"{where} exists. Overwrite it with {len(recs)} records?",
                                               yes="Overwrite"), lambda yes: write(True) if yes else None)
        else:
            write()

    @on(Button.Pressed, "#ds-check")
    def check(self) -> None:
        cfg = self.query_one("#ds-config", Select).value
        if not chosen(cfg):
            self.app.notify("pick a workspace recipe", severity="warning")
            return
        self.query_one("#ds-view", Static).update(Text("tokenizing…", style="dim"))
        self._check(str(cfg))

    @work(thread=True, exclusive=True, group="data-check", exit_on_error=False)
    def _check(self, cfg: str) -> None:
        proc = run_engine(self.workspace, "data", "check", cfg, "--json", timeout=600)
        view = self.query_one("#ds-view", Static)
        if proc.returncode != 0:
            errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")] or proc.stderr.splitlines()[-3:]
            self.app.call_from_thread(view.update, Text("\n".join(errors), style="bold red"))
            return
        d = json.loads(proc.stdout.strip().splitlines()[-1])
        s = d["length"]
        out = Text()
        out.append(f"{d['data_path']}\n", style="bold")
        out.append(f"{d['records']} records · template {d['template']} · {d['truncated']} truncated to "
                   f"{d['max_length']} tokens · {d['dropped']} dropped\n")
        out.append(f"tokens: min {s['min']}  mean {s['mean']}  median {s['median']}  p95 {s['p95']}  "
                   f"max {s['max']}\n\n")
        out.append("token lengths\n", style="bold")
        out.append_text(histogram_text(d["histogram"], view.content_size.width - 2))   # a scrollbar may come
        for i, segs in enumerate(d["samples"]):
            out.append(f"\nsample {i} (masked part dimmed)\n", style="bold")
            for text, masked in segs:
                out.append(text, style="dim" if masked else "green")
            out.append("\n")
        self.app.call_from_thread(view.update, out)
