"""Token-by-token generation with a KV cache: greedy or sampled, streamed as text, stopping
at the template's stop words."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class GenerationParams:
    max_new_tokens: int = 512
    temperature: float = 0.0        # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                  # 0 = off
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)

    def validate(self) -> list[str]:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens: {self.max_new_tokens} is not allowed: must be >= 1")
        if self.temperature < 0:
            problems.append(f"temperature: {self.temperature} is not allowed: must be >= 0")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p: {self.top_p} is not allowed: must be in (0, 1]")
        if self.top_k < 0:
            problems.append(f"top_k: {self.top_k} is not allowed: must be >= 0")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty: {self.repetition_penalty} is not allowed: must be > 0")
        return problems


def _next_token(logits: torch.Tensor, seen: torch.Tensor, p: GenerationParams,
                generator: torch.Generator | None) -> int:
    logits = logits.float()
    if p.repetition_penalty != 1.0 and seen.numel():
        prev = logits[seen]
        logits[seen] = torch.where(prev > 0, prev / p.repetition_penalty, prev * p.repetition_penalty)
    if p.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / p.temperature
    if p.top_k > 0:
        kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
        logits[logits < kth] = float("-inf")
    probs = torch.softmax(logits, -1)
    if p.top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, -1)
        drop = cum - sorted_p > p.top_p
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter(0, idx, sorted_p)
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator))


def _cache_arg(model: Any) -> str:
    """transformers >= 5.2x calls the KV cache ``cache``; older releases ``past_key_values``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _cache_of(out: Any) -> Any:
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


class IncrementalText:
    """Turns generated token ids into text deltas: waits for whole characters, holds back a tail
    that may be the start of a stop word, and cuts at the first stop word."""

    def __init__(self, tokenizer: Any, stop_words: list[str]):
        self.tokenizer = tokenizer
        self.stops = [w for w in stop_words if w]
        self.ids: list[int] = []
        self.emitted = ""
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        hit = _find_stop(text, self.stops)
        if hit is not None:
            self.stopped = True
            return self._emit(text[:hit])
        if text.endswith("\ufffd"):   # half of a multi-byte character
            return ""
        return self._emit(text[: len(text) - _partial_stop_len(text, self.stops)])

    def flush(self) -> str:
        if self.stopped:
            return ""
        return self._emit(self.tokenizer.decode(self.ids, skip_special_tokens=False))

    def _emit(self, upto: str) -> str:
        if len(upto) <= len(self.emitted) or not upto.startswith(self.emitted):
            return ""
        delta = upto[len(self.emitted):]
        self.emitted = upto
        return delta


def sampling_kwargs(p: GenerationParams) -> dict[str, Any]:
    """``generate``'s sampling arguments for these settings (greedy at temperature 0)."""
    sample = p.temperature > 0
    return dict(do_sample=sample, temperature=p.temperature if sample else None, top_p=p.top_p if sample else None,
                top_k=(p.top_k or None) if sample else None, repetition_penalty=p.repetition_penalty)


class RowStreams:
    """A batch's requests fed by one ``generate``: each step's token of every row goes to that row's
    request as text deltas, and a row ends at its stop ids, stop words, max_tokens or when its client
    leaves. ``streamer()`` and ``stopping()`` are for ``generate``; ``reqs`` are GenRequests."""

    def __init__(self, reqs: list, tokenizer: Any):
        self.reqs = reqs
        self.texts = [IncrementalText(tokenizer, r.params.stop) for r in reqs]
        self.finished = torch.zeros(len(reqs), dtype=torch.bool)

    def finish(self, i: int, reason: str) -> None:
        if self.finished[i]:
            return
        self.finished[i] = True
        r, text = self.reqs[i], self.texts[i]
        r.finish_reason = reason
        if reason == "length":
            tail = text.flush()
            if tail:
                r.emit(("delta", tail))
        n = len(text.ids)
        r.emit(("done", reason, {"prompt_tokens": len(r.prompt_ids), "completion_tokens": n,
                                 "total_tokens": len(r.prompt_ids) + n}))

    def push(self, tokens: list[int]) -> None:
        for i, t in enumerate(tokens):
            r, text = self.reqs[i], self.texts[i]
            if self.finished[i]:
                continue
            if r.cancelled.is_set():
                self.finish(i, "cancelled")
            elif t in r.stop_ids:
                self.finish(i, "stop")
            else:
                delta = text.push(t)
                if delta:
                    r.emit(("delta", delta))
                if text.stopped:
                    self.finish(i, "stop")
                elif len(text.ids) >= r.params.max_new_tokens:
                    self.finish(i, "length")

    def end(self) -> None:
        for i, r in enumerate(self.reqs):
            self.finish(i, "cancelled" if r.cancelled.is_set() else "length")

    def streamer(self) -> Any:
        from transformers.generation.streamers import BaseStreamer

        rows = self

        class Streamer(BaseStreamer):
            prompt_seen = False

            def put(self, value: torch.Tensor) -> None:
                if not self.prompt_seen:       # generate hands over the prompt first (empty from embeddings)
                    self.prompt_seen = True
                    return
                rows.push(value.reshape(-1).tolist())

            def end(self) -> None:
                rows.end()

        return Streamer()

    def stopping(self) -> Any:
        from transformers import StoppingCriteria, StoppingCriteriaList

        rows = self

        class RowsDone(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                for i, r in enumerate(rows.reqs):      # a client that left stops its row at once
                    if r.cancelled.is_set() and not rows.finished[i]:
                        rows.finish(i, "cancelled")
                return rows.finished.to(input_ids.device).clone()

        return StoppingCriteriaList([RowsDone()])


@torch.inference_mode()
def stream_generate(model: Any, tokenizer: Any, input_ids: list[int], params: GenerationParams,
                    stop_ids: list[int] | None = None, seed: int | None = None) -> Iterator[str]:
    """Yield text pieces as they are generated; stops at stop ids, stop words or max_new_tokens."""
    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], device=device)
    stop_set = set(stop_ids or [])
    generator = None
    if seed is not None and params.temperature > 0:
        generator = torch.Generator(device="cpu").manual_seed(seed)
    cache_arg = _cache_arg(model)
    out = model(input_ids=ids, use_cache=True)
    past = _cache_of(out)
    logits = out.logits[0, -1]
    text = IncrementalText(tokenizer, params.stop)
    for _ in range(params.max_new_tokens):
        seen = torch.tensor(input_ids + text.ids, device=logits.device)
        tok = _next_token(logits.float().cpu(), seen.cpu(), params, generator)
        if tok in stop_set:
            break
        delta = text.push(tok)
        if delta:
            yield delta
        if text.stopped:
            return
        out = model(input_ids=torch.tensor([[tok]], device=device), use_cache=True, **{cache_arg: past})
        past = _cache_of(out)
        logits = out.logits[0, -1]
    delta = text.flush()
    if delta:
        yield delta


def _find_stop(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def _partial_stop_len(text: str, stops: list[str]) -> int:
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                best = max(best, n)
                break
    return best
