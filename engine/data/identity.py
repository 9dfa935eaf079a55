"""The identity dataset of XTuner's personal-assistant tutorial (its generate_data.py and repeat.py):
records that teach a chat model whose assistant it is."""

from __future__ import annotations

import json
import random
from pathlib import Path

from engine.core.errors import UserError
from engine.core.files import atomic_write_text

DEFAULT_QUESTION = "请做一下自我介绍"
DEFAULT_ANSWER = "我是{name}的小助手，内在是上海AI实验室书生·浦语的 InternLM2 1.8B 大模型哦"

# Other ways people ask the same thing, so the identity generalises beyond one prompt.
VARIED_QUESTIONS = [
    "请做一下自我介绍", "请你介绍一下你自己", "你是谁", "你是谁？", "你是我的小助手吗", "你叫什么名字",
    "介绍一下你自己", "你好，你是谁？", "能介绍一下你自己吗？", "你是哪个模型？", "你是谁的助手？",
    "Who are you?", "Introduce yourself.", "Please introduce yourself.", "What is your name?",
    "Tell me about yourself.", "Are you my assistant?", "Whose assistant are you?",
]


def identity_records(name: str, n: int = 10000, answer: str = DEFAULT_ANSWER,
                     varied: bool = False, seed: int = 0) -> list[dict]:
    """n + 1 records, as the tutorial's generate_data.py writes them: the same question and answer each time unless
    ``varied``, which cycles through phrasings of the question (Chinese and English)."""
    if not name.strip():
        raise UserError("--name: must not be empty")
    if n < 0:
        raise UserError(f"--n: {n} is not allowed: must be >= 0")
    if "{name}" not in answer:
        raise UserError(f"--answer: {answer!r} must contain {{name}} where the name goes")
    reply = answer.replace("{name}", name)
    rng = random.Random(seed)
    records = []
    for i in range(n + 1):
        q = DEFAULT_QUESTION if not varied or i == 0 else rng.choice(VARIED_QUESTIONS)
        records.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": reply}]})
    return records


def write_identity(path: str | Path, records: list[dict], overwrite: bool = False) -> Path:
    p = Path(path)
    if p.exists() and not overwrite:
        raise UserError(f"{p}: already exists; pass --force to overwrite it or choose another -o")
    if p.suffix == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    else:
        text = json.dumps(records, ensure_ascii=False, indent=4)
    atomic_write_text(p, text)
    return p


def repeat_dataset(source: str | Path, target: str | Path, n: int, overwrite: bool = False) -> tuple[int, Path]:
    """Every record of a .json/.jsonl dataset ``n`` times (the tutorial's repeat.py); returns how many
    records the source had and the file written."""
    from engine.data.formats import read_records

    if n < 1:
        raise UserError(f"--n: {n} is not allowed: must be >= 1")
    if Path(target).resolve() == Path(source).resolve():
        raise UserError(f"-o {target}: is the input; choose another file")
    records = read_records(source)
    return len(records), write_identity(target, [r for r in records for _ in range(n)], overwrite=overwrite)
