"""Conversations to training rows: tokenize with the template's loss mask (each distinct conversation
once), truncate, drop what has nothing left to learn, pack several samples into one row, pad a batch."""

from __future__ import annotations

import json
import random
import statistics
from dataclasses import dataclass, field
from typing import Any

from engine.core.errors import DataError
from engine.data.templates import IGNORE_INDEX, encode_conversation


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
