"""Shared fixtures: a tiny chat model and tokenizer made on the spot (nothing is downloaded)."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import time
import types
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ["TEXTUAL_ANIMATIONS"] = "none"    # snapshots must not catch an animation half-way
# converted InternLM2 checkpoints go to a cache of the run's own, never the user's ~/.cache
os.environ["TUNEDECK_CACHE"] = tempfile.mkdtemp(prefix="tunedeck-test-cache-")
os.environ["HF_MODULES_CACHE"] = os.path.join(os.environ["TUNEDECK_CACHE"], "hf-modules")   # remote code tests
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one core a worker (runs it starts included): two workers with two threads each thrash two cores
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
DEMO_RECIPE = REPO / "configs" / "demo" / "demo_tiny_qlora_self.yaml"
NAME = "NagatoYuki"


@pytest.fixture(params=[True, False], ids=["avx512bf16", "no-avx512bf16"])
def cpu_bf16(request, monkeypatch):
    """bitsandbytes sees a CPU with (or without) AVX512-BF16, whatever this one has: its Linear4bit
    takes another code path on such CPUs (tests/test_cpu_4bit.py)."""
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: request.param)
    return request.param


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from engine.model.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-chat", extra_texts=[NAME])


@pytest.fixture(scope="session")
def internlm2_model(tmp_path_factory) -> Path:
    """A tiny model folder laid out exactly as internlm/internlm2-chat-1_8b ships (engine/tiny.py)."""
    from engine.model.tiny import build_tiny_internlm2

    return build_tiny_internlm2(tmp_path_factory.mktemp("models") / "internlm2-chat-tiny", extra_texts=[NAME])


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


@pytest.fixture(scope="session")
def identity_file(tmp_path_factory) -> Path:
    from engine.data.identity import identity_records, write_identity

    return write_identity(tmp_path_factory.mktemp("data") / "identity.jsonl",
                          identity_records(NAME, 200, varied=True))


@pytest.fixture
def workspace(tmp_path, tiny_model, identity_file, monkeypatch) -> Path:
    """A directory with models/, data/ and a demo recipe pointing at them; cwd is set to it."""
    (tmp_path / "models").mkdir()
    os.symlink(tiny_model, tmp_path / "models" / "tiny-chat")
    (tmp_path / "data").mkdir()
    shutil.copy(identity_file, tmp_path / "data" / "personal_assistant.jsonl")
    shutil.copy(DEMO_RECIPE, tmp_path / "demo.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, seconds: float, what: str, proc=None, log: Path | None = None) -> None:
    """Poll ``url`` until it answers 200; fail naming ``what`` (and the log's tail) after ``seconds``,
    or as soon as ``proc`` exits."""
    import httpx

    tail = (lambda: log.read_text(errors="replace")[-3000:]) if log else (lambda: "")
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert proc is None or proc.poll() is None, f"{what} exited: {tail()}"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError(f"{what} did not come up: {tail()}")


def run_cli(*args: str) -> int:
    from engine.cli import main

    return main([str(a) for a in args])


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_model, identity_file) -> Path:
    """One 4-bit QLoRA run of the demo recipe, shared by the chat, merge and serve tests."""
    ws = tmp_path_factory.mktemp("trained")
    old = os.getcwd()
    os.chdir(ws)
    try:
        rc = run_cli("train", REPO / "configs/demo/demo_tiny_qlora_self.yaml", "--work-dir", ws / "run",
                     "--set", f"model.path={tiny_model}", "--set", f"data.data_path={identity_file}")
    finally:
        os.chdir(old)
    assert rc == 0
    return ws / "run"


@pytest.fixture(scope="session")
def internlm2_run(internlm2_model, identity_file, tmp_path_factory) -> Path:
    """The demo recipe trained on the InternLM2 folder as it ships (4-bit QLoRA on the CPU)."""
    ws = tmp_path_factory.mktemp("internlm2-run")
    rc = run_cli("train", DEMO_RECIPE, "--work-dir", ws / "run", "--set", f"model.path={internlm2_model}",
                 "--set", f"data.data_path={identity_file}", "--set", "model.trust_remote_code=true")
    assert rc == 0
    return ws / "run"


def write_run(root: Path, name: str, losses: list[float], *, lr: str = "2e-3", state: str = "finished",
              answers: dict[int, str] | None = None, pid: int = 1, log_lines: int = 20) -> Path:
    """A run directory as a training writes it (status, metrics, evaluation answers, log, config),
    for screens that only read runs."""
    import json

    run = root / "work_dirs" / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(DEMO_RECIPE.read_text().replace("lr: 2e-3", f"lr: {lr}"))
    n = len(losses)
    (run / "status.json").write_text(json.dumps({"state": state, "pid": pid, "step": n, "total_steps": 20,
                                                 "eta_s": 0, "loss": losses[-1] if losses else None}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(
        {"step": s, "epoch": s / 20, "loss": v, "lr": float(lr), "grad_norm": 1.0 / s, "tokens_per_s": 5000.0,
         "gpu_mem_gib": None}) + "\n" for s, v in enumerate(losses, 1)))
    (run / "evals.jsonl").write_text("".join(json.dumps({"step": step, "prompt": "Who are you?", "answer": a}) + "\n"
                                             for step, a in sorted((answers or {}).items())))
    (run / "train.log").write_text("".join(f"step {s}/20  loss {s:.4f}  line {s}\n" for s in range(1, log_lines + 1)))
    (run / "console.log").write_text("UserWarning: this is what the process printed to stderr\n")
    return run


class FakeNVML(types.ModuleType):
    """NVML as the nvidia-ml-py package presents it, for a machine with two GPUs (this one has none)."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self):
        super().__init__("pynvml")
        self.queried: set[int] = set()
        self.pids: dict[int, list[int]] = {}          # GPU index -> compute processes on it

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, handle):
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetMemoryInfo(self, handle):
        self.queried.add(handle)
        return types.SimpleNamespace(used=(10 + handle) * 2**30, total=80 * 2**30)

    def nvmlDeviceGetUtilizationRates(self, handle):
        return types.SimpleNamespace(gpu=87 if handle == 1 else 3)

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return 61 if handle == 1 else 34

    def nvmlDeviceGetPowerUsage(self, handle):          # milliwatts
        return 512_000 if handle == 1 else 71_000

    def nvmlDeviceGetEnforcedPowerLimit(self, handle):
        return 700_000

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [types.SimpleNamespace(pid=p, usedGpuMemory=2**30) for p in self.pids.get(handle, [])]


@pytest.fixture
def two_gpus(monkeypatch):
    import engine.core.gpus

    fake = FakeNVML()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(engine.core.gpus, "_nvml", None)
    yield fake
    engine.core.gpus._nvml = None
