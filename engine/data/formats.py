"""Reading training data: records from a file or a hub dataset, converted to conversations.

Formats: OpenAI ``messages`` (what the tutorial's identity data uses), alpaca (instruction/input/output) and
sharegpt (conversations with from/value). Files are .json (a list) or .jsonl;
anything else is handed to ``datasets.load_dataset`` (a hub name or a local
dataset folder). Every problem names file:line or the record index.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine.core.errors import DataError
from engine.data.templates import ROLES

FORMATS = ("openai", "alpaca", "sharegpt")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


# ---------------------------------------------------------------------------
# Reading


def read_records(path: str | Path) -> list[Any]:
    """Raw JSON records of a .json/.jsonl file; malformed JSON names file:line."""
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{p}: is a directory; data_path needs a .json or .jsonl file")
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{p}: no such data file") from None
    except UnicodeDecodeError as e:
        raw = p.read_bytes()
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{p}:{line}: not UTF-8 text (byte {column} of the line: {raw[e.start:e.start + 1]!r}); "
                        "save the file as UTF-8") from None
    except OSError as e:
        raise DataError(f"{p}: cannot read ({e.strerror})") from None
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"{p}: the dataset is empty")
    if p.suffix == ".jsonl" or (p.suffix != ".json" and not stripped.startswith("[")):
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{lineno}: malformed JSON line: {e.msg} (column {e.colno})") from None
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
        if isinstance(records, dict):
            records = [records]
        if not isinstance(records, list):
            raise DataError(f"{p}: expected a JSON list of records")
    if not records:
        raise DataError(f"{p}: the dataset is empty (no records)")
    return records


def detect_format(record: Any) -> str | None:
    if isinstance(record, dict):
        if "messages" in record:
            return "openai"
        if "conversations" in record:
            return "sharegpt"
        if "instruction" in record or "output" in record:
            return "alpaca"
    return None


def to_messages(record: Any, fmt: str, where: str) -> list[dict]:
    """Convert one record to [{role, content}, ...]; ``where`` names it in errors."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if fmt == "openai":
        msgs = record.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: missing key 'messages' (a non-empty list)")
        out = []
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(f"{where}: message {j} needs 'role' and 'content'")
            if m["role"] not in ROLES:
                raise DataError(f"{where}: message {j} has unknown role {m['role']!r} "
                                f"(allowed: {', '.join(ROLES)})")
            if not isinstance(m["content"], str):
                raise DataError(f"{where}: message {j} content must be a string")
            out.append({"role": m["role"], "content": m["content"]})
    elif fmt == "alpaca":
        if "instruction" not in record or "output" not in record:
            missing = [k for k in ("instruction", "output") if k not in record]
            raise DataError(f"{where}: missing key {', '.join(repr(k) for k in missing)} (alpaca format)")
        prompt = str(record["instruction"])
        if record.get("input"):
            prompt += "\n" + str(record["input"])
        out = []
        if record.get("system"):
            out.append({"role": "system", "content": str(record["system"])})
        out += [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(record["output"])}]
    elif fmt == "sharegpt":
        conv = record.get("conversations")
        if not isinstance(conv, list) or not conv:
            raise DataError(f"{where}: missing key 'conversations' (a non-empty list)")
        out = []
        if record.get("system"):
            out.append({"role": "system", "content": str(record["system"])})
        for j, m in enumerate(conv):
            if not isinstance(m, dict) or "from" not in m or "value" not in m:
                raise DataError(f"{where}: turn {j} needs 'from' and 'value'")
            role = _SHAREGPT_ROLES.get(str(m["from"]).lower())
            if role is None:
                raise DataError(f"{where}: turn {j} has unknown role {m['from']!r} "
                                f"(allowed: human, gpt, system)")
            out.append({"role": role, "content": str(m["value"])})
    else:
        raise DataError(f"{where}: unknown format {fmt!r}")
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: no assistant message, nothing to learn from")
    return out


def load_conversations(data_path: str, fmt: str = "auto") -> list[list[dict]]:
    """All conversations of a dataset, validated."""
    p = Path(data_path)
    if p.suffix in (".json", ".jsonl") or (p.exists() and p.suffix not in (".parquet", ".csv", ".arrow")):
        records = read_records(p)
        source = str(p)
    else:
        records = _load_hub_dataset(data_path)
        source = data_path
    if fmt == "auto":
        fmt = detect_format(records[0]) or ""
        if not fmt:
            raise DataError(f"{source}: record 1: unknown format; expected 'messages' (openai), "
                            "'instruction'/'output' (alpaca) or 'conversations' (sharegpt)")
    return [to_messages(r, fmt, f"{source}: record {i}") for i, r in enumerate(records, 1)]   # 1-based, as LLaVA's


def _load_hub_dataset(name: str) -> list[Any]:
    builders = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
    try:
        import datasets

        suffix = Path(name).suffix
        if suffix in builders and Path(name).exists():
            ds = datasets.load_dataset(builders[suffix], data_files=name, split="train")
        else:
            from engine.core.hub import explicitly_offline, hub_reachable

            if not explicitly_offline() and not hub_reachable():
                raise DataError(f"data_path {name!r}: no such local file, and the hub cannot be reached from here "
                                "to fetch a dataset of that name; give a local .json/.jsonl path")
            ds = datasets.load_dataset(name, split="train")
    except DataError:
        raise
    except Exception as e:  # offline, unknown name, ...
        raise DataError(f"data_path {name!r}: not a local file, and datasets could not load it "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if len(ds) == 0:
        raise DataError(f"{name}: the dataset is empty (no records)")
    return list(ds)
