"""`tunedeck import-xtuner`: XTuner's own .py configs (the tutorial's modified ones, read from the seed
walkthrough) become recipes field by field, by their syntax tree alone: nothing in a config ever runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import REPO, run_cli

SEED = REPO.parent / "shared" / "seed" / "xtuner-internlm2-homework.md"


def tutorial_config(marker: str, tmp_path: Path) -> Path:
    if not SEED.exists():
        pytest.skip(f"{SEED} is not beside this checkout")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", SEED.read_text(encoding="utf-8"), re.S)
              if "PART 1" in b and marker in b]
    assert len(blocks) == 1, f"one config with {marker} in the walkthrough"
    out = tmp_path / f"{marker}.py"
    out.write_text(blocks[0])
    return out


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def shipped(name: str) -> dict:
    from ruamel.yaml import YAML

    return flat(YAML(typ="safe").load(next(REPO.glob(f"configs/*/{name}.yaml")).read_text()))


def imported(path: Path, tmp_path: Path) -> dict:
    from ruamel.yaml import YAML

    out = tmp_path / "out.yaml"
    assert run_cli("import-xtuner", path, "-o", out) == 0
    return flat(YAML(typ="safe").load(out.read_text()))


def test_the_tutorials_text_config_maps_field_by_field_onto_the_shipped_recipe(tmp_path, capsys):
    got = imported(tutorial_config("SupervisedFinetune", tmp_path), tmp_path)
    want = shipped("internlm2_chat_1_8b_qlora_self_e2")
    # what the tutorial changed on purpose, and how it reads here
    changed = {"model.path": "/root/xtuner0117/ft/internlm2-chat-1_8b",
               "data.data_path": "/root/xtuner0117/ft/data/personal_assistant.json",
               "data.prompt_template": "default",                      # PROMPT_TEMPLATE.default
               "data.system": "Below is an instruction that describes a task. Write a response that "
                              "appropriately completes the request.\n",  # SYSTEM_TEMPLATE.alpaca
               "model.dtype": "float16"}
    for key, value in changed.items():
        assert got[key] == value, key
    same = [k for k in want if k not in changed and k not in ("model.trust_remote_code", "data.format",
                                                             "lora.target_modules", "train.seed", "train.deepspeed")]
    assert len(same) >= 20
    for key in same:
        assert key in got, f"{key} not imported"
        assert got[key] == want[key] or float(got[key]) == float(want[key]), (key, got[key], want[key])
    assert got["data.format"] == "openai" and got["train.mixed_precision"] == "fp16"
    err = capsys.readouterr().err
    assert "if use_varlen_attn" in err and "not evaluated" in err          # listed, not dropped
    assert "--deepspeed" in err


def test_the_tutorials_llava_finetune_config_maps_onto_the_shipped_recipe(tmp_path):
    got = imported(tutorial_config("LLaVAModel", tmp_path), tmp_path)
    want = shipped("llava_internlm2_chat_1_8b_qlora_clip_vit_large_p14_336_lora_e1_finetune")
    for key in ("lora.r", "lora.alpha", "lora.dropout", "lora.bias", "model.quantization", "model.quant_type",
                "model.double_quant", "model.dtype", "data.max_length", "data.prompt_template", "llava.stage",
                "llava.pad_image_to_square", "llava.visual_encoder_lora", "llava.visual_encoder_lora_r",
                "llava.visual_encoder_lora_alpha", "llava.visual_encoder_lora_dropout", "train.batch_size",
                "train.accumulative_counts", "train.max_epochs", "train.lr", "train.save_steps",
                "train.save_total_limit", "train.evaluation_freq", "train.evaluation_inputs", "llava.enabled"):
        assert got[key] == want[key], (key, got.get(key), want[key])
    assert got["data.max_length"] == 1472                                  # int(2048 - (336 / 14)**2)
    assert got["llava.visual_encoder"] == "/root/Tutorial/xtuner/llava/clip-vit-large-patch14-336"
    assert got["data.data_path"] == "/root/Tutorial/xtuner/llava/llava_data/repeated_data.json"
    assert got["llava.image_folder"] == "/root/Tutorial/xtuner/llava/llava_data/"


def test_a_config_with_side_effects_runs_none_of_them(tmp_path, capsys):
    marker = tmp_path / "ran"
    cfg = tmp_path / "evil.py"
    cfg.write_text(f"""import os, subprocess
