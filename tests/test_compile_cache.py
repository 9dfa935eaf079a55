"""A second run of the same model loads its compiled layers from tunedeck's cache folder instead of
compiling them again: two real `tunedeck train` processes with `model.compile: on` (inductor, C++
kernels on the CPU), the second one's compile counters read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import DEMO_RECIPE, REPO

TRAIN_AND_COUNT = """
import json, sys
from engine.cli import main
rc = main(sys.argv[1:])
from torch._dynamo.utils import counters
print("COUNTERS " + json.dumps({k: dict(counters[k]) for k in ("aot_autograd", "inductor")}))
sys.exit(rc)
"""


def train_once(tmp_path: Path, model: Path, data: Path, name: str) -> tuple[dict, dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    env.update(TUNEDECK_CACHE=str(tmp_path / "cache"), TMPDIR=str(tmp_path / "tmp"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", TRAIN_AND_COUNT, "train", str(DEMO_RECIPE), "--work-dir",
                           str(tmp_path / name), "--set", f"model.path={model}", "--set", f"data.data_path={data}",
                           "--set", "model.compile=on", "--set", "max_steps=1", "--set", "evaluation_inputs=[]"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("COUNTERS "))
    first = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
    return json.loads(line.removeprefix("COUNTERS ")), first


def test_a_second_run_loads_the_compiled_layers_from_tunedecks_cache(tmp_path, tiny_model, identity_file):
    (tmp_path / "tmp").mkdir()
    cold, first = train_once(tmp_path, tiny_model, identity_file, "cold")
    # every graph traced was compiled and saved: none traced twice (dynamo had restarted each compile
    # once, over the layers' Python floats) and none left out of the cache (autograd.Functions had
    # made AOTAutograd bypass it)
    aot = cold["aot_autograd"]
    assert aot.get("autograd_cache_bypass", 0) == 0, aot
    assert aot["autograd_cache_miss"] == aot["autograd_cache_saved"] > 0, aot
    warm, again = train_once(tmp_path, tiny_model, identity_file, "warm")
    assert warm["aot_autograd"].get("autograd_cache_hit", 0) == aot["autograd_cache_saved"], warm
    assert not warm["aot_autograd"].get("autograd_cache_miss") and not warm["inductor"].get("fxgraph_cache_miss"), warm
    # in tunedeck's cache folder, where it outlives /tmp (bitsandbytes' import had pinned inductor's
    # default under /tmp before tunedeck chose its own)
    assert any((tmp_path / "cache" / "compile" / "inductor").rglob("*.py"))
    # (only the C++ compiler's precompiled headers stay under /tmp: torch puts them there whatever is set)
    assert not [p for p in (tmp_path / "tmp").rglob("*") if p.is_file() and "precompiled_headers" not in p.parts]
    assert again["loss"] == first["loss"]                   # the same step, loaded instead of compiled
