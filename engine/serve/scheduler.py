"""One copy of the base weights serving the base model and any number of LoRA adapters.

Requests that arrive together are generated together: one batched forward per token, each row
with its own adapter (peft's mixed-adapter batches, ``adapter_names``) and its own sampling
settings. A batch runs on one worker thread; requests that come while it runs form the next.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.core.constants import GROUP_HEADER
from engine.core.errors import UserError
from engine.data.templates import TEMPLATE_NAMES, encode_prompt, resolve_template_name, stop_token_ids, stop_words
from engine.model.loading import load_model, load_tokenizer, pick_precision, read_adapter_meta, use_compile_caches
from engine.serve.generation import GenerationParams, RowStreams, sampling_kwargs
from engine.serve.multilora import MultiLora
from engine.train.checkpoint import resolve_checkpoint

log = logging.getLogger("tunedeck.serve")
BASE = "base"


@dataclass
class ServedModel:
    name: str
    path: str
    template: str
    system: str
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class GenRequest:
    model: str
    prompt_ids: list[int]
    params: GenerationParams
    stop_ids: set[int]
    emit: Callable[[tuple], None]          # ("delta", text) | ("done", finish_reason, usage) | ("error", msg)
    seed: int | None = None
    images: list = field(default_factory=list)      # PIL images, in the order of the prompt's <image> tags
    group: tuple[str, int] | None = None   # (id, size): requests sent together to be generated together
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    cancelled: threading.Event = field(default_factory=threading.Event)
    finish_reason: str | None = None       # set once the row is done: stop / length / cancelled


class ModelHost:
    def __init__(self, base_path: str, *, bits: int | None = None, template: str | None = None,
                 system: str | None = None, trust_remote_code: bool = False, compile_decode: bool = True):
        if template not in (None, "auto") and template not in TEMPLATE_NAMES:
            raise UserError(f"--template: {template!r} is unknown; choose one of: auto, {', '.join(TEMPLATE_NAMES)}")
        self.base_path = base_path
        self.precision = pick_precision()
        self.tokenizer = load_tokenizer(base_path, trust_remote_code)
        quant = {4: "4bit", 8: "8bit"}.get(bits or 0, "none")
        self.model: Any = load_model(base_path, quantization=quant, precision=self.precision,
                                     trust_remote_code=trust_remote_code)
        self.model.eval()
        self.lora: MultiLora | None = None
        # On a GPU, decode steps run on a static KV cache that transformers compiles into CUDA graphs.
        self.static_cache = self.device_is_cuda() and compile_decode and quant == "none"
        if self.static_cache:
            use_compile_caches()          # a second start loads the compiled decode step instead of compiling
        base_template = resolve_template_name(template or "auto", self.tokenizer)
        self.models: dict[str, ServedModel] = {BASE: ServedModel(BASE, base_path, base_template, system or "")}
        self.lock = threading.RLock()      # adapters change only between batches
        cfg = getattr(self.model, "config", None)
        self.context_length = int(getattr(cfg, "max_position_embeddings", 0) or 4096)
        self.device = next(self.model.parameters()).device

    # -- adapters
    def add_adapter(self, name: str, path: str, template: str | None = None, system: str | None = None) -> ServedModel:
        if not name or name == BASE or "/" in name:
            raise UserError(f"adapter name {name!r} is not allowed (empty, 'base' or with '/')")
        ckpt = resolve_checkpoint(path)
        if not (ckpt / "adapter_config.json").is_file():
            raise UserError(f"{ckpt}: not a LoRA adapter (no adapter_config.json)")
        meta = read_adapter_meta(ckpt)
        with self.lock:
            if self.lora is None:
                self.lora = MultiLora(self.model, dtype=self.precision.autocast_dtype or torch.float32)
            try:
                self.lora.load(name, ckpt)
            except (ValueError, KeyError, RuntimeError) as e:
                raise UserError(f"{ckpt}: adapter does not fit {self.base_path} ({str(e).splitlines()[0][:200]})") \
                    from None
            except Exception as e:       # a torn or corrupt adapter_model.safetensors, an unreadable file
                first = str(e).splitlines()[0][:200] if str(e) else ""
                raise UserError(f"{ckpt}: cannot read the adapter ({type(e).__name__}: {first})") from None
            tname = resolve_template_name(template or meta.get("prompt_template") or "auto", self.tokenizer)
            sm = ServedModel(name, str(ckpt), tname, system if system is not None else meta.get("system", ""))
            self.models[name] = sm
            return sm

    def remove_adapter(self, name: str) -> None:
        with self.lock:
            if name == BASE or name not in self.models:
                raise KeyError(name)
            self.lora.remove(name)
            del self.models[name]

    def warmup(self, batch_sizes: tuple[int, ...] = (1, 2)) -> float:
        """Compile the decode step for these batch sizes now rather than on the first requests."""
        t0 = time.time()
        if not self.static_cache:
            return 0.0
        prompt = encode_prompt(self.tokenizer, self.models[BASE].template, [{"role": "user", "content": "hi"}])
        names = list(self.models)
        for n in batch_sizes:
            reqs = [GenRequest(names[i % len(names)], prompt, GenerationParams(max_new_tokens=3), set(),
                               emit=lambda item: None) for i in range(n)]
            self.run_batch(reqs)
        return time.time() - t0

    def device_is_cuda(self) -> bool:
        return next(self.model.parameters()).device.type == "cuda"

    # -- prompts
    def encode(self, model: str, messages: list[dict]) -> tuple[list[int], list[str], set[int]]:
        sm = self.models[model]
        if sm.system and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": sm.system}, *messages]
        ids = encode_prompt(self.tokenizer, sm.template, messages)
        return ids, stop_words(self.tokenizer, sm.template), set(stop_token_ids(self.tokenizer, sm.template))

    # -- generation
    @torch.inference_mode()
    def run_batch(self, reqs: list[GenRequest]) -> None:
        """Generate for every request of the batch, one forward per token for all rows."""
        with self.lock:
            self._run_batch(reqs)

    def _run_batch(self, reqs: list[GenRequest]) -> None:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        width = max(len(r.prompt_ids) for r in reqs)
        ids = torch.full((len(reqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(reqs), width), dtype=torch.long)
        for i, r in enumerate(reqs):                       # left padding: every row ends at the same column
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        if self.lora is not None:
            self.lora.set_rows([r.model if r.model != BASE else None for r in reqs])
        rows = RowStreams(reqs, tok)
        kw = dict(max_new_tokens=max(r.params.max_new_tokens for r in reqs), **sampling_kwargs(reqs[0].params),
                  pad_token_id=pad, eos_token_id=None, streamer=rows.streamer(), stopping_criteria=rows.stopping())
        if self.static_cache:
            # The compiled decode step is specialised on the cache size: round it up to a bucket so a
            # few sizes serve every request (rows still stop at their own max_tokens).
            total = min(self.context_length, max(1024, 1 << (width + kw["max_new_tokens"] - 1).bit_length()))
            kw["max_new_tokens"] = max(1, total - width)
            kw["cache_implementation"] = "static"
        if kw["do_sample"] and reqs[0].seed is not None:
            torch.manual_seed(reqs[0].seed)
        self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kw)


class Scheduler:
    """Runs requests in batches on a worker thread. A request starts at once, with whatever else is
    waiting; one of a group (the two sides of a comparison, GROUP_HEADER) waits up to ``group_wait_s``
    for the rest of its group, so the group is generated in one batch. ``window_s`` holds every batch
    that long for other requests to join (no wait by default: it adds to the time to first token)."""

    def __init__(self, host: ModelHost, *, window_s: float = 0.0, group_wait_s: float = 0.5, max_batch: int = 16):
        self.host = host
        self.window_s = window_s
        self.group_wait_s = group_wait_s
        self.max_batch = max_batch
        self._pending: list[GenRequest] = []
        self._cv = threading.Condition()
        self._stop = False
        self.stats = {"batches": 0, "requests": 0, "max_rows": 0, "cancelled": 0, "errors": 0, "busy": False,
                      "group_waits_timed_out": 0}
        self._thread = threading.Thread(target=self._loop, name="tunedeck-generate", daemon=True)
        self._thread.start()

    def submit(self, req: GenRequest) -> None:
        with self._cv:
            self._pending.append(req)
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._stop = True
            for r in self._pending:
                r.cancelled.set()
            self._cv.notify()
        self._thread.join(timeout=10)

    def _group_complete(self, group: tuple[str, int]) -> bool:
        return sum(r.group == group for r in self._pending) >= min(group[1], self.max_batch)

    def _next_batch(self) -> list[GenRequest] | None:
        """Under the lock: wait for work (and a first request's group), then take one batch; None to stop."""
        while not self._pending and not self._stop:
            self._cv.wait()
        if self._stop:
            return None
        first = self._pending[0]
        now = time.monotonic()
        window_end, group_end = now + self.window_s, now + (self.group_wait_s if first.group else 0.0)
        while not self._stop:
            now = time.monotonic()
            group_done = not first.group or self._group_complete(first.group) or now >= group_end
            if group_done and now >= window_end:
                break
            self._cv.wait((window_end if group_done else group_end) - now)     # a submit wakes it sooner
        if self._stop:
            return None
        if first.group and not self._group_complete(first.group):
            self.stats["group_waits_timed_out"] += 1
        key = _sampling_key(first)         # one batch shares its sampling settings; others wait for the next
        batch = [r for r in self._pending if _sampling_key(r) == key][: self.max_batch]
        self._pending = [r for r in self._pending if not any(r is b for b in batch)]
        return batch

    def _loop(self) -> None:
        while True:
            with self._cv:
                batch = self._next_batch()
            if batch is None:
                return
            gone = [r for r in batch if r.cancelled.is_set()]       # left while it waited: never generated
            self.stats["cancelled"] += len(gone)
            batch = [r for r in batch if not r.cancelled.is_set()]
            if not batch:
                continue
            self.stats["busy"] = True
            self.stats["batches"] += 1
            self.stats["requests"] += len(batch)
            self.stats["max_rows"] = max(self.stats["max_rows"], len(batch))
            try:
                self.host.run_batch(batch)
            except Exception as e:   # this batch fails; the service goes on
                self.stats["errors"] += 1
                log.exception("generation failed")
                msg = f"generation failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                for r in batch:
                    r.emit(("error", msg))
            finally:
                self.stats["cancelled"] += sum(r.finish_reason == "cancelled" for r in batch)
                self.stats["busy"] = False


def parse_group(value: str | None) -> tuple[str, int] | None:
    """The GROUP_HEADER value ``ID/N`` (N from 2 to 64), None when absent; ValueError says what is wrong."""
    if value is None:
        return None
    gid, _, n = value.strip().rpartition("/")
    if not gid or not n.isdigit() or not 2 <= int(n) <= 64 or len(gid) > 100:
        raise ValueError(f"{GROUP_HEADER}: {value!r} is not ID/N (an id, then the number of requests, 2 to 64)")
    return gid, int(n)


def _sampling_key(r: GenRequest) -> tuple:
    p = r.params
    if p.temperature == 0:         # greedy rows batch together whatever top_p / top_k say
        return (0.0, p.repetition_penalty)
    return (p.temperature, p.top_p, p.top_k, p.repetition_penalty, r.seed)


def served_list(host: ModelHost) -> list[dict]:
    return [{"id": m.name, "object": "model", "created": m.created, "owned_by": "tunedeck",
             "path": m.path, "template": m.template, "system": m.system} for m in host.models.values()]


def parse_adapter_args(items: list[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        if "=" not in item:
            name = Path(item.rstrip("/")).name
            out.append((name, item))
        else:
            name, path = item.split("=", 1)
            out.append((name.strip(), path.strip()))
    return out
