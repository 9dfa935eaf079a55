"""Errors a user can cause, table-driven: each ends in one line naming the field, value, file or path,
exit code 2, no traceback, and nothing the user made is touched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and err.endswith(lines[0]), err
    return lines[0]


def _truncated_model(workspace: Path) -> Path:
    folder = workspace / "broken-model"
    shutil.copytree(workspace / "models" / "tiny-chat", folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    return folder


def _other_rank_checkpoint(workspace: Path) -> Path:
    assert run_cli("train", "demo.yaml", "--work-dir", "r8", "--set", "max_steps=2", "--set", "save_steps=2",
                   "--set", "lora.r=8", "--set", "evaluation_inputs=[]") == 0
    return workspace / "r8" / "checkpoint-2"


CASES = [
    # (what, argv (with {ws} for the workspace), a builder run first, expected error line)
    ("copy-cfg into a folder under a file",
     ["copy-cfg", "demo_tiny_qlora_self", "{ws}/afile/sub"], "afile",
     "error: {ws}/afile/sub: Not a directory"),
    ("copy-cfg --as with a folder in it",
     ["copy-cfg", "demo_tiny_qlora_self", "{ws}/cfg", "--as", "a/b"], None,
     "error: --as: 'a/b' is not a recipe name (letters, digits, _ . - only; no folders); give a name like my_recipe"),
    ("data identity -o into a folder under a file",
     ["data", "identity", "--name", "X", "-o", "{ws}/afile/x.json"], "afile",
     "error: {ws}/afile: is a file, not a folder"),
    ("--work-dir that is a file",
     ["train", "demo.yaml", "--work-dir", "{ws}/afile"], "afile",
     "error: --work-dir {ws}/afile: is a file, not a directory"),
    ("truncated model weights",
     ["chat", "{ws}/broken-model", "--prompt", "hi"], "truncated",
     "error: model.path: '{ws}/broken-model': {ws}/broken-model/model.safetensors is unreadable"),
    ("resuming a checkpoint of another rank",
     ["train", "demo.yaml", "--work-dir", "r16", "--resume", "{ws}/r8/checkpoint-2"], "rank8",
     "error: --resume {ws}/r8/checkpoint-2: its adapter has rank 8, the recipe's lora.r is 16"),
    ("a model folder that does not exist",
     ["chat", "{ws}/no-such-model", "--prompt", "hi"], None,
     "error: model.path: '{ws}/no-such-model': no such model directory"),
]


@pytest.mark.parametrize("what,argv,build,expected", CASES, ids=[c[0] for c in CASES])
def test_a_user_error_is_one_line_and_exit_2(workspace, capsys, what, argv, build, expected):
    ws = str(workspace)
    if build == "afile":
        (workspace / "afile").write_text("mine\n")
    elif build == "truncated":
        _truncated_model(workspace)
    elif build == "rank8":
        _other_rank_checkpoint(workspace)
    capsys.readouterr()
    assert run_cli(*[a.format(ws=ws) for a in argv]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(expected.format(ws=ws)), line
    if build == "afile":
        assert (workspace / "afile").read_text() == "mine\n"


def test_a_decompression_bomb_image_is_one_line(tmp_path, monkeypatch):
    from PIL import Image

    from engine.core.errors import UserError
    from engine.llava.model import open_image

    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)          # 64×64 is then a "bomb"
    with pytest.raises(UserError, match=r"big.png: the image has more than 2,000 pixels"):
        open_image(tmp_path / "big.png")


def test_a_torn_last_metrics_line_does_not_block_resume(workspace):
    assert run_cli("train", "demo.yaml", "--work-dir", "t", "--set", "max_steps=4", "--set", "save_steps=2",
                   "--set", "evaluation_inputs=[]") == 0
    metrics = workspace / "t" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 5, "lo')            # a kill in the middle of a line
    assert run_cli("train", "demo.yaml", "--work-dir", "t", "--resume", "t/checkpoint-2", "--force",  # -4 replaced
                   "--set", "max_steps=4", "--set", "save_steps=2", "--set", "evaluation_inputs=[]") == 0
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_huge_single_record_costs_what_max_length_allows(workspace, capsys, monkeypatch):
    """A 20 MB record is cut to what max_length tokens can span before it is tokenized: what reaches the
    tokenizer is bounded by max_length, and the sample is the one the whole record gives."""
    import engine.data.packing as data_mod
    from engine.data.packing import _longest_piece, tokenize_conversations
    from engine.data.templates import encode_conversation
    from engine.model.loading import load_tokenizer

    big = workspace / "data" / "big.jsonl"
    big.write_text(json.dumps({"messages": [{"role": "user", "content": "你好 hello " * 2_000_000},
                                            {"role": "assistant", "content": "ok"}]}, ensure_ascii=False) + "\n"
                   + (workspace / "data" / "personal_assistant.jsonl").read_text())
    seen: list[int] = []
    real = data_mod.encode_conversation
    monkeypatch.setattr(data_mod, "encode_conversation",
                        lambda tok, t, conv: seen.append(sum(len(m["content"]) for m in conv)) or real(tok, t, conv))
    assert run_cli("data", "check", "demo.yaml", "--set", f"data.data_path={big}") == 0
    assert "truncated: 1 of" in capsys.readouterr().out
    tok = load_tokenizer(str(workspace / "models" / "tiny-chat"))
    assert max(seen) <= 256 * _longest_piece(tok) + 64 < 20_000_000 // 100      # the demo recipe's max_length 256
    conv = [{"role": "user", "content": "你是谁"}, {"role": "assistant", "content": "上海 abc, 123 " * 50_000}]
    data = tokenize_conversations([conv], tok, "internlm2_chat", 256)
    ids, labels = encode_conversation(tok, "internlm2_chat", conv)          # the whole record, untruncated
    assert data.n_truncated == 1 and len(data.samples) == 1
    assert data.samples[0] == (ids[:256], labels[:256])                     # the same sample, at a bounded cost


def test_a_stop_during_setup_ends_the_run_at_once(workspace):
    import signal
    import subprocess
    import sys
    import time

    from engine.train.runs import RunDirectory

    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "train", "demo.yaml", "--work-dir", "s",
                             "--set", "max_steps=3"], cwd=workspace, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**__import__("os").environ, "TUNEDECK_FAULT_SETUP_DELAY": "30"})
    run = RunDirectory(workspace / "s")
    deadline = time.time() + 60
    while time.time() < deadline and run.status().get("state") != "starting":
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert run.status()["state"] == "stopped" and run.status()["step"] == 0
    assert not run.checkpoints()


@pytest.mark.parametrize("argv,expected", [
    (["data", "check", "demo.yaml", "--set", "data.data_path=mydata"],
     "error: data_path 'mydata': no such local file, and the hub cannot be reached"),
    (["chat", "someone/some-model", "--prompt", "hi"],
     "error: model.path: 'someone/some-model': no such local folder, not in the Hugging Face cache"),
], ids=["dataset name", "model id"])
def test_a_hub_name_on_a_machine_that_cannot_reach_the_hub_is_not_looked_up(workspace, capsys, monkeypatch,
                                                                             argv, expected):
    """Offline, a name that is no local path fails at once: the libraries' retrying downloads are never
    started (they took 77 s of retries)."""
    import datasets
    import transformers

    def never(*a, **kw):
        raise AssertionError("a hub download was attempted")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")          # nothing listens there: unreachable
    monkeypatch.setenv("HF_HUB_CACHE", str(workspace / "empty-hf-cache"))
    monkeypatch.setattr(datasets, "load_dataset", never)
    if argv[0] == "chat":                                       # (data check loads its local tokenizer)
        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", never)
        monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", never)
    assert run_cli(*argv) == 2
    assert _one_error_line(capsys).startswith(expected)


def test_a_decompression_bomb_sent_to_the_service_is_refused_in_one_line(tmp_path, monkeypatch):
    import io
    from types import SimpleNamespace

    from PIL import Image

    from engine.core.errors import UserError
    from engine.llava.serve import LlavaHost

    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, format="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(UserError, match=r"^the image has more than 2,000 pixels"):
        LlavaHost.open_image(SimpleNamespace(workspace=tmp_path), buf.getvalue())      # a data: URI's bytes


MISSING = [
    # (what, --set overrides, the recipe, expected error line): found before a run directory is made,
    # and before a detached worker is started (which had reported the error only in its run's log)
    ("a model folder that is not there", ["model.path=./models/tiny-chta"], "demo.yaml",
     "error: model.path: '{ws}/models/tiny-chta': no such model directory"),
    ("a model folder without config.json", ["model.path=./data"], "demo.yaml",
     "error: model.path: '{ws}/data' is a directory but holds no config.json (not a model folder)"),
    ("a data file that is not there", ["data.data_path=./data/nope.jsonl"], "demo.yaml",
     "error: data.data_path: '{ws}/data/nope.jsonl': no such data file"),
    ("a folder given as the data file", ["data.data_path=./data"], "demo.yaml",
     "error: data.data_path: '{ws}/data': is a directory, not a data file"),
    ("a LLaVA image folder that is not there",
     ["model.path=./models/tiny-chat", "data.data_path=./data/personal_assistant.jsonl",
      "llava.visual_encoder=./models/tiny-chat", "llava.image_folder=./imgs"], "demo_tiny_llava_finetune",
     "error: llava.image_folder: '{ws}/imgs': no such directory"),
]


@pytest.mark.parametrize("detach", [False, True], ids=["here", "detached"])
@pytest.mark.parametrize("what,sets,recipe,expected", MISSING, ids=[c[0] for c in MISSING])
def test_a_missing_model_or_data_stops_train_before_any_run_directory(workspace, capsys, what, sets, recipe,
                                                                      expected, detach):
    argv = ["train", recipe] + [a for kv in sets for a in ("--set", kv)] + (["--detach"] if detach else [])
    capsys.readouterr()
    assert run_cli(*argv) == 2
    assert _one_error_line(capsys) == expected.format(ws=workspace)
    assert not (workspace / "work_dirs").exists() or not any((workspace / "work_dirs").iterdir())


@pytest.mark.parametrize("sets,expected", [
    (["lr=abc"], "error: train.lr: 'abc' is not allowed: input should be a valid number"),
    (["model.path=./nope"], "error: model.path: '{ws}/nope': no such model directory"),
], ids=["a bad value", "a model that is not there"])
def test_queue_add_checks_the_recipe_now_not_when_its_turn_comes(workspace, capsys, sets, expected):
    from engine.workflow.queue import read_queue, scheduler_pid

    capsys.readouterr()
    assert run_cli("queue", "add", "demo.yaml", *[a for kv in sets for a in ("--set", kv)]) == 2
    assert _one_error_line(capsys).startswith(expected.format(ws=workspace))
    assert read_queue(workspace)["entries"] == []               # nothing queued, no scheduler started
    assert scheduler_pid(workspace) is None
