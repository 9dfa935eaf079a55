"""Training for real on the CPU: the tiny model learns the identity, resume continues the same
loss curve, a kill during a checkpoint write leaves the last one intact, detach + stop work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import NAME, run_cli

from engine.data.identity import DEFAULT_ANSWER
from engine.train.runs import RunDirectory

IDENTITY = DEFAULT_ANSWER.format(name=NAME)


def losses(run: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in RunDirectory(run).metrics()}


def test_demo_learns_the_identity_and_the_base_does_not(tmp_path, capsys, cpu_bf16):
    """Whichever CPU bitsandbytes sees (with AVX512-BF16 its 4-bit layer repacks itself after an
    evaluation): the loss falls, the answer holds the name, the demo says so."""
    assert run_cli("demo", "--dir", tmp_path / "ws", "--name", NAME, "--no-tui") == 0
    out = capsys.readouterr().out
    base = next(line for line in out.splitlines() if line.startswith("base model : "))
    tuned = next(line for line in out.splitlines() if line.startswith("fine-tuned : "))
    assert tuned == f"fine-tuned : {IDENTITY}"
    assert NAME not in base          # a random-init base may still babble pieces of the corpus, never the name
    run = next((tmp_path / "ws" / "work_dirs").iterdir())
    curve = losses(run)
    assert curve[max(curve)] < 0.2 * curve[1]            # the loss really fell
    assert RunDirectory(run).status()["state"] == "finished"
    assert f"verdict: learned -- the fine-tuned answer holds {NAME!r}, the base model's does not" in out
    from engine.recipe.schema import RecipeDocument

    doc = RecipeDocument.load(tmp_path / "ws" / "configs" / "demo.yaml")   # started from the app, it trains as is
    assert (tmp_path / "ws" / doc.get("data.data_path")).is_file()
    assert (tmp_path / "ws" / doc.get("model.path") / "config.json").is_file()


def test_a_demo_that_did_not_learn_says_so_and_fails(tmp_path, capsys):
    """The demo checks its own answer: a recipe that cannot learn (a vanishing lr, two steps) ends in a failing
    verdict, exit 1 and a pointer to the log -- never a wrong answer printed as if it were right."""
    from conftest import DEMO_RECIPE

    recipe = tmp_path / "ws" / "configs" / "demo.yaml"
    recipe.parent.mkdir(parents=True)
    text = DEMO_RECIPE.read_text(encoding="utf-8")
    recipe.write_text(text.replace("lr: 2e-3", "lr: 1e-12").replace("max_epochs: 3", "max_epochs: 3\n  max_steps: 2"),
                      encoding="utf-8")
    assert run_cli("demo", "--dir", tmp_path / "ws", "--name", NAME, "--no-tui") == 1
    out = capsys.readouterr().out
    assert f"verdict: NOT learned -- the fine-tuned answer does not hold {NAME!r}" in out
    assert "train.log" in out and "chat with it" not in out


def test_demo_behind_a_pipe_says_how_to_open_the_app(tmp_path, capsys, monkeypatch):
    """Not in a terminal the app cannot open: after a demo that learned, `tunedeck demo` says how to open
    it (the demo itself, training included, is the test above; here only what `tunedeck` does after it)."""
    import engine.workflow.demo as demo
    from tui.main import main

    ws = tmp_path / "ws"
    monkeypatch.setattr(demo, "run_demo", lambda workspace, name, no_tui=False: print("verdict: learned") or 0)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False)
    assert main(["demo", "--dir", str(ws), "--name", NAME]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["verdict: learned", f"open the app with:  cd {ws} && tunedeck"]
    monkeypatch.setattr(demo, "run_demo", lambda workspace, name, no_tui=False: 1)     # did not learn: no hint
    assert main(["demo", "--dir", str(ws), "--name", NAME]) == 1
    assert "open the app" not in capsys.readouterr().out


def test_demo_verdicts():
    from engine.llava.demo import accuracy_verdict
    from engine.workflow.demo import identity_verdict

    assert identity_verdict("Ann", "hello", "我是Ann的小助手")[0]
    assert not identity_verdict("Ann", "我是Ann", "我是Ann的小助手")[0]     # the base knew it already
    assert not identity_verdict("Ann", "hello", "我是小助手")[0]
    assert accuracy_verdict(0.3, 0.95)[0]
    assert not accuracy_verdict(0.3, 0.85)[0]                               # below 90 %
    assert not accuracy_verdict(0.7, 0.95)[0]                               # not clearly above before


def test_run_directory_has_everything(trained_run):
    run = RunDirectory(trained_run)
    st = run.status()
    assert st["state"] == "finished" and st["step"] == st["total_steps"] and st["eta_s"] == 0
    m = run.metrics()
    assert [x["step"] for x in m] == list(range(1, st["total_steps"] + 1))
    assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "gpu_mem_gib"} <= set(m[0])
    evals = run.evals()
    assert {e["step"] for e in evals} >= {0, st["total_steps"]}          # at start and at the end
    assert all(e["answer"] == IDENTITY for e in evals if e["step"] == st["total_steps"])
    assert (trained_run / "config.yaml").is_file() and "step 1/" in run.log_path.read_text()
    cps = run.checkpoints()
    assert len(cps) == 2 and cps[-1].name == f"checkpoint-{st['total_steps']}"   # save_total_limit 2
    assert not list(trained_run.glob(".checkpoint-*"))


def test_checkpoint_is_a_peft_adapter_peft_loads_directly(trained_run, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ckpt = RunDirectory(trained_run).latest_checkpoint()
    assert (ckpt / "adapter_model.safetensors").is_file()
    assert {"optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json"} <= {p.name for p in ckpt.iterdir()}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model)), str(ckpt))
    cfg = model.peft_config["default"]
    assert cfg.r == 16 and set(cfg.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"}


def test_training_uses_4bit_base_weights(workspace):
    import bitsandbytes as bnb

    from engine.recipe.schema import load_recipe
    from engine.train.trainer import Trainer

    _, recipe = load_recipe("demo.yaml", ["model.path=models/tiny-chat",
                                          "data.data_path=data/personal_assistant.jsonl"])
    t = Trainer(recipe, RunDirectory(workspace / "r"))
    t.setup()
    kinds = {type(m) for m in t.model.modules()}
    assert any(issubclass(k, bnb.nn.Linear4bit) for k in kinds)
    assert all(p.requires_grad == ("lora_" in n) for n, p in t.model.named_parameters())


def test_chat_with_run_uses_its_template_and_answers_the_identity(trained_run, tiny_model, capsys):
    assert run_cli("chat", tiny_model, "--adapter", trained_run, "--prompt", "请做一下自我介绍") == 0
    assert capsys.readouterr().out.strip() == IDENTITY
    assert run_cli("chat", tiny_model, "--template", "internlm2_chat", "--prompt", "请做一下自我介绍",
                   "--max-new-tokens", "30") == 0
    assert NAME not in capsys.readouterr().out


def test_interactive_chat_keeps_history_reset_and_exit(trained_run, tiny_model, monkeypatch, capsys):
    from engine.serve.chat import ChatSession, load_for_chat

    s = ChatSession(load_for_chat(str(tiny_model), str(trained_run)))
    assert s.answer("你是谁") == IDENTITY
    assert len(s.history) == 2
    s.reset()
    assert s.history == []
    feed = iter(["你是谁", "RESET", "EXIT"])
    monkeypatch.setattr("builtins.input", lambda *_: next(feed))
    assert run_cli("chat", tiny_model, "--adapter", trained_run) == 0
    out = capsys.readouterr().out
    assert IDENTITY in out and "history cleared" in out


def test_merge_answers_like_base_plus_adapter(trained_run, tiny_model, tmp_path, capsys):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert run_cli("merge", tiny_model, trained_run, out, "--max-shard-size", "200KB") == 0
    assert len(list(out.glob("model-*.safetensors"))) > 1                  # sharded
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ckpt = RunDirectory(trained_run).latest_checkpoint()
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model)), str(ckpt)).eval()
    ids = torch.randint(10, 600, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)
    capsys.readouterr()
    assert run_cli("chat", out, "--template", "internlm2_chat", "--prompt", "请做一下自我介绍") == 0
    merged_answer = capsys.readouterr().out.strip()
    assert run_cli("chat", tiny_model, "--adapter", ckpt, "--prompt", "请做一下自我介绍") == 0
    assert merged_answer == capsys.readouterr().out.strip()
    assert run_cli("merge", tiny_model, trained_run, out) == 2              # never overwrites OUT


def test_resume_continues_the_same_loss_curve(workspace, capsys):
    """Uninterrupted run vs. the same run resumed from its step-5 checkpoint (dropout on, so the
    RNG state matters): every later loss and the final adapter are identical. Resuming from there
    replaces checkpoint-10 and -12, so it is refused until --force says so."""
    import torch
    from safetensors.torch import load_file

    sets = ["--set", "max_steps=12", "--set", "save_steps=5", "--set", "save_total_limit=-1",
            "--set", "lora.dropout=0.2", "--set", "evaluation_freq=4"]
    assert run_cli("train", "demo.yaml", "--work-dir", "a", *sets) == 0
    full = losses(workspace / "a")
    final = load_file(str(workspace / "a" / "checkpoint-12" / "adapter_model.safetensors"))
    capsys.readouterr()
    assert run_cli("train", "demo.yaml", "--work-dir", "a", "--resume", "a/checkpoint-5", *sets) == 2
    assert "--resume checkpoint-5: checkpoint-10, checkpoint-12 came after it and would be replaced" in \
        capsys.readouterr().err
    assert losses(workspace / "a") == full                                # nothing touched
    assert run_cli("train", "demo.yaml", "--work-dir", "a", "--resume", "a/checkpoint-5", "--force", *sets) == 0
    resumed = losses(workspace / "a")
    assert sorted(resumed) == list(range(1, 13))
    assert [resumed[s] for s in range(6, 13)] == [full[s] for s in range(6, 13)]
    again = load_file(str(workspace / "a" / "checkpoint-12" / "adapter_model.safetensors"))
    assert all(torch.equal(final[k], again[k]) for k in final)


def _spawn_train(workspace: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "engine.cli", "train", "demo.yaml", *args],
                            cwd=workspace, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(cond, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _train_killed_at(workspace: Path, name: str, stage: str, marker: str, limit: int) -> Path:
    """Train 12 steps (a checkpoint every 4) and kill -9 the trainer once ``marker`` appears in its run
    directory, with the checkpoint code paused at ``stage`` so the kill lands there."""
    run = workspace / name
    proc = _spawn_train(workspace, "--work-dir", name, "--set", "max_steps=12", "--set", "save_steps=4",
                        "--set", f"save_total_limit={limit}",
                        env={"TUNEDECK_FAULT_CHECKPOINT_DELAY": "3", "TUNEDECK_FAULT_CHECKPOINT_STAGE": stage})
    try:
        _wait_for(lambda: (run / marker).exists(), 240, f"the checkpoint code's {stage} stage")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return run


KILL_POINTS = {   # stage: the file whose appearance means the kill lands inside that stage
    "files": ".checkpoint-8.tmp/adapter_model.safetensors",
    "rename": ".checkpoint-8.tmp/trainer_state.json",
}


@pytest.mark.parametrize("stage", list(KILL_POINTS))
def test_kill_9_during_checkpoint_write_leaves_the_last_one_intact(workspace, stage):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = _train_killed_at(workspace, "k", stage, KILL_POINTS[stage], limit=-1)
    rd = RunDirectory(run)
    assert [p.name for p in rd.checkpoints()] == ["checkpoint-4"]
    assert rd.status()["state"] == "failed"                                # dead pid noticed
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(workspace / "models/tiny-chat")),
                              str(run / "checkpoint-4"))                    # intact and loadable
    assert run_cli("train", "demo.yaml", "--work-dir", "k", "--resume", "--set", "max_steps=12",
                   "--set", "save_steps=4", "--set", "save_total_limit=-1") == 0
    assert [p.name for p in rd.checkpoints()] == ["checkpoint-4", "checkpoint-8", "checkpoint-12"]
    assert not list(run.glob(".checkpoint-*")) and rd.status()["state"] == "finished"
    assert sorted(losses(run)) == list(range(1, 13))


def test_kill_9_while_rotating_keeps_the_newest_checkpoint(workspace):
    run = _train_killed_at(workspace, "rot", "rotate", ".checkpoint-4.deleting", limit=1)
    rd = RunDirectory(run)
    assert [p.name for p in rd.checkpoints()] == ["checkpoint-8"]
    assert run_cli("train", "demo.yaml", "--work-dir", "rot", "--resume", "--set", "max_steps=12",
                   "--set", "save_steps=4", "--set", "save_total_limit=1") == 0
    assert [p.name for p in rd.checkpoints()] == ["checkpoint-12"] and not list(run.glob(".checkpoint-*"))
    assert sorted(losses(run)) == list(range(1, 13))


def test_detach_survives_in_its_own_session_and_stop_saves_a_checkpoint(workspace, capsys):
    bad = subprocess.run([sys.executable, "-m", "engine.cli", "train", "demo.yaml", "--devices", "0,0"],
                         cwd=workspace, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "error: --devices: '0,0' is not allowed: give GPU indices like 0 or 1,3"), bad.stderr
    out = subprocess.run([sys.executable, "-m", "engine.cli", "train", "demo.yaml", "--detach", "--devices", "0",
                          "--set", "max_steps=100000", "--set", "save_steps=100000"], cwd=workspace,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    run = Path(out.stdout.strip().splitlines()[-1])
    rd = RunDirectory(run)
    assert rd.status()["devices"] == [0]
    try:
        _wait_for(lambda: rd.status().get("state") == "running" and rd.status().get("step", 0) >= 3, 240,
                  "the detached run to take steps")
        pid = rd.status()["pid"]
        assert os.getsid(pid) == pid                                       # its own session
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        assert b"CUDA_VISIBLE_DEVICES=0" in env                            # the chosen GPU only
        assert run_cli("runs", "--json") == 0
        listed = json.loads(capsys.readouterr().out)
        assert any(r["run"] == str(run) and r["state"] == "running" for r in listed)
        assert run_cli("stop", run) == 0
    finally:
        st = rd.status()
        if st.get("state") == "running":
            os.kill(st["pid"], signal.SIGKILL)
    st = rd.status()
    assert st["state"] == "stopped"
    assert rd.latest_checkpoint().name == f"checkpoint-{st['step']}"
    _wait_for(lambda: not os.path.exists(f"/proc/{pid}") or "Z" in open(f"/proc/{pid}/stat").read().split()[2],
              30, "the process to exit")
    capsys.readouterr()
    assert run_cli("runs") == 0
    assert "stopped" in capsys.readouterr().out


def test_tree_follows_symlinks_and_shows_sizes(workspace, capsys):
    assert run_cli("tree", workspace) == 0
    out = capsys.readouterr().out
    assert "|-- models/" in out and "|-- tiny-chat/" in out and "-> " in out
    assert "model.safetensors (" in out and "K)" in out
    assert run_cli("tree", workspace / "nope") == 2


def test_a_crash_fails_the_run_with_a_one_line_reason(workspace, monkeypatch, capsys):
    from engine.train import trainer

    def boom(self, batches):
        raise RuntimeError("simulated crash in step")

    monkeypatch.setattr(trainer.Trainer, "_train_step", boom)
    rc = run_cli("train", "demo.yaml", "--work-dir", "crash", "--set", "evaluation_inputs=[]")
    out, err = capsys.readouterr()
    assert rc == 1
    assert [ln for ln in err.splitlines() if "Traceback" in ln or ln.startswith(("error", "Error"))] == [
        f"error: training failed: RuntimeError: simulated crash in step (see {workspace / 'crash' / 'train.log'})"]
    assert "Traceback" not in out + err
    st = RunDirectory(workspace / "crash").status()
    assert st["state"] == "failed" and st["error"] == "RuntimeError: simulated crash in step"
    assert "Traceback" in (workspace / "crash" / "train.log").read_text()       # the details are kept


def test_tensorboard_events_when_installed(workspace):
    pytest.importorskip("tensorboard")
    assert run_cli("train", "demo.yaml", "--work-dir", "tb", "--set", "max_steps=3",
                   "--set", "evaluation_inputs=[]") == 0
    assert list((workspace / "tb" / "tensorboard").glob("events.out.tfevents.*"))


def test_profile_step_writes_a_summary_and_is_left_out_of_timing(workspace, monkeypatch, capsys):
    from engine.train.profiling import busy_ms as _busy_ms

    assert _busy_ms([(0, 1000), (500, 2500), (3000, 4000), (3100, 3200)]) == 3.5      # union, in ms
    monkeypatch.setenv("TUNEDECK_PROFILE_STEP", "2")
    assert run_cli("train", "demo.yaml", "--work-dir", "prof", "--set", "max_steps=3",
                   "--set", "evaluation_inputs=[]") == 0
    text = (workspace / "prof" / "profile" / "step2_rank0.txt").read_text()
    assert text.startswith("step 2 on rank 0 of 1: ") and "aten::mm" in text
    assert [m.get("profiled", False) for m in RunDirectory(workspace / "prof").metrics()] == [False, True, False]
    monkeypatch.setenv("TUNEDECK_PROFILE_STEP", "two")
    capsys.readouterr()
    assert run_cli("train", "demo.yaml", "--work-dir", "prof2", "--set", "max_steps=1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: TUNEDECK_PROFILE_STEP: 'two' is not a step number (1, 2, ...; 0 for none)"


def test_chunked_loss_and_fused_micro_batches_give_the_same_step(workspace):
    """The GPU paths, checked on the CPU: the loss from hidden states in chunks, and a window's
    micro-batches run as one forward, give the loss and gradients of the plain per-micro-batch step."""
    import torch

    from engine.recipe.schema import load_recipe
    from engine.train.runs import RunDirectory
    from engine.train.trainer import Trainer

    old = os.getcwd()
    os.chdir(workspace)
    try:
        _, recipe = load_recipe("demo.yaml", ["model.path=models/tiny-chat", "lora.dropout=0",
                                              "data.data_path=data/personal_assistant.jsonl",
                                              "model.quantization=none", "accumulative_counts=4"])
        t = Trainer(recipe, RunDirectory(workspace / "r_chunked"))
        t.setup()
    finally:
        os.chdir(old)
    batches = t._window(0, 0)
    assert len(batches) == 4
    assert t.loss_head is None                  # the CPU default: logits of the whole micro-batch
    head = t._make_loss_head()
    assert head is not None

    def step(chunked: bool, rows: int) -> tuple[float, list[torch.Tensor]]:
        t.loss_head = head if chunked else None
        t.optimizer.zero_grad(set_to_none=True)
        from engine.train.losses import regroup

        group = regroup(batches, rows, t.pad_id) if rows != recipe.train.batch_size else batches
        n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        total = 0.0
        for b in group:
            loss = t._loss_sum(b)
            (loss / n).backward()
            total += float(loss)
        return total / n, [p.grad.clone() for p in t.trainable]

    plain_loss, plain_grads = step(False, recipe.train.batch_size)
    head.chunk_tokens = 5                       # several chunks, the last one partial
    for chunked, rows in ((True, recipe.train.batch_size), (False, 8), (True, 8), (True, 3)):
        loss, grads = step(chunked, rows)
        assert loss == pytest.approx(plain_loss, rel=1e-5), (chunked, rows)
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(grads, plain_grads)), (chunked, rows)


def test_fast_path_trains_the_hand_written_loops_curve(workspace):
    """The GPU's fast path -- fused LoRA layers, the loss head in chunks, a window's rows in one forward --
    run here in fp32 without dropout, trains the loss curve of the hand-written transformers + peft +
    bitsandbytes loop that bench/train_throughput.py uses as its reference, step for step."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from train_throughput import reference_loop

    from engine.recipe.schema import load_recipe

    sets = ["model.path=models/tiny-chat", "data.data_path=data/personal_assistant.jsonl", "lora.dropout=0",
            "max_steps=6", "evaluation_inputs=[]", "save_steps=100", "accumulative_counts=3",
            "model.fused_lora=on", "train.loss_chunk_tokens=50", "rows_per_forward=6"]
    assert run_cli("train", "demo.yaml", "--work-dir", "fast", *[x for kv in sets for x in ("--set", kv)]) == 0
    assert " 14 fused LoRA layers" in (workspace / "fast" / "train.log").read_text()
    ours = [losses(workspace / "fast")[s] for s in range(1, 7)]
    _, recipe = load_recipe("demo.yaml", sets)
    ref = reference_loop(recipe, 6, rows_per_forward=2, device="cpu")["loss_curve"]
    assert ours == pytest.approx(ref, rel=2e-5)
    assert ours[-1] < 0.8 * ours[0]                   # it trained: the comparison is not of two flat lines


