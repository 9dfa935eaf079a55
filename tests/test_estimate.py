"""The memory estimate before launch (`tunedeck train --dry-run`, the app's line beside Start): its
counting against the peaks measured on an H200 (bench/results/memory_estimate_NVIDIA_H200.json), the CLI's
output and exit codes, user mistakes, and the app asking before it starts a run that does not fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, run_cli
from test_tui import built, wait_for

BENCH = REPO / "bench/results/memory_estimate_NVIDIA_H200.json"
SEED = REPO / "configs/internlm2/internlm2_chat_1_8b_qlora_self_e2.yaml"
LLAVA = REPO / "configs/llava/llava_internlm2_chat_1_8b_qlora_clip_vit_large_p14_336_lora_e1_finetune.yaml"
# internlm2-chat-1_8b's config.json as the hub ships it (the keys the estimate reads), and CLIP ViT-L/14-336's
INTERNLM2_1_8B = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
                  "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config"}, "hidden_size": 2048,
                  "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 16,
                  "num_key_value_heads": 8, "vocab_size": 92544, "tie_word_embeddings": False, "bias": False,
                  "rope_scaling": {"type": "dynamic", "factor": 2.0}, "max_position_embeddings": 32768}
CLIP_L_336 = {"architectures": ["CLIPModel"], "model_type": "clip", "text_config": {"hidden_size": 768},
              "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                                "num_attention_heads": 16, "image_size": 336, "patch_size": 14}}
H200_FREE_GIB = 139.3           # what the H200 had free before each measured run
CASES = {"seed": [], "low_memory": ["train.low_memory=true"], "lora_bf16": ["model.quantization=none"],
         "full": ["lora.enabled=false", "model.quantization=none"]}


@pytest.fixture
def models(tmp_path) -> tuple[Path, Path]:
    llm, vit = tmp_path / "internlm2-chat-1_8b", tmp_path / "clip-vit-large-patch14-336"
    for d, cfg in ((llm, INTERNLM2_1_8B), (vit, CLIP_L_336)):
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
    return llm, vit


def recipe(path: Path, sets: list[str]):
    from engine.recipe.schema import load_recipe

    return load_recipe(path, sets)[1]


@pytest.mark.parametrize("case", [*CASES, "llava"])
def test_the_estimate_is_within_15_percent_of_the_peak_measured_on_the_gpu(case, models):
    """Today's counting, for the H200's free memory, against the peak each case reached there. The plan
    (layers that recompute, rows a forward) must be the one the trainer logged in that run."""
    from engine.train.estimate import GIB, estimate

    measured = json.loads(BENCH.read_text())["cases"][case]
    llm, vit = models
    if case == "llava":
        r = recipe(LLAVA, [f"model.path={llm}", f"llava.visual_encoder={vit}", "model.dtype=bfloat16"])
        est = estimate(r, INTERNLM2_1_8B, gpu_free_bytes=int(H200_FREE_GIB * GIB), vision_config=CLIP_L_336)
    else:
        est = estimate(recipe(SEED, [f"model.path={llm}", *CASES[case]]), INTERNLM2_1_8B,
                       gpu_free_bytes=int(H200_FREE_GIB * GIB))
    plan = measured["run"].get("plan")
    if plan:
        assert f"{est.recompute_layers} of 24 layers recompute" in plan
    assert est.rows_per_forward == measured["estimate"]["rows_per_forward"]
    peak = measured["run"]["peak_mem_gib"]
    assert abs(est.peak_bytes / GIB / peak - 1) <= 0.15, (est.to_json(), peak)


def test_the_plan_follows_free_memory_and_a_small_gpu_gets_fewer_kept_layers(models):
    from engine.train.estimate import GIB, estimate

    r = recipe(SEED, [f"model.path={models[0]}"])
    big = estimate(r, INTERNLM2_1_8B, gpu_free_bytes=int(139 * GIB))
    small = estimate(r, INTERNLM2_1_8B, gpu_free_bytes=int(40 * GIB))
    none = estimate(r, INTERNLM2_1_8B)
    assert big.recompute_layers == 0 < small.recompute_layers < 24 == none.recompute_layers
    assert big.peak_bytes > small.peak_bytes > none.peak_bytes
    assert small.fits(40 * GIB) and not big.fits(40 * GIB)
    assert "no GPU measured" in " ".join(none.notes)
    # ZeRO-2 on 4 GPUs shards the moments and gradients
    z = estimate(recipe(SEED, [f"model.path={models[0]}", "train.deepspeed=zero2"]), INTERNLM2_1_8B, world=4)
    assert z.parts["optimizer moments"] * 4 == none.parts["optimizer moments"]


def test_dry_run_prints_the_estimate_and_starts_nothing(models, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_cli("train", SEED, "--set", f"model.path={models[0]}", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "estimated peak GPU memory" in out and "24 of 24 layers recompute" in out
    assert "no GPU visible here" in out
    assert not (tmp_path / "work_dirs").exists()
    assert run_cli("train", SEED, "--set", f"model.path={models[0]}", "--dry-run", "--json") == 0
    d = json.loads(capsys.readouterr().out)
    assert d["gpus"] == [] and d["estimate"]["rows_per_forward"] == 16 and d["estimate"]["peak_gib"] > 1


def test_dry_run_says_per_gpu_whether_it_fits_and_exits_1_when_none_fits(models, tmp_path, monkeypatch, capsys,
                                                                         two_gpus):
    monkeypatch.chdir(tmp_path)
    assert run_cli("train", SEED, "--set", f"model.path={models[0]}", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "GPU 0 H100 80GB HBM3: 70.0 of 80 GiB free: fits" in out and "GPU 1" in out
    # a full fine-tune that keeps every layer's activations of 32 rows a forward needs more than 70 GiB
    too_big = ["--set", "lora.enabled=false", "--set", "model.quantization=none", "--set", "checkpoint_layers=0",
               "--set", "rows_per_forward=32"]
    assert run_cli("train", SEED, "--set", f"model.path={models[0]}", *too_big, "--dry-run", "--devices", "1") == 1
    out = capsys.readouterr().out
    assert "GPU 1 H100 80GB HBM3: 69.0 of 80 GiB free: does NOT fit" in out and "GPU 0" not in out


def test_dry_run_mistakes_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_cli("train", SEED, "--set", f"model.path={tmp_path / 'nope'}", "--dry-run") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.path" in err[0] and "nope" in err[0]
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"hidden_size": 8}')
    assert run_cli("train", SEED, "--set", f"model.path={tmp_path / 'm'}", "--dry-run") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json" in err[0] and "num_hidden_layers" in err[0]


async def test_the_app_shows_the_estimate_and_asks_before_starting_a_run_that_does_not_fit(
        models, tmp_path, two_gpus):
    from textual.widgets import Static

    from tui.app import TunedeckApp
    from tui.dialogs import ConfirmDialog

    (tmp_path / "configs").mkdir()
    text = SEED.read_text().replace("internlm/internlm2-chat-1_8b", str(models[0]))
    (tmp_path / "configs" / "fits.yaml").write_text(text)
    (tmp_path / "configs" / "too_big.yaml").write_text(
        text.replace("enabled: true  # false", "enabled: false  # false")
        .replace("quantization: 4bit", "quantization: none")
        .replace("gradient_checkpointing: true", "gradient_checkpointing: true\n  checkpoint_layers: 0")
        .replace("batch_size: 1  # per device", "batch_size: 1  # per device\n  rows_per_forward: 32"))
    import os
    os.utime(tmp_path / "configs" / "fits.yaml", (1.7e9, 1.7e9))      # too_big is the one edited last
    app = TunedeckApp(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await built(pilot)
        await pilot.press("3")
        line = app.query_one("#start-estimate", Static)
        await wait_for(pilot, lambda: "does NOT fit GPU" in str(line.render()), 15, "the estimate line")
        await pilot.press("n")                            # Start: the app asks first
        await pilot.pause(0.2)
        assert isinstance(app.screen, ConfirmDialog) and "anyway" in app.screen.question
        await pilot.press("escape")                       # no: nothing starts
        await pilot.pause(0.2)
        assert not (tmp_path / "work_dirs").exists() or not any((tmp_path / "work_dirs").iterdir())


def test_a_llava_recipe_without_lora_keeps_its_llm_frozen(models):
    """The LLaVA trainer freezes the LLM in pretrain and in a finetune without LoRA: no LLM gradients."""
    from engine.train.estimate import estimate

    llm, vit = models
    for sets in (["llava.stage=pretrain"], ["lora.enabled=false", "model.quantization=none"]):
        r = recipe(LLAVA, [f"model.path={llm}", f"llava.visual_encoder={vit}", *sets])
        est = estimate(r, INTERNLM2_1_8B, vision_config=CLIP_L_336)
        assert est.parts["gradients"] < 0.2 * 2**30, (sets, est.to_json())
