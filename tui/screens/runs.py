"""Runs: start a run (detached), the list of runs with state and progress, and a run view that
follows the log, plots the loss and shows lr, grad norm, tokens/s, memory, ETA and evaluation
answers; stop and resume. Runs live in their own processes: quitting the app never stops one."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Button, DataTable, Log, ProgressBar, Select, Sparkline, Static

from engine.core.constants import DEEPSPEED_CHOICES
from engine.core.errors import UserError
from engine.core.gpus import list_gpus
from engine.train.runs import RunDirectory, find_runs, format_eta, format_loss
from engine.workflow.estimate import fit_line
from engine.workflow.queue import add as add_to_queue
from engine.workflow.queue import check_entry as check_queue_entry
from engine.workflow.queue import ensure_scheduler, read_queue, set_paused
from engine.workflow.queue import remove as remove_queued

from ..dialogs import ChoiceDialog, ConfirmDialog
from ..messages import ShowRun
from ..tail import JsonlTail, LogTail
from ..widgets.image import half_blocks
from ..widgets.plot import LossPlot
from ..widgets.select import chosen
from ..workspace import run_engine, workspace_configs

STATE_STYLE = {"running": "bold green", "finished": "cyan", "failed": "bold red", "stopped": "yellow",
               "starting": "green"}


def archive_run(run: Path, work_dirs: Path) -> Path:
    """Move a run out of the list, into work_dirs/.archive/ (a numbered name if it is taken)."""
    target_dir = work_dirs / ".archive"
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / run.name
    if target.exists():
        target = target_dir / f"{run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run.rename(target)
    return target


class RunView(Vertical):
    """One run, live."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.run: RunDirectory | None = None
        self.tail: LogTail | None = None
        self.losses: list[float] = []
        self._last_state: str | None = None

    def compose(self) -> ComposeResult:
        yield Static("Pick a run.", id="rv-title")
        yield ProgressBar(total=100, show_eta=False, id="rv-progress")
        yield Static("", id="rv-numbers")
        yield Static("", id="rv-gpus")
        yield Sparkline([], id="rv-loss")
        with Horizontal(id="rv-buttons"):
            yield Button("Stop (s)", id="rv-stop", variant="warning", compact=True)
            yield Button("Resume (r)", id="rv-resume", compact=True)
        yield Log(id="rv-log", max_lines=5000)
        yield LossPlot(id="rv-plot")
        with Horizontal(id="rv-evals-row"):
            yield Static("", id="rv-eval-image")           # a LLaVA run's evaluation image, beside its answers
            with VerticalScroll(id="rv-evals-box"):
                yield Static("", id="rv-evals")

    def clear(self) -> None:
        self.run = None
        self.query_one("#rv-title", Static).update("Pick a run.")
        self.query_one("#rv-numbers", Static).update("")
        self.query_one("#rv-log", Log).clear()
        self.query_one("#rv-loss", Sparkline).data = []
        self.query_one("#rv-evals", Static).update("")

    def show(self, path: Path) -> None:
        self.run = RunDirectory(path)
        self.query_one("#rv-loss", Sparkline).data = []       # not the previous run's curve for a moment
        self.tail = LogTail(self.run.log_path)
        self.metrics_tail = JsonlTail(self.run.metrics_path)
        self.evals_tail = JsonlTail(self.run.evals_path)
        self.evals: list[dict] = []
        self._last_state = None
        self.losses = []
        self.last_metric = None
        self.query_one("#rv-log", Log).clear()
        self.query_one("#rv-plot", LossPlot).data = []
        self.query_one("#rv-evals", Static).update("")
        self.query_one("#rv-eval-image", Static).display = False
        self._eval_image = None
        self.refresh_view()

    def show_entry(self, entry: dict, queue: dict) -> None:
        """A queued entry: what it waits for, or why it did not start."""
        self.run = None
        state = "paused" if queue.get("paused") and entry["state"] == "waiting" else entry["state"]
        title = Text.assemble((Path(entry["config"]).stem, "bold"), "  ", (f"queued, {state}", "magenta"))
        if entry.get("error"):
            title.append(f"\n{entry['error']}", style="red")
        self.query_one("#rv-title", Static).update(title)
        gpus = ",".join(map(str, entry["devices"])) if entry.get("devices") else f"any {entry['gpus']}"
        self.query_one("#rv-numbers", Static).update(
            f"GPUs: {gpus}  added {time.strftime('%H:%M', time.localtime(entry['added']))}  "
            "d takes it out of the queue; ctrl+p: pause or resume the queue")
        self.query_one("#rv-log", Log).clear()
        self.query_one("#rv-loss", Sparkline).data = []
        self.query_one("#rv-evals", Static).update("")

    def refresh_view(self) -> None:
        if self.run is None:
            return
        st = self.run.status()
        state = st.get("state", "unknown")
        step, total = st.get("step") or 0, st.get("total_steps") or 0
        phase = st.get("phase") if state in ("starting", "running") else None     # setup, compiling
        title = Text.assemble((self.run.path.name, "bold"), "  ", (state, STATE_STYLE.get(state, "")))
        if state == "failed" and st.get("error"):
            title.append(f"\n{st['error']}", style="red")
        self.query_one("#rv-title", Static).update(title)
        bar = self.query_one("#rv-progress", ProgressBar)
        bar.update(total=max(total, 1), progress=step)
        new = self.metrics_tail.read_records()
        if new and new[0]["step"] <= len(self.losses):   # the file was rewritten on a resume
            self.losses = self.losses[: new[0]["step"] - 1]
        if new:
            self.losses += [m["loss"] for m in new]
            self.query_one("#rv-loss", Sparkline).data = list(self.losses)
            self.query_one("#rv-plot", LossPlot).data = self.losses
            self.last_metric = new[-1]
        last = getattr(self, "last_metric", None) if self.losses else None
        if last is not None:          # every refresh: a run that has ended shows no ETA
            mem = f"{last['gpu_mem_gib']:.2f} GiB" if last.get("gpu_mem_gib") is not None else "-"
            self.query_one("#rv-numbers", Static).update(
                f"step {step}/{total}  loss {last['loss']:.4f}  lr {last['lr']:.3g}  grad norm "
                f"{last['grad_norm']:.3f}  {last.get('tokens_per_s') or 0:.0f} tok/s  mem {mem}"
                + (f"  {phase}" if phase else f"  ETA {format_eta(st.get('eta_s'))}" if state == "running" else ""))
        else:
            self.query_one("#rv-numbers", Static).update(f"step {step}/{total or '?'}"
                                                         + (f"  {phase}…" if phase else ""))
        if self.tail is not None:
            lines = self.tail.read_new()
            if lines:
                self.query_one("#rv-log", Log).write_lines(lines)
        fresh = self.evals_tail.read_records()
        if self.evals_tail.restarted:
            self.evals = []
        if fresh:
            self.evals += fresh
            evals = self.evals
            self.query_one("#rv-evals", Static).update(Text("\n").join(
                Text.assemble((f"@{e['step']} ", "dim"), (f"[{Path(e['image']).name}] " if e.get("image") else "",
                                                          "magenta"), (e["prompt"], "bold"), " → ", e["answer"])
                for e in reversed(evals[-30:])))            # the newest first
            image = next((e["image"] for e in reversed(evals) if e.get("image")), None)
            view = self.query_one("#rv-eval-image", Static)
            view.display = image is not None
            if image is not None and image != getattr(self, "_eval_image", None):
                self._eval_image = image
                view.update(half_blocks(image, 12, 6))
        gpus = list_gpus(st.get("devices")) if state in ("running", "starting") else []
        gpu_line = self.query_one("#rv-gpus", Static)
        gpu_line.update("  ".join(g.label() for g in gpus))
        gpu_line.display = bool(gpus)
        self.query_one("#rv-stop", Button).disabled = state not in ("running", "starting")
        if state != self._last_state:   # listing checkpoints is a directory scan: only on changes
            self._last_state = state
            self.query_one("#rv-resume", Button).disabled = state in ("running", "starting") or \
                self.run.latest_checkpoint() is None or state == "finished"