def test_compiled_layers_train_the_eager_curve_and_fall_back_when_they_fail(workspace, monkeypatch):
    """model.compile: decoder layers traced by torch.compile (symbolic sizes, inside gradient checkpointing,
    with the fused LoRA layers and their dropout) train the eager run's loss curve, and evaluation still
    generates; compiled layers that fail on the first step are replaced by the eager ones and the run goes on.
    (The "aot_eager" backend traces the same graphs as on a GPU without generating code.)"""
    import engine.model.loading as modeling

    monkeypatch.setattr(modeling, "COMPILE_BACKEND", "aot_eager")
    sets = ["model.path=models/tiny-chat", "data.data_path=data/personal_assistant.jsonl", "lora.dropout=0.1",
            "max_steps=4", "save_steps=100", "model.fused_lora=on", "model.gradient_checkpointing=true",
            "evaluation_freq=4", "evaluation_max_new_tokens=8"]

    def train(name: str, compile_: str) -> list[float]:
        args = [x for kv in sets + [f"model.compile={compile_}"] for x in ("--set", kv)]
        assert run_cli("train", "demo.yaml", "--work-dir", name, *args) == 0
        return [losses(workspace / name)[s] for s in range(1, 5)]

    eager = train("eager", "off")
    assert train("compiled", "on") == pytest.approx(eager, rel=1e-5)
    log = (workspace / "compiled" / "train.log").read_text()
    assert " 2 compiled decoder layers" in log and log.count("eval @4") == 2

    real = modeling.compile_decoder_layers

    def failing(model):                                 # compiled layers that break in training
        layers = real(model)
        for layer in layers:
            def broken(*a, _layer=layer, **k):
                if torch.is_grad_enabled():
                    raise RuntimeError("graph broke")
                return _layer._call_impl(*a, **k)
            layer._compiled_call_impl = broken
        return layers

    monkeypatch.setattr(modeling, "compile_decoder_layers", failing)
    assert train("fallback", "on") == pytest.approx(eager, rel=1e-5)
    assert "model.compile: the compiled layers failed (graph broke); running them eagerly" in (
        workspace / "fallback" / "train.log").read_text()
