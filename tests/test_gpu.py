"""GPU paths (skipped without CUDA; run on a GPU machine with `pytest tests/test_gpu.py`):
8-bit and 4-bit QLoRA, fp16 with loss scaling, bf16 LoRA and full fine-tune, DeepSpeed ZeRO
stages, resume under DeepSpeed, and the low-memory preset."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, run_cli

from engine.train.runs import RunDirectory

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

QUICK = ["--set", "max_steps=6", "--set", "save_steps=3", "--set", "model.path=models/tiny-chat",
         "--set", "data.data_path=data/personal_assistant.jsonl", "--set", "evaluation_freq=0"]
QLORA = REPO / "configs/demo/demo_tiny_qlora_self.yaml"
LORA = REPO / "configs/demo/demo_tiny_lora_self.yaml"
FULL = REPO / "configs/demo/demo_tiny_full_self.yaml"


def _has_deepspeed() -> bool:
    try:
        import deepspeed  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.parametrize("recipe, sets", [
    (QLORA, []),
    (QLORA, ["--set", "model.quantization=8bit"]),
    (QLORA, ["--set", "mixed_precision=fp16"]),
    (QLORA, ["--set", "optim_type=paged_adamw_8bit"]),
    (LORA, []),
    (FULL, []),
], ids=["4bit-bf16", "8bit", "4bit-fp16", "paged8bit", "lora-bf16", "full-bf16"])
def test_gpu_training_paths(workspace, recipe, sets):
    assert run_cli("train", recipe, "--work-dir", "r", *QUICK, *sets) == 0
    rd = RunDirectory(workspace / "r")
    m = rd.metrics()
    assert rd.status()["state"] == "finished" and len(m) == 6
    assert m[-1]["loss"] < m[0]["loss"] and m[-1]["gpu_mem_gib"] > 0


def train_process(workspace, *args) -> int:
    """`tunedeck train` in its own process, as a person runs it: DeepSpeed's process group and its
    engine's state belong to one run, not to whatever trained before it in this test process."""
    out = subprocess.run([sys.executable, "-m", "engine.cli", "train", *map(str, args)], cwd=workspace,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                             [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])})
    if out.returncode:
        print(out.stdout[-4000:], out.stderr[-4000:])
    return out.returncode


@pytest.mark.skipif(not _has_deepspeed(), reason="deepspeed not installed")
@pytest.mark.parametrize("recipe, stage", [(QLORA, "zero1"), (QLORA, "zero2"), (LORA, "zero3")])
def test_deepspeed_stages_train_save_and_resume(workspace, recipe, stage):
    assert train_process(workspace, recipe, "--work-dir", "d", "--deepspeed", stage, *QUICK) == 0
    rd = RunDirectory(workspace / "d")
    first = [x["loss"] for x in rd.metrics()]
    assert rd.status()["state"] == "finished" and first[-1] < first[0]
    assert (rd.latest_checkpoint() / "adapter_model.safetensors").stat().st_size > 1000
    assert train_process(workspace, recipe, "--work-dir", "d", "--deepspeed", stage, "--resume",
                         workspace / "d" / "checkpoint-3", "--force", *QUICK) == 0
    again = [x["loss"] for x in rd.metrics()]
    assert again[3:] == pytest.approx(first[3:], rel=2e-2)


def test_quantized_zero3_is_refused(workspace, capsys):
    if not _has_deepspeed():
        pytest.skip("deepspeed not installed")
    assert run_cli("train", QLORA, "--deepspeed", "zero3", *QUICK) == 2
    assert "cannot hold bitsandbytes" in capsys.readouterr().err


def test_low_memory_preset_trains_the_default_curve(workspace):
    """train.low_memory changes where things are kept (AdamW's state and the layers' inputs in CPU memory,
    the embedding on the CPU), not the math: the default run's losses."""
    assert run_cli("train", QLORA, "--work-dir", "default", *QUICK) == 0
    assert run_cli("train", QLORA, "--work-dir", "low", *QUICK, "--set", "train.low_memory=true") == 0
    default, low = ([x["loss"] for x in RunDirectory(workspace / d).metrics()] for d in ("default", "low"))
    # (other row groupings and loss chunks: bf16 matmuls of other shapes round differently)
    assert len(low) == 6 and low == pytest.approx(default, rel=1e-2)
    assert low[-1] < low[0]
    # evaluation generates with the embedding back on the GPU: before training, the default run's answers
    answers = [[e["answer"] for e in RunDirectory(workspace / d).evals()] for d in ("default", "low")]
    assert len(answers[1]) == 4 and answers[1][:2] == answers[0][:2]
