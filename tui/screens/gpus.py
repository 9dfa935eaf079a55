"""GPUs: per GPU its utilisation, memory, temperature and power and which run holds it (NVML); the
CPU and memory of the box, and each running run's process, on any machine (psutil). A box without a
GPU says so and shows the rest."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from engine.core.gpus import list_gpus, process_tree_owner
from engine.train.runs import find_runs


def bar(fraction: float, width: int = 10) -> str:
    filled = round(max(0.0, min(fraction, 1.0)) * width)
    return "█" * filled + "░" * (width - filled)


class GpusPane(Vertical):
    """Refreshed every two seconds while it is on screen."""

    def __init__(self, workspace: Path, **kw):
        super().__init__(**kw)
        self.workspace = workspace
        self._procs: dict[int, object] = {}      # psutil.Process objects kept: CPU % is since the last reading

    def compose(self) -> ComposeResult:
        yield Static("", id="gpu-summary")
        yield DataTable(id="gpu-table", cursor_type="row", zebra_stripes=True)
        yield Static("", id="gpu-host")
        yield DataTable(id="gpu-runs", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        self.query_one("#gpu-table", DataTable).add_columns("GPU", "name", "util", "memory", "temp", "power", "run")
        self.query_one("#gpu-runs", DataTable).add_columns("run", "pid", "CPU", "memory", "GPUs")
        import psutil

        psutil.cpu_percent(interval=None)      # the first reading is a baseline; the next one is real
        self.refresh_panel()
        self.set_interval(2.0, self.refresh_panel)

    def running_runs(self) -> dict[int, str]:
        """pid → run name of the workspace's live runs."""
        out = {}
        for run in find_runs(self.workspace / "work_dirs"):
            st = run.status()
            if st.get("state") in ("running", "starting") and st.get("pid"):
                out[int(st["pid"])] = run.path.name
        return out

    def refresh_panel(self) -> None:
        if not self.is_attached or getattr(self.app.query_one("#tabs"), "active", None) != "gpus":
            return
        import psutil

        owners = self.running_runs()
        gpus = list_gpus()
        table = self.query_one("#gpu-table", DataTable)
        table.clear()
        holders: dict[str, list[int]] = {}
        for g in gpus:
            found = [process_tree_owner(pid, owners) for pid in g.pids]       # one process-tree walk a pid
            runs = sorted({o for o in found if o})
            for r in runs:
                holders.setdefault(r, []).append(g.index)
            others = found.count(None)
            held = ", ".join(runs + ([f"+{others} other"] if others else [])) or "-"
            util = f"{g.util_pct:>3}%" if g.util_pct is not None else "  -"
            mem = f"{bar(g.mem_used_gib / max(g.mem_total_gib, 1e-9), 6)} {g.mem_used_gib:.1f}/{g.mem_total_gib:.0f}G"
            temp = f"{g.temperature_c}°C" if g.temperature_c is not None else "-"
            power = (f"{g.power_w:.0f}/{g.power_limit_w:.0f}W" if g.power_w is not None and g.power_limit_w
                     else f"{g.power_w:.0f}W" if g.power_w is not None else "-")
            table.add_row(str(g.index), g.name, util, mem, temp, power, held)
        table.display = bool(gpus)
        summary = (f"{len(gpus)} GPU{'s' if len(gpus) != 1 else ''} (NVML)" if gpus else
                   Text("No NVIDIA GPU here (NVML found none): the CPU and memory only.", style="yellow"))
        self.query_one("#gpu-summary", Static).update(summary)
        vm = psutil.virtual_memory()
        cpu = psutil.cpu_percent(interval=None)
        self.query_one("#gpu-host", Static).update(
            f"CPU {bar(cpu / 100)} {cpu:4.0f}% of {psutil.cpu_count() or '?'} cores   "
            f"RAM {bar(vm.percent / 100)} {(vm.total - vm.available) / 2**30:.1f}/{vm.total / 2**30:.0f} GiB")
        runs = self.query_one("#gpu-runs", DataTable)
        runs.clear()
        for pid, name in sorted(owners.items(), key=lambda kv: kv[1]):
            try:
                procs = [self._proc(pid)]
                procs += [self._proc(c.pid) for c in procs[0].children(recursive=True)]
                cpu_p = sum(p.cpu_percent(interval=None) for p in procs)
                rss = sum(p.memory_info().rss for p in procs)
            except (psutil.Error, OSError):
                continue
            on = ",".join(map(str, holders.get(name, []))) or "-"
            runs.add_row(name, str(pid), f"{cpu_p:.0f}%", f"{rss / 2**30:.1f} GiB", on)
        runs.display = bool(owners)

    def _proc(self, pid: int):
        import psutil

        proc = self._procs.get(pid)
        if proc is None or not proc.is_running():
            proc = self._procs[pid] = psutil.Process(pid)
        return proc