class RunsWatcher:
    """Watches work_dirs (recursively) with watchdog and posts RunsPane.FilesChanged for any change."""

    def __init__(self, root: Path, pane: RunsPane):
        self.root, self.pane = root, pane
        self.observer = None
        self.pending = threading.Event()     # one message until the pane has handled it, not one per write

    def start(self) -> None:
        if self.observer is not None or not self.root.is_dir():
            return
        from watchdog.events import EVENT_TYPE_CLOSED_NO_WRITE, EVENT_TYPE_OPENED, FileSystemEventHandler
        from watchdog.observers import Observer

        pane, pending = self.pane, self.pending

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event) -> None:
                if event.event_type in (EVENT_TYPE_OPENED, EVENT_TYPE_CLOSED_NO_WRITE) or pending.is_set():
                    return
                pending.set()
                pane.post_message(RunsPane.FilesChanged())      # post_message is thread-safe

        observer = Observer()
        try:
            observer.schedule(Handler(), str(self.root), recursive=True)
            observer.daemon = True
            observer.start()
        except OSError:                 # e.g. out of inotify watches: the slow tick still polls
            return
        self.observer = observer

    def stop(self) -> None:
        if self.observer is not None:
            self.observer.stop()
            self.observer = None


class RunsPane(Vertical):

    class FilesChanged(Message):
        """Something under work_dirs changed (sent from the watchdog thread)."""

    def __init__(self, workspace: Path, **kw):
        super().__init__(**kw)
        self.workspace = workspace
        self.rows: list[Path | str] = []     # a run's directory, or "queue:ID" for a queued entry
        self.marked: list[Path] = []         # runs picked for the comparison view (space), in order
        self.started: list[Path] = []        # runs this app started (quitting asks about those still running)

    def compose(self) -> ComposeResult:
        # one line to start a run, then the run list beside the selected run: at 80x24 the log keeps
        # at least eight rows
        with Horizontal(id="start-row"):
            yield Select([], prompt="recipe to start", id="start-config", compact=True)
            yield Select([(d, d) for d in DEEPSPEED_CHOICES], value="none", allow_blank=False,
                         id="start-deepspeed", compact=True)
            yield Select([], prompt="GPU", id="start-gpus", compact=True)
            yield Button("Start (n)", variant="success", id="start-run", compact=True)
        yield Static("", id="start-estimate")          # the recipe's estimated peak GPU memory, and if it fits
        with Horizontal(id="runs-body"):
            table: DataTable = DataTable(id="runs-table", cursor_type="row", zebra_stripes=True)
            yield table
            yield RunView(id="run-view")

    def on_mount(self) -> None:
        table = self.query_one("#runs-table", DataTable)
        table.add_columns("", "run", "state", "step", "loss", "ETA")
        self.refresh_configs()
        self.refresh_gpus()
        self.refresh_runs()
        self.watcher = RunsWatcher(self.workspace / "work_dirs", self)
        self.watcher.start()
        # file events drive the updates; this slow tick is the fallback where inotify is not available
        # (NFS, exhausted watches) and keeps ETAs and GPU figures current
        self.set_interval(2.0, self.tick)

    def on_unmount(self) -> None:
        self.watcher.stop()

    def on_runs_pane_files_changed(self, message: RunsPane.FilesChanged) -> None:
        self.set_timer(0.25, self._update)     # what else changes in that quarter second comes along

    def _update(self) -> None:
        self.watcher.pending.clear()
        self.tick()

    def refresh_gpus(self) -> None:
        """With several GPUs the start row offers one of them or all (data parallel)."""
        gpus = list_gpus()
        sel = self.query_one("#start-gpus", Select)
        sel.display = len(gpus) > 1
        if len(gpus) > 1:
            everything = ",".join(str(g.index) for g in gpus)
            sel.set_options([(f"all {len(gpus)} GPUs", everything)] +
                            [(f"GPU {g.index}", str(g.index)) for g in gpus])
            sel.value = everything

    def refresh_configs(self, select: Path | None = None) -> None:
        """The workspace's recipes to start; the one just saved or copied is chosen."""
        sel = self.query_one("#start-config", Select)
        keep = sel.value
        configs = workspace_configs(self.workspace)
        sel.set_options([(p.stem, str(p)) for p in configs])
        # the one just saved, else the one chosen before, else the recipe edited last
        newest = str(max(configs, key=lambda p: p.stat().st_mtime)) if configs else None
        for value in (str(select) if select else None, keep, newest):
            if value is not None and chosen(value) and any(str(p) == value for p in configs):
                sel.value = value
                break

    def refresh_runs(self) -> None:
        table = self.query_one("#runs-table", DataTable)
        runs = find_runs(self.workspace / "work_dirs")
        summaries = [r.summary(with_checkpoint=False) for r in runs]
        queue = read_queue(self.workspace)
        waiting = [e for e in queue["entries"] if e["state"] != "started"]      # started ones are runs now
        signature = [(s["run"], s["state"], s["step"], s["loss"], s["phase"]) for s in summaries] + [
            tuple(self.marked), json.dumps(waiting), queue.get("paused")]
        if signature == getattr(self, "_signature", None):
            return
        self._signature = signature
        self._announce(summaries)
        self.queue = queue
        keep = table.cursor_row
        table.clear()
        self.rows = [r.path for r in runs]
        self.marked = [m for m in self.marked if m in self.rows]
        for r, s in zip(runs, summaries):
            loss = format_loss(s["loss"])
            eta = format_eta(s["eta_s"]) if s["state"] == "running" and not s["phase"] else "-"
            if s["phase"] == "compiling":
                eta = "compiling"
            elif s["phase"] and s["phase"].endswith("%"):          # loading the model 40%
                eta = "load " + s["phase"].rsplit(" ", 1)[-1]
            mark = Text(str(self.marked.index(r.path) + 1), style="bold reverse") if r.path in self.marked else ""
            table.add_row(mark, r.path.name, Text(s["state"], style=STATE_STYLE.get(s["state"], "")),
                          f"{s['step']}/{s['total_steps'] or '?'}", loss, eta, key=str(r.path))
        for n, e in enumerate(waiting, 1):          # the queue after the runs, in its order
            state = "paused" if queue.get("paused") and e["state"] == "waiting" else e["state"]
            table.add_row("", Text(f"⧗ {Path(e['config']).stem}", style="dim"),
                          Text(state, style="bold red" if state in ("failed", "unknown") else "magenta"),
                          "-", "-", f"#{n}", key=f"queue:{e['id']}")
            self.rows.append(f"queue:{e['id']}")
        if self.rows:
            table.move_cursor(row=min(max(keep, 0), len(self.rows) - 1))

    queue: dict = {"paused": False, "entries": []}

    def queue_entry(self, key: str) -> dict | None:
        return next((e for e in self.queue["entries"] if f"queue:{e['id']}" == key), None)

    _states: dict[str, str] | None = None

    def _announce(self, summaries: list[dict]) -> None:
        """A toast and the terminal bell when a run ends, whichever screen is showing."""
        states = {s["run"]: s["state"] for s in summaries}
        if self._states is not None:
            for run, state in states.items():
                was = self._states.get(run)
                if was in ("running", "starting") and state in ("finished", "failed", "stopped"):
                    s = next(x for x in summaries if x["run"] == run)
                    detail = f": {s['error']}" if state == "failed" and s.get("error") else \
                        f" at step {s['step']}/{s['total_steps'] or '?'}"
                    self.app.notify(f"{Path(run).name} {state}{detail}", title=f"run {state}",
                                    severity="error" if state == "failed" else "information", timeout=10)
                    self.app.bell()
        self._states = states

    def tick(self) -> None:
        if not self.is_attached:
            return
        self.watcher.start()          # work_dirs may have appeared since
        self.refresh_runs()
        self.query_one(RunView).refresh_view()

    @on(DataTable.RowHighlighted, "#runs-table")
    def row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        view = self.query_one(RunView)
        if event.row_key is not None and str(event.row_key.value).startswith("queue:"):
            entry = self.queue_entry(str(event.row_key.value))
            if entry is not None:
                view.show_entry(entry, self.queue)
            return
        path = Path(event.row_key.value) if event.row_key is not None else None
        if path is not None and (view.run is None or view.run.path != path):
            view.show(path)

    def on_show_run(self, message: ShowRun) -> None:
        self.query_one(RunView).show(message.path)

    # -- the estimate beside Start
    @on(Select.Changed, "#start-config, #start-deepspeed, #start-gpus")
    def _start_choice_changed(self) -> None:
        self.estimate_fits = None
        self.query_one("#start-estimate", Static).update("")
        cfg = self.query_one("#start-config", Select).value
        if chosen(cfg) and cfg:
            self._estimate(str(cfg), self._start_devices(), self._start_deepspeed())

    @work(thread=True, exclusive=True, group="estimate")
    def _estimate(self, cfg: str, devices: list[int] | None, deepspeed: str | None) -> None:
        line, fits = fit_line(cfg, self.workspace, devices, deepspeed)
        self.app.call_from_thread(self._show_estimate, cfg, line, fits)

    def _show_estimate(self, cfg: str, line: str, fits: bool | None) -> None:
        if str(self.query_one("#start-config", Select).value) != cfg:
            return                                  # an answer for a recipe no longer chosen
        self.estimate_fits, self.estimate_line = fits, line
        self.query_one("#start-estimate", Static).update(
            Text(line, style="bold red" if fits is False else "dim"))

    estimate_fits: bool | None = None
    estimate_line = ""

    def _start_devices(self) -> list[int] | None:
        gpus = self.query_one("#start-gpus", Select)
        return [int(x) for x in str(gpus.value).split(",")] if gpus.display and chosen(gpus.value) else None

    def _start_deepspeed(self) -> str | None:
        ds = self.query_one("#start-deepspeed", Select).value
        return str(ds) if chosen(ds) and ds != "none" else None

    # -- actions
    @on(Button.Pressed, "#start-run")
    def action_start(self) -> None:
        cfg = self.query_one("#start-config", Select).value
        if not chosen(cfg) or not cfg:
            self.app.notify("pick a workspace recipe to start", severity="warning")
            return
        ds = self._start_deepspeed()
        args = ["train", str(cfg), "--detach"] + (["--deepspeed", ds] if ds else [])
        devices = self._start_devices()
        if devices:
            args += ["--devices", ",".join(map(str, devices))]
        if self.estimate_fits is False:
            def answered(yes: bool | None) -> None:
                if yes:
                    self._launch(args, f"starting {Path(str(cfg)).stem}")

            self.app.push_screen(ConfirmDialog(f"{self.estimate_line}. Start {Path(str(cfg)).stem} anyway?",
                                               yes="Start"),
                                 answered)
            return
        self._launch(args, f"starting {Path(str(cfg)).stem}")

    @on(Button.Pressed, "#rv-stop")
    def action_stop(self) -> None:
        run = self.query_one(RunView).run
        if run is None or run.status().get("state") not in ("running", "starting"):
            return

        def answered(yes: bool | None) -> None:
            if not yes:
                return
            try:
                run.request_stop(wait_s=0)
            except UserError as e:
                self.app.notify(str(e), severity="warning")
                return
            self.app.notify(f"stopping {run.path.name}: it saves a checkpoint first")

        self.app.push_screen(ConfirmDialog(f"Stop {run.path.name}? It saves a checkpoint first; resume continues "
                                           "from there.", yes="Stop"), answered)

    def action_delete(self) -> None:
        """Archive (moved to work_dirs/.archive/) or delete the selected run, after asking; take a queued
        entry out of the queue."""
        table = self.query_one("#runs-table", DataTable)
        key = self.rows[table.cursor_row] if self.rows and 0 <= table.cursor_row < len(self.rows) else None
        if isinstance(key, str) and key.startswith("queue:"):
            self._remove_queued(key)
            return
        run = self.query_one(RunView).run
        if run is None:
            return
        if run.status().get("state") in ("running", "starting"):
            self.app.notify(f"{run.path.name} is running: stop it first", severity="warning")
            return

        def answered(choice: str | None) -> None:
            if choice is None:
                return
            try:
                where = archive_run(run.path, self.workspace / "work_dirs") if choice == "archive" else None
                if choice == "delete":
                    shutil.rmtree(run.path)
            except OSError as e:
                self.app.notify(f"{run.path.name}: {e.strerror or e}", severity="error")
                return
            self.app.notify(f"archived to {where.relative_to(self.workspace)}" if where else
                            f"deleted {run.path.name}")
            self.query_one(RunView).clear()
            self._signature = None
            self.refresh_runs()

        self.app.push_screen(ChoiceDialog(f"{run.path.name}: archive it (moved to work_dirs/.archive/, out of the "
                                          "list) or delete it with its checkpoints?",
                                          [("archive", "Archive"), ("delete", "Delete for good")]), answered)

    @on(Button.Pressed, "#rv-resume")
    def action_resume(self) -> None:
        run = self.query_one(RunView).run
        if run is None:
            self.app.notify("pick a run to resume (enter on the list)", severity="warning")
            return
        st = run.status()
        name, step, total = run.path.name, st.get("step") or 0, st.get("total_steps")
        if st.get("state") in ("running", "starting"):
            self.app.notify(f"{name} is running: nothing to resume", severity="warning")
            return
        if st.get("state") == "finished" and total and step >= total:
            self.app.notify(f"{name} finished at step {step}/{total}: nothing to resume", severity="warning")
            return
        if run.latest_checkpoint() is None:
            self.app.notify(f"{name} has no checkpoint to resume from: start it again (n)", severity="warning")
            return
        devices = st.get("devices")                      # the GPUs it ran on
        self._launch(["train", str(run.config_path), "--work-dir", str(run.path), "--resume", "--detach"]
                     + (["--devices", ",".join(map(str, devices))] if devices else []), f"resuming {run.path.name}")

    def _remove_queued(self, key: str) -> None:
        entry = self.queue_entry(key)
        if entry is None:
            return

        def answered(yes: bool | None) -> None:
            if not yes:
                return
            try:
                remove_queued(self.workspace, entry["id"])
            except UserError as e:
                self.app.notify(str(e), severity="warning")
                return
            self.app.notify(f"removed {Path(entry['config']).stem} from the queue")
            self._signature = None
            self.refresh_runs()

        self.app.push_screen(ConfirmDialog(f"Take {Path(entry['config']).stem} out of the queue?", yes="Remove"),
                             answered)

    def action_queue(self) -> None:
        """Queue the chosen recipe: it starts when its GPUs are free (one run at a time without GPUs)."""
        cfg = self.query_one("#start-config", Select).value
        if not chosen(cfg) or not cfg:
            self.app.notify("pick a workspace recipe to queue", severity="warning")
            return
        try:
            check_queue_entry(self.workspace, str(cfg), deepspeed=self._start_deepspeed())
            entry = add_to_queue(self.workspace, str(cfg), devices=self._start_devices(),
                                 deepspeed=self._start_deepspeed())
        except UserError as e:
            self.app.notify(str(e), severity="error")
            return
        self._start_scheduler()
        self.app.notify(f"queued {Path(str(cfg)).stem} ({entry['id']}): it starts when its GPUs are free")
        self._signature = None
        self.refresh_runs()

    @work(thread=True, group="queue", exit_on_error=False)
    def _start_scheduler(self) -> None:
        ensure_scheduler(self.workspace)

    def action_pause_queue(self) -> None:
        paused = not read_queue(self.workspace).get("paused")
        set_paused(self.workspace, paused)
        if not paused:
            self._start_scheduler()
        self.app.notify("queue paused: nothing new starts" if paused else "queue running again")
        self._signature = None
        self.refresh_runs()

    def action_mark(self) -> None:
        """Pick the highlighted run for the comparison view, or drop it."""
        table = self.query_one("#runs-table", DataTable)
        if not self.rows or table.cursor_row < 0:
            return
        path = self.rows[min(table.cursor_row, len(self.rows) - 1)]
        if isinstance(path, str):          # a queued entry: nothing to compare yet
            return
        if path in self.marked:
            self.marked.remove(path)
        else:
            self.marked.append(path)
        self._signature = None
        self.refresh_runs()

    def action_compare(self) -> None:
        """The marked runs side by side: loss curves, recipe differences, evaluation answers."""
        runs = list(self.marked)
        if len(runs) < 2:
            self.app.notify("mark two or more runs with space, then press c", severity="warning")
            return
        from .compare import CompareScreen

        self.app.push_screen(CompareScreen(runs))

    def action_log(self) -> None:
        """The run's log full screen: search, follow, wrap, and the process's stderr."""
        run = self.query_one(RunView).run
        if run is None:
            return
        from .logview import LogScreen

        self.app.push_screen(LogScreen(run.path))

    def action_plot(self) -> None:
        """Swap the live log for the larger loss plot and back."""
        log, plot = self.query_one("#rv-log", Log), self.query_one("#rv-plot", LossPlot)
        plot.display = not plot.display
        log.display = not plot.display

    @work(thread=True, exclusive=True, group="launch", exit_on_error=False)
    def _launch(self, args: list[str], what: str) -> None:
        self.app.call_from_thread(self.app.notify, what + "…")
        proc = run_engine(self.workspace, *args)
        if proc.returncode != 0:
            msg = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
            self.app.call_from_thread(self.app.notify, msg, severity="error")
            return
        run_dir = Path(proc.stdout.strip().splitlines()[-1])
        self.started.append(run_dir.resolve())
        self.app.call_from_thread(self.refresh_runs)
        self.app.call_from_thread(self.query_one(RunView).show, run_dir)