from torch.optim import AdamW
os.system("touch {marker}_system")
open("{marker}_open", "w").write("x")
subprocess.run(["touch", "{marker}_subprocess"])
lr = __import__("os").system("touch {marker}_import") or 1e-4
max_epochs = 3
batch_size = 2
optim_type = AdamW
model = dict(llm=dict(pretrained_model_name_or_path="{tmp_path / 'm'}"), lora=dict(r=8, lora_alpha=16))
train_dataloader = dict(dataset=dict(dataset=dict(path="json", data_files=dict(train="d.json"))))
""")
    out = tmp_path / "r.yaml"
    assert run_cli("import-xtuner", cfg, "-o", out) == 0
    assert not list(tmp_path.glob("ran*"))
    err = capsys.readouterr().err
    assert err.count("not evaluated") == 3 and "lr = " in err                 # each listed, one line
    text = out.read_text()
    assert "max_epochs: 3" in text and "r: 8" in text and "lr:" not in text


def test_import_mistakes_are_one_line_and_nothing_is_overwritten(tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text("lr = 1e-4\nmodel = dict(\n")
    assert run_cli("import-xtuner", bad, "-o", tmp_path / "o.yaml") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{bad}:" in err[0] and "not Python" in err[0]
    assert run_cli("import-xtuner", tmp_path / "missing.py") == 2
    assert "missing.py" in capsys.readouterr().err
    ok = tmp_path / "ok.py"
    ok.write_text("max_epochs = 0.5\nlr = -1\nmodel = dict(llm=dict(pretrained_model_name_or_path='x'))\n"
                  "train_dataloader = dict(dataset=dict(data_path='d.json'))\n")
    assert run_cli("import-xtuner", ok, "-o", tmp_path / "o.yaml") == 2
    assert "train.lr" in capsys.readouterr().err                              # the field and its value
    (tmp_path / "mine.yaml").write_text("mine\n")
    ok.write_text("model = dict(llm=dict(pretrained_model_name_or_path='x'))\n"
                  "train_dataloader = dict(dataset=dict(data_path='d.json'))\n")
    assert run_cli("import-xtuner", ok, "-o", tmp_path / "mine.yaml") == 2
    assert (tmp_path / "mine.yaml").read_text() == "mine\n"


async def test_the_configs_screen_imports_a_py_by_keys(tmp_path):
    from test_tui import built, wait_for
    from textual.widgets import Tree

    from tui.app import TunedeckApp

    (tmp_path / "my_xtuner_cfg.py").write_text(
        "import os\nos.system('touch ran')\nlr = 1e-4\nmax_epochs = 1\n"
        "model = dict(llm=dict(pretrained_model_name_or_path='internlm/internlm2-chat-1_8b'), lora=dict(r=16))\n"
        "train_dataloader = dict(dataset=dict(dataset=dict(path='json', data_files=dict(train='d.json'))))\n")
    app = TunedeckApp(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await built(pilot)
        await pilot.press("1", "f6")                  # the file picker opens on the workspace
        await pilot.pause(0.5)
        await pilot.press("down", "enter")            # the .py under the folder's name
        target = tmp_path / "configs" / "my_xtuner_cfg.yaml"
        await wait_for(pilot, target.exists, 10, "the imported recipe")
        tree = app.query_one("#cfg-tree", Tree)
        await wait_for(pilot, lambda: tree.cursor_node is not None and tree.cursor_node.data == target, 5,
                       "the new recipe chosen in the tree")
    assert "r: 16" in target.read_text() and not (tmp_path / "ran").exists()
