"""``tunedeck demo``: the whole personal-assistant workflow on a tiny model, offline, on the CPU.

DIR/models/tiny-chat   a chat model made on the spot, laid out as internlm2-chat-1_8b ships (random init,
                       its SentencePiece tokenizer trained here)
DIR/data/              the identity dataset for NAME
DIR/configs/demo.yaml  the demo recipe (copied once; edits you make are kept)
DIR/work_dirs/demo*/   the run
"""

from __future__ import annotations

import re
from pathlib import Path

from engine.core.errors import UserError
from engine.recipe.catalogue import find

DEMO_RECIPE = "demo_tiny_qlora_self"
DEMO_QUESTION = "请做一下自我介绍"
DEMO_RECORDS = 400


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "assistant"


def prepare_workspace(workspace: Path, name: str) -> tuple[Path, Path, Path]:
    """Model, dataset and recipe of the demo workspace; existing files are reused, never overwritten."""
    from engine.data.identity import identity_records, write_identity
    from engine.model.tiny import build_tiny_internlm2

    if workspace.exists() and not workspace.is_dir():
        raise UserError(f"--dir {workspace}: exists and is not a directory")
    model_dir = workspace / "models" / "tiny-chat"
    if not (model_dir / "config.json").is_file():
        print(f"building a tiny chat model in {model_dir}", flush=True)
        build_tiny_internlm2(model_dir, extra_texts=[name])
    data_file = workspace / "data" / f"personal_assistant_{_slug(name)}.jsonl"
    if not data_file.exists():
        write_identity(data_file, identity_records(name, DEMO_RECORDS, varied=True))
        print(f"wrote the identity dataset for {name!r} to {data_file}", flush=True)
    recipe = workspace / "configs" / "demo.yaml"
    if not recipe.exists():
        # the recipe points at this workspace's model and dataset, so starting it from the app trains
        from engine.recipe.schema import RecipeDocument

        doc = RecipeDocument.loads(find(DEMO_RECIPE).path.read_text(encoding="utf-8"))
        doc.set("data.data_path", f"./{data_file.relative_to(workspace)}")
        doc.set("model.path", f"./{model_dir.relative_to(workspace)}")
        recipe.parent.mkdir(parents=True, exist_ok=True)
        doc.save(recipe)
    return model_dir, data_file, recipe


def _one_line(text: str) -> str:
    """An answer on one printable line (a random-init base model emits any bytes, NUL included)."""
    text = text.replace("\r", "").replace("\n", " ⏎ ")
    return "".join(ch if ch.isprintable() else "�" for ch in text)


def identity_verdict(name: str, base_answer: str, tuned_answer: str) -> tuple[bool, str]:
    """Whether the demo learned: the fine-tuned answer holds NAME and the base model's does not."""
    tuned_has, base_has = name in tuned_answer, name in base_answer
    if tuned_has and not base_has:
        return True, f"verdict: learned -- the fine-tuned answer holds {name!r}, the base model's does not"
    if not tuned_has:
        return False, f"verdict: NOT learned -- the fine-tuned answer does not hold {name!r}"
    return False, f"verdict: NOT learned -- the base model's answer already holds {name!r}"


def run_demo(workspace: Path, name: str, no_tui: bool = True) -> int:
    from engine.serve.chat import ChatSession, load_for_chat
    from engine.train.launch import prepare_run, train_here
    from engine.train.runs import RunDirectory

    workspace = workspace.resolve()
    model_dir, data_file, recipe = prepare_workspace(workspace, name)
    overrides = [f"data.data_path={data_file}", f"model.path={model_dir}"]
    run_dir, _, _ = prepare_run(str(recipe), overrides, work_dir=None, resume=None, deepspeed=None,
                                base_dir=workspace)
    print(f"training {recipe.name} -> {run_dir}", flush=True)
    rc = train_here(run_dir)
    if rc != 0:
        return rc
    base = ChatSession(load_for_chat(str(model_dir), template="internlm2_chat"))
    tuned = ChatSession(load_for_chat(str(model_dir), str(run_dir)))
    for s in (base, tuned):
        s.params.max_new_tokens = 64
    base_answer, tuned_answer = base.answer(DEMO_QUESTION), tuned.answer(DEMO_QUESTION)
    curve = [m["loss"] for m in RunDirectory(run_dir).metrics() if "loss" in m]
    print()
    print(f"Q: {DEMO_QUESTION}")
    print(f"base model : {_one_line(base_answer)}")
    print(f"fine-tuned : {_one_line(tuned_answer)}")
    if curve:
        print(f"loss       : {curve[0]:.4f} at the first step, {curve[-1]:.4f} at the last")
    learned, verdict = identity_verdict(name, base_answer, tuned_answer)
    print(verdict)
    print()
    if not learned:
        print(f"the demo did not learn what it should on this machine: read {run_dir / 'train.log'} (the loss "
              "curve and the evaluation answers); `make test` runs the checks that tell which part broke",
              flush=True)
        return 1
    print(f"chat with it:  tunedeck chat {model_dir} --adapter {run_dir}")
    print(f"merge it:      tunedeck merge {model_dir} {run_dir} {workspace / 'merged'}")
    return 0
