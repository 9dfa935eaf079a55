"""Chatting with a base model, an adapter, or a fine-tuned checkpoint (``tunedeck chat``)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.core.errors import UserError
from engine.data.templates import TEMPLATE_NAMES, encode_prompt, resolve_template_name, stop_token_ids, stop_words
from engine.model.loading import load_model, load_tokenizer, pick_precision, read_adapter_meta
from engine.serve.generation import GenerationParams, stream_generate
from engine.train.checkpoint import resolve_checkpoint


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    template: str
    system: str
    source: str


def load_for_chat(model_path: str, adapter: str | None = None, *, template: str | None = None,
                  system: str | None = None, bits: int | None = None,
                  trust_remote_code: bool | None = None) -> LoadedModel:
    """Base model (optionally 4/8-bit) plus an adapter; a run directory means its latest checkpoint,
    whose template and system prompt are used unless given here."""
    meta: dict[str, Any] = {}
    ckpt: Path | None = None
    if adapter:
        ckpt = resolve_checkpoint(adapter)
        meta = read_adapter_meta(ckpt)
    if template is not None and template != "auto" and template not in TEMPLATE_NAMES:
        raise UserError(f"--template: {template!r} is unknown; choose one of: auto, {', '.join(TEMPLATE_NAMES)}")
    if bits not in (None, 4, 8):
        raise UserError(f"--bits: {bits} is not allowed: use 4 or 8")
    trust = meta.get("trust_remote_code", False) if trust_remote_code is None else trust_remote_code
    full_checkpoint = ckpt is not None and not (ckpt / "adapter_config.json").is_file()
    weights_path = str(ckpt) if full_checkpoint else model_path
    precision = pick_precision()
    quant = {4: "4bit", 8: "8bit"}.get(bits or 0, "none")
    tokenizer = load_tokenizer(str(ckpt) if ckpt is not None else model_path, trust)
    model = load_model(weights_path, quantization=quant, precision=precision, trust_remote_code=trust)
    if ckpt is not None and not full_checkpoint:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(ckpt))
        except Exception as e:
            raise UserError(f"--adapter: {ckpt}: does not fit {model_path} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    model.eval()
    tname = template or meta.get("prompt_template") or "auto"
    tname = resolve_template_name(tname, tokenizer)
    sys_prompt = system if system is not None else meta.get("system", "")
    return LoadedModel(model, tokenizer, tname, sys_prompt or "", str(ckpt or model_path))


@dataclass
class ChatSession:
    """A conversation with history; ``ask`` streams the answer and records it."""

    loaded: LoadedModel
    params: GenerationParams = field(default_factory=GenerationParams)
    history: list[dict[str, str]] = field(default_factory=list)

    def reset(self) -> None:
        self.history.clear()

    def messages_for(self, prompt: str) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.loaded.system}] if self.loaded.system else []
        return msgs + self.history + [{"role": "user", "content": prompt}]

    def ask(self, prompt: str) -> Iterator[str]:
        lm = self.loaded
        ids = encode_prompt(lm.tokenizer, lm.template, self.messages_for(prompt))
        params = GenerationParams(**{**self.params.__dict__,
                                     "stop": list(self.params.stop) + stop_words(lm.tokenizer, lm.template)})
        answer = []
        for piece in stream_generate(lm.model, lm.tokenizer, ids, params, stop_token_ids(lm.tokenizer, lm.template)):
            answer.append(piece)
            yield piece
        self.history += [{"role": "user", "content": prompt}, {"role": "assistant", "content": "".join(answer)}]

    def answer(self, prompt: str) -> str:
        return "".join(self.ask(prompt))


@dataclass
class RemoteChatSession:
    """The same conversation loop against a running ``tunedeck serve`` (or any OpenAI API)."""

    url: str
    model: str
    params: GenerationParams = field(default_factory=GenerationParams)
    api_key: str | None = None
    system: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)

    def reset(self) -> None:
        self.history.clear()

    def ask(self, prompt: str) -> Iterator[str]:
        import json

        import httpx

        msgs = [{"role": "system", "content": self.system}] if self.system else []
        msgs += self.history + [{"role": "user", "content": prompt}]
        body = {"model": self.model, "messages": msgs, "stream": True, "max_tokens": self.params.max_new_tokens,
                "temperature": self.params.temperature, "top_p": self.params.top_p, "top_k": self.params.top_k,
                "repetition_penalty": self.params.repetition_penalty}
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        base = self.url.rstrip("/").removesuffix("/v1")
        answer = []
        try:
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, headers=headers,
                              timeout=httpx.Timeout(10.0, read=600.0)) as r:
                if r.status_code != 200:
                    r.read()
                    try:
                        msg = r.json()["error"]["message"]
                    except Exception:
                        msg = r.text[:200]
                    raise UserError(f"--url {self.url}: HTTP {r.status_code}: {msg}")
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise UserError(f"--url {self.url}: {chunk['error']['message']}")
                    piece = chunk["choices"][0]["delta"].get("content")
                    if piece:
                        answer.append(piece)
                        yield piece
        except httpx.HTTPError as e:
            raise UserError(f"--url {self.url}: cannot reach the service ({type(e).__name__})") from None
        self.history += [{"role": "user", "content": prompt}, {"role": "assistant", "content": "".join(answer)}]

    def answer(self, prompt: str) -> str:
        return "".join(self.ask(prompt))
