"""Training data: read records, convert them to conversations, tokenize, pack.

Formats: OpenAI ``messages`` (the seed's), alpaca (instruction/input/output) and
sharegpt (conversations with from/value). Files are .json (a list) or .jsonl;
anything else is handed to ``datasets.load_dataset`` (a hub name or a local
dataset folder). Every problem names file:line or the record index.
"""

from __future__ import annotations

import json
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError
from .templates import IGNORE_INDEX, ROLES, encode_conversation

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
            from .hub import explicitly_offline, hub_reachable

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


# ---------------------------------------------------------------------------
# Tokenizing and packing


def _longest_piece(tokenizer: Any) -> int:
    """Characters one token can cover at most (so max_length tokens never span more than
    max_length times this many characters); capped, cached on the tokenizer."""
    cached = getattr(tokenizer, "_tunedeck_longest_piece", None)
    if cached is None:
        try:
            cached = min(64, max((len(t) for t in tokenizer.get_vocab()), default=16))
        except Exception:
            cached = 64
        try:
            tokenizer._tunedeck_longest_piece = cached
        except Exception:
            pass
    return cached


def _cut_to_chars(conv: list[dict], limit: int) -> list[dict]:
    total = 0
    out = []
    for m in conv:
        room = limit - total
        if room <= 0:
            break
        text = m["content"]
        if len(text) > room:
            out.append({**m, "content": text[:room]})
            break
        out.append(m)
        total += len(text)
    return out


@dataclass
class TokenizedData:
    samples: list[tuple[list[int], list[int]]]
    n_records: int
    n_truncated: int
    n_dropped: int               # nothing left to learn after truncation
    lengths: list[int] = field(default_factory=list)

    def stats(self) -> dict[str, float]:
        ls = sorted(self.lengths) or [0]
        return {"min": ls[0], "mean": round(statistics.fmean(ls), 1), "median": statistics.median(ls),
                "p95": ls[min(len(ls) - 1, int(0.95 * len(ls)))], "max": ls[-1]}


def tokenize_conversations(conversations: list[list[dict]], tokenizer: Any, template: str,
                           max_length: int, num_workers: int = 0) -> TokenizedData:
    """Encode every conversation (each distinct one once: identity data repeats one record
    10,000 times); ``num_workers`` > 0 spreads large datasets over processes. A conversation longer
    than ``max_length`` tokens can be is cut to that bound in characters first, so one huge record
    costs no more than any truncated one."""
    limit = max_length * _longest_piece(tokenizer) + 64
    conversations = [_cut_to_chars(c, limit) for c in conversations]
    keys = [json.dumps(conv, ensure_ascii=False, sort_keys=True) for conv in conversations]
    unique: dict[str, list[dict]] = {}
    for k, conv in zip(keys, conversations):
        unique.setdefault(k, conv)
    try:
        if num_workers > 0 and len(unique) >= 2000:
            import multiprocessing as mp
            from functools import partial

            with mp.get_context("spawn").Pool(num_workers) as pool:
                encoded = pool.map(partial(encode_conversation, tokenizer, template), list(unique.values()),
                                   chunksize=256)
        else:
            encoded = [encode_conversation(tokenizer, template, c) for c in unique.values()]
    except ValueError as e:
        raise DataError(f"prompt_template {template!r}: {e}") from None
    cache = dict(zip(unique, encoded))
    samples, lengths = [], []
    truncated = dropped = 0
    for key in keys:
        ids, labels = cache[key]
        lengths.append(len(ids))
        if len(ids) > max_length:
            truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if all(lab == IGNORE_INDEX for lab in labels[1:]):
            dropped += 1
            continue
        samples.append((ids, labels))
    return TokenizedData(samples, len(conversations), truncated, dropped, lengths)


@dataclass
class Row:
    """One model input row: a sample, or several packed ones (position ids restart per sample)."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


def pack_samples(samples: list[tuple[list[int], list[int]]], max_length: int) -> list[Row]:
    """Greedy packing in order: a sample never straddles two rows."""
    rows: list[Row] = []
    cur = Row([], [], [])
    for ids, labels in samples:
        if cur.input_ids and cur.n_tokens + len(ids) > max_length:
            rows.append(cur)
            cur = Row([], [], [])
        cur.input_ids += ids
        cur.labels += labels
        cur.position_ids += list(range(len(ids)))
    if cur.input_ids:
        rows.append(cur)
    return rows


def build_rows(tok: TokenizedData, max_length: int, pack: bool, seed: int) -> list[Row]:
    samples = list(tok.samples)
    if pack:
        random.Random(seed).shuffle(samples)   # shuffle before packing, as XTuner does
        return pack_samples(samples, max_length)
    return [Row(ids, labels, list(range(len(ids)))) for ids, labels in samples]


def collate(rows: list[Row], pad_id: int) -> dict[str, list[list[int]]]:
    """Pad a batch. Padding is its own position-id segment, so no attention mask is needed:
    transformers builds a block-diagonal causal mask from restarting position ids."""
    width = max(r.n_tokens for r in rows)
    out: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
    for r in rows:
        pad = width - r.n_tokens
        out["input_ids"].append(r.input_ids + [pad_id] * pad)
        out["labels"].append(r.labels + [IGNORE_INDEX] * pad)
        out["position_ids"].append(r.position_ids + list(range(pad)))
    return out


def masked_segments(tokenizer: Any, ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """The sample as (text, masked) runs: masked = not trained."""
    out: list[tuple[str, bool]] = []
    run: list[int] = []
    masked: bool | None = None
    for t, lab in zip(ids, labels):
        m = lab == IGNORE_INDEX
        if masked is not None and m != masked:
            out.append((tokenizer.decode(run, skip_special_tokens=False), masked))
            run = []
        run.append(t)
        masked = m
    if run:
        out.append((tokenizer.decode(run, skip_special_tokens=False), bool(masked)))
    return out


def render_masked(tokenizer: Any, ids: list[int], labels: list[int]) -> str:
    """The sample as text with the masked (untrained) spans wrapped in ⟦ ⟧."""
    return "".join(f"⟦{t}⟧" if m else t for t, m in masked_segments(tokenizer, ids, labels))


def length_histogram(lengths: list[int], buckets: int = 16) -> list[tuple[int, int, int]]:
    """(low, high, count) buckets of token lengths."""
    if not lengths:
        return []
    lo, hi = min(lengths), max(lengths)
    width = max(1, -(-(hi - lo + 1) // buckets))
    counts = [0] * buckets
    for n in lengths:
        counts[min(buckets - 1, (n - lo) // width)] += 1
    return [(lo + i * width, lo + (i + 1) * width - 1, c) for i, c in enumerate(counts) if lo + i * width <= hi]
