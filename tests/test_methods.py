"""LoRA without quantization, full fine-tune, 8-bit optimizers and data parallelism on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO, run_cli

from engine.train.runs import RunDirectory

QUICK = ["--set", "max_steps=8", "--set", "evaluation_inputs=[]", "--set", "save_steps=4",
         "--set", "model.path=models/tiny-chat", "--set", "data.data_path=data/personal_assistant.jsonl"]


def curve(run):
    return [m["loss"] for m in RunDirectory(run).metrics()]


def test_plain_lora_learns(workspace):
    assert run_cli("train", REPO / "configs/demo/demo_tiny_lora_self.yaml", "--work-dir", "lora", *QUICK) == 0
    c = curve(workspace / "lora")
    assert len(c) == 8 and c[-1] < 0.5 * c[0]


def test_full_finetune_learns_saves_a_model_and_resumes(workspace):
    from transformers import AutoModelForCausalLM

    recipe = REPO / "configs/demo/demo_tiny_full_self.yaml"
    assert run_cli("train", recipe, "--work-dir", "full", *QUICK) == 0
    c = curve(workspace / "full")
    assert c[-1] < 0.5 * c[0]
    ckpt = RunDirectory(workspace / "full").latest_checkpoint()
    assert not (ckpt / "adapter_config.json").exists()
    AutoModelForCausalLM.from_pretrained(str(ckpt))                       # a whole model, loadable as is
    assert run_cli("train", recipe, "--work-dir", "full", "--resume", workspace / "full" / "checkpoint-4",
                   "--force", *QUICK) == 0
    again = curve(workspace / "full")
    assert again[4:] == pytest.approx(c[4:], abs=1e-6)


def test_quantized_full_finetune_is_refused_with_one_line(workspace, capsys):
    rc = run_cli("train", "demo.yaml", "--set", "lora.enabled=false", "--set", "model.quantization=4bit")
    err = capsys.readouterr().err
    assert rc == 2 and "model.quantization: '4bit' needs lora.enabled: true" in err


def test_low_memory_with_deepspeed_is_refused_with_one_line(workspace, capsys):
    rc = run_cli("train", "demo.yaml", "--set", "train.low_memory=true", "--deepspeed", "zero2")
    err = capsys.readouterr().err
    assert rc == 2 and "train.low_memory: true with train.deepspeed 'zero2'" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("optim", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_optimizers_train(workspace, optim):
    assert run_cli("train", "demo.yaml", "--work-dir", optim, "--set", f"optim_type={optim}", *QUICK) == 0
    c = curve(workspace / optim)
    assert c[-1] < c[0]


# (the plain logits loss over two processes is tests/test_multinode.py's two-node run)
@pytest.mark.parametrize("loss", ["chunked"])
def test_two_process_data_parallel_matches_one_process(workspace, loss):
    """--gpus 2 (here: two CPU processes over gloo) computes the same losses as one process with
    the same global batch: the loss is a token-level mean over both ranks. "chunked": the GPU's loss
    head (hidden states -> loss in chunks) inside DDP, two forwards a window (the first without a
    gradient reduction)."""
    common = ["--set", "max_steps=3", "--set", "evaluation_inputs=[]", "--set", "save_steps=100",
              "--set", "shuffle=false"]
    if loss == "chunked":
        common += ["--set", "train.loss_chunk_tokens=7", "--set", "accumulative_counts=2"]
    else:
        common += ["--set", "accumulative_counts=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "engine.cli", "train", "demo.yaml", "--work-dir", "ddp",
                          "--gpus", "2", "--set", "batch_size=1", *common], cwd=workspace, env=env,
                         capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert run_cli("train", "demo.yaml", "--work-dir", "single", "--set", "batch_size=2", *common) == 0
    assert curve(workspace / "ddp") == pytest.approx(curve(workspace / "single"), rel=1e-4)
    assert RunDirectory(workspace / "ddp").latest_checkpoint().name == "checkpoint-3"


def test_zero_auto_comm_settings_follow_what_trains():
    """configs/deepspeed/zero2.json leaves overlap_comm / contiguous_gradients to the trainer: off for
    adapters (small gradients), on for a full fine-tune; a value written in the JSON stays."""
    import json

    from engine.recipe import catalogue
    from engine.train.distributed import resolve_zero_auto

    shipped = json.loads(catalogue.deepspeed_config_path("zero2").read_text())
    lora = resolve_zero_auto(json.loads(json.dumps(shipped)), adapters=True)["zero_optimization"]
    full = resolve_zero_auto(json.loads(json.dumps(shipped)), adapters=False)["zero_optimization"]
    assert (lora["overlap_comm"], lora["contiguous_gradients"]) == (False, False)
    assert (full["overlap_comm"], full["contiguous_gradients"]) == (True, True)
    mine = {"zero_optimization": {"stage": 2, "overlap_comm": True}}
    assert resolve_zero_auto(mine, adapters=True)["zero_optimization"] == {"stage": 2, "overlap_comm": True}
