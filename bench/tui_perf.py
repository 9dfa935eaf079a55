"""TUI performance (issue #4; CPU is fine), measured in one run:

1. cold start to first frame: `tunedeck`'s app vs a bare Textual "hello" app, each started as a
   fresh process that exits right after its first refresh (median of N);
2. responsiveness: the run view follows a run whose train.log grows by 1,000 lines a second;
   key presses that switch screens are timed until the app has processed them.

    python bench/tui_perf.py [--runs 5]

Writes bench/results/tui_perf_<host>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

HELLO = """
from textual.app import App
from textual.widgets import Static
class Hello(App):
    def compose(self):
        yield Static("hello")
    def on_mount(self):
        self.call_after_refresh(self.exit)
Hello().run(headless=True)
"""

TUNEDECK = """
import sys
sys.path.insert(0, {repo!r})
from tui.app import TunedeckApp
class Timed(TunedeckApp):
    def on_mount(self):
        self.call_after_refresh(self.exit)
Timed({ws!r}).run(headless=True)
"""


def cold_start(code: str, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return times


def make_run(ws: Path) -> Path:
    run = ws / "work_dirs" / "busy"
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"state": "running", "pid": 1, "step": 1, "total_steps": 10**6}))
    (run / "train.log").write_text("")
    return run


async def responsiveness(ws: Path, run: Path, seconds: float = 5.0) -> dict:
    from tui.app import TunedeckApp

    stop = threading.Event()
    written = [0]

    def writer():
        with open(run / "train.log", "a") as f:
            t0 = time.perf_counter()
            while not stop.is_set():
                target = int((time.perf_counter() - t0) * 1000)      # 1,000 lines a second
                while written[0] < target:
                    f.write(f"{time.time():.3f} INFO step {written[0]} loss 1.2345 lr 2e-4 grad_norm 0.5\n")
                    written[0] += 1
                f.flush()
                time.sleep(0.01)

    app = TunedeckApp(ws)
    latencies = []
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("3")
        await pilot.pause(0.5)
        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        from textual import events

        tabs = app.query_one("#tabs")
        t_end = time.perf_counter() + seconds
        keys = [("1", "configs"), ("3", "runs")]
        i = 0
        while time.perf_counter() < t_end:
            key, want = keys[i % 2]
            t0 = time.perf_counter()
            app.post_message(events.Key(key, key))       # as a terminal would deliver it
            while tabs.active != want and time.perf_counter() - t0 < 5:
                await asyncio.sleep(0.002)
            latencies.append(time.perf_counter() - t0)
            i += 1
            await asyncio.sleep(0.2)
        stop.set()
        thread.join()
        shown = app.query_one("#rv-log").line_count
    return {"lines_written": written[0], "lines_shown": shown, "key_presses": len(latencies),
            "key_latency_ms_median": round(1000 * statistics.median(latencies), 1),
            "key_latency_ms_max": round(1000 * max(latencies), 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        ws = Path(d)
        run = make_run(ws)
        hello = cold_start(HELLO, args.runs)
        ours = cold_start(TUNEDECK.format(repo=str(REPO), ws=str(ws)), args.runs)
        resp = asyncio.run(responsiveness(ws, run))
    res = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpus": __import__("os").cpu_count(),
           "python": platform.python_version(), "textual": __import__("textual").__version__,
           "cold_start_s": {"hello_median": round(statistics.median(hello), 3),
                            "tunedeck_median": round(statistics.median(ours), 3),
                            "hello_runs": [round(x, 3) for x in hello], "tunedeck_runs": [round(x, 3) for x in ours]},
           "responsiveness_1000_lines_per_s": resp, "date": time.strftime("%Y-%m-%d")}
    res["cold_start_ratio"] = round(res["cold_start_s"]["tunedeck_median"] / res["cold_start_s"]["hello_median"], 2)
    text = json.dumps(res, indent=1)
    print(text)
    out = REPO / "bench" / "results" / f"tui_perf_cpu{res['cpus']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
