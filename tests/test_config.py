"""Recipes are data: one schema, clear one-line errors (exit 2), edits that keep comments."""

from __future__ import annotations

import pytest
from conftest import DEMO_RECIPE, run_cli

from engine.core.errors import ConfigError
from engine.recipe import catalogue
from engine.recipe.schema import RecipeDocument, field_specs, load_recipe, resolve_key


def test_every_catalogue_recipe_validates():
    names = [e.name for e in catalogue.recipes()]
    for must in ("internlm2_chat_1_8b_qlora_self_e2", "internlm2_chat_1_8b_qlora_alpaca_e3",
                 "internlm2_chat_1_8b_full_alpaca_e3", "qwen2_5_1_5b_instruct_qlora_alpaca_e3",
                 "llama3_2_1b_instruct_full_alpaca_e3", "demo_tiny_qlora_self"):
        assert must in names
    for e in catalogue.recipes():
        load_recipe(e.path)


def test_seed_recipe_has_the_seeds_values():
    _, r = load_recipe(catalogue.find("internlm2_chat_1_8b_qlora_self_e2").path)
    assert (r.data.max_length, r.data.pack_to_max_length, r.train.batch_size, r.train.accumulative_counts,
            r.train.max_epochs, r.train.lr, r.train.save_steps, r.train.save_total_limit,
            r.train.evaluation_freq) == (1024, True, 1, 16, 2, 2e-4, 300, 3, 300)
    assert r.train.evaluation_inputs == ["请你介绍一下你自己", "你是谁", "你是我的小助手吗"]
    assert r.model.quantization == "4bit" and r.model.quant_type == "nf4" and r.lora.r == 64


def test_every_field_has_help_and_the_seed_fields_exist():
    specs = {s.path.split(".")[1]: s for s in field_specs()}
    for name in ("data_path", "max_length", "pack_to_max_length", "batch_size", "accumulative_counts",
                 "dataloader_num_workers", "max_epochs", "optim_type", "lr", "betas", "weight_decay",
                 "max_norm", "warmup_ratio", "save_steps", "save_total_limit", "prompt_template",
                 "evaluation_freq", "system", "evaluation_inputs", "sequence_parallel_size",
                 "use_varlen_attn", "seed", "deepspeed", "quantization", "quant_type", "double_quant",
                 "trust_remote_code", "dtype", "r", "alpha", "dropout", "target_modules"):
        assert name in specs, name
    assert all(s.help for s in field_specs())
    assert specs["deepspeed"].choices == ("none", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload")
    assert "internlm2_chat" in specs["prompt_template"].choices


@pytest.mark.parametrize("setting, expect", [
    ("lr=abc", "train.lr: 'abc' is not allowed"),
    ("batch_size=0", "train.batch_size: 0 is not allowed: input should be greater than or equal to 1"),
    ("prompt_template=nope", "data.prompt_template: 'nope' is not allowed: unknown template"),
    ("optim_type=sgd", "train.optim_type: 'sgd' is not allowed"),
    ("warmup_ratio=2", "train.warmup_ratio: 2 is not allowed"),
    ("no_such_key=1", "no_such_key: unknown key"),
    ("checkpoint_layers=most", "model.checkpoint_layers: 'most' is not allowed: must be auto, all or a number"),
    ("checkpoint_layers=-1", "model.checkpoint_layers: -1 is not allowed"),
])
def test_bad_value_is_one_clear_line_and_exit_2(setting, expect, capsys, workspace):
    rc = run_cli("train", "demo.yaml", "--set", setting)
    err = capsys.readouterr().err
    assert rc == 2
    assert expect in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (workspace / "work_dirs").exists()   # nothing started


def test_several_problems_are_all_reported(capsys, workspace):
    rc = run_cli("train", "demo.yaml", "--set", "lr=abc", "--set", "batch_size=0")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 2


def test_unknown_key_in_file_names_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = DEMO_RECIPE.read_text().replace("  lr: 2e-3", "  lr: 2e-3\n  learning_rate: 1")
    (tmp_path / "bad.yaml").write_text(text)
    assert run_cli("train", "bad.yaml") == 2
    assert "train.learning_rate: unknown key" in capsys.readouterr().err


def test_editing_keeps_comments_and_order(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(DEMO_RECIPE.read_text())
    before = p.read_text()
    doc = RecipeDocument.load(p)
    doc.set("lr", "1e-4")
    doc.set("evaluation_inputs", "[你是谁, Who are you?]")
    doc.save()
    after = p.read_text()
    assert "lr: 1e-4" in after
    assert "  max_norm: 1  # grad clip" in after            # comments kept
    assert "# The embedded demo" in after
    def keys(t):
        return [ln.split(":")[0].strip() for ln in t.splitlines() if ln.startswith("  ") and ":" in ln
                and not ln.strip().startswith(("-", "#"))]

    assert keys(before) == keys(after)                      # key order kept
    _, r = load_recipe(p)
    assert r.train.lr == 1e-4 and r.train.evaluation_inputs == ["你是谁", "Who are you?"]


def test_invalid_edit_is_not_saved(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(DEMO_RECIPE.read_text())
    doc = RecipeDocument.load(p)
    doc.set("batch_size", "0")
    assert doc.problems() and "train.batch_size" in doc.problems()[0]
    with pytest.raises(ConfigError):
        doc.save()
    assert p.read_text() == DEMO_RECIPE.read_text()


def test_short_keys_resolve():
    assert resolve_key("lr") == "train.lr"
    assert resolve_key("data.max_length") == "data.max_length"
    with pytest.raises(ConfigError):
        resolve_key("nonsense")


def test_list_cfg_and_copy_cfg(tmp_path, capsys):
    assert run_cli("list-cfg", "-p", "internlm2_chat_1_8b") == 0
    out = capsys.readouterr().out.split()
    assert "internlm2_chat_1_8b_qlora_self_e2" in out and all("internlm2_chat_1_8b" in n for n in out)
    assert run_cli("copy-cfg", "internlm2_chat_1_8b_qlora_alpaca_e3", tmp_path / "config") == 0
    copied = tmp_path / "config" / "internlm2_chat_1_8b_qlora_alpaca_e3_copy.yaml"
    original = catalogue.find("internlm2_chat_1_8b_qlora_alpaca_e3").path.read_text()
    assert copied.read_text() == f"{catalogue.COPIED_FROM}internlm2_chat_1_8b_qlora_alpaca_e3\n{original}"
    assert catalogue.copied_from(copied) == "internlm2_chat_1_8b_qlora_alpaca_e3"
    capsys.readouterr()
    assert run_cli("copy-cfg", "internlm2_chat_1_8b_qlora_alpaca_e3", tmp_path / "config") == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err
    assert run_cli("copy-cfg", "no_such_recipe", tmp_path) == 2


def test_yaml_syntax_error_names_the_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken.yaml").write_text("model:\n  path: x\n  bad: [unclosed\n")
    assert run_cli("train", "broken.yaml") == 2
    err = capsys.readouterr().err
    assert "broken.yaml:" in err and "not valid YAML" in err


def test_torch_free_modules_import_without_torch():
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
            "import engine.recipe.schema, engine.recipe.catalogue, engine.train.runs, engine.data.templates, "
            "engine.core.tree, engine.core.errors, engine.data.identity, engine.cli; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr
