"""``tunedeck serve``: an OpenAI-compatible chat API and a web chat page over one ModelHost.

    POST /v1/chat/completions   stream true → server-sent events in OpenAI's chunk format
    GET  /v1/models             base and every adapter
    POST /v1/adapters           {"name": ..., "path": ...} add an adapter while serving
    DELETE /v1/adapters/NAME    remove one
    GET  /health                liveness and batching counters
    GET  /                      the web chat (compare mode: two columns, one prompt)

Bad requests get OpenAI-style JSON errors: 400 naming the field, 401 without the right bearer
token (--api-key), 404 for an unknown model; a failure inside generation answers 500 for that
request only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import Callable
from importlib import resources
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from engine.core.constants import GROUP_HEADER
from engine.core.errors import UserError
from engine.serve.generation import GenerationParams
from engine.serve.scheduler import BASE, GenRequest, ModelHost, Scheduler, parse_group, served_list


class ContentPart(BaseModel):
    type: str
    text: str | None = None
    image_url: dict | str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1)

    @field_validator("messages")
    @classmethod
    def _last_is_user(cls, v: list[Message]) -> list[Message]:
        if v[-1].role != "user":
            raise ValueError("the last message must have role 'user'")
        return v


def error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
            500: "server_error"}.get(status, "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


def _validation_error(e: ValidationError) -> JSONResponse:
    first = e.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return error(400, f"{loc}: {msg}{more}", param=loc)


def _read_image_part(host: Any, image_url: Any):
    """An OpenAI image part: a data: URI (base64), or a local path under the service's workspace."""
    import base64
    import binascii

    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str) or not url:
        raise UserError("needs {\"url\": \"data:image/...;base64,...\"} or a path under the workspace")
    if url.startswith("data:"):
        head, _, payload = url.partition(",")
        if ";base64" not in head:
            raise UserError("only base64 data URIs are accepted")
        try:
            return host.open_image(base64.b64decode(payload, validate=True))
        except (binascii.Error, ValueError):
            raise UserError("the data URI is not valid base64") from None
    if url.startswith(("http://", "https://")):
        raise UserError("the service does not fetch URLs; send the image as a data: URI")
    return host.open_image(url)


class ApiKeyMiddleware:
    """Every request but the page itself needs ``Authorization: Bearer KEY`` (the scheme in any case,
    as HTTP says; plain ASGI, so streaming and client disconnects pass through untouched)."""

    def __init__(self, app: Any, key: str):
        self.app = app
        self.expected = key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] != "/":
            got = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, token = got.strip().partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self.expected):
                resp = error(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                             code="invalid_api_key")
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


MAX_REQUEST_MB = 32          # a request body past this is answered 413 unread (images come as data: URIs)


class RequestTooLarge(Exception):
    pass


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused past ``limit`` bytes without reading the rest into memory."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def build_app(host: ModelHost, *, api_key: str | None = None, scheduler: Scheduler | None = None,
              max_request_mb: float = MAX_REQUEST_MB) -> Starlette:
    sched = scheduler or Scheduler(host)
    limit = int(max_request_mb * (1 << 20))

    def too_large() -> Response:
        return error(413, f"request body is larger than this service's limit of {max_request_mb:g} MiB "
                          "(tunedeck serve --max-request-mb)", code="request_too_large")

    async def body_json(request: Request) -> Any:
        return json.loads(await read_body(request, limit))

    async def json_object(request: Request) -> dict | Response:
        """The request's body as a JSON object, or the error response to send instead."""
        try:
            body = await body_json(request)
        except RequestTooLarge:
            return too_large()
        except (ValueError, UnicodeDecodeError) as e:
            return error(400, f"request body is not valid JSON ({e})")
        if not isinstance(body, dict):
            return error(400, "request body must be a JSON object")
        return body

    async def chat_completions(request: Request) -> Response:
        body = await json_object(request)
        if isinstance(body, Response):
            return body
        try:
            group = parse_group(request.headers.get(GROUP_HEADER))
        except ValueError as e:
            return error(400, str(e), param=GROUP_HEADER)
        try:
            req = ChatRequest.model_validate(body)
        except ValidationError as e:
            return _validation_error(e)
        if req.model not in host.models:
            return error(404, f"The model '{req.model}' does not exist; available: {', '.join(host.models)}",
                         param="model", code="model_not_found")
        messages, images = [], []
        takes_images = getattr(host, "accepts_images", False)
        for i, m in enumerate(req.messages):
            if isinstance(m.content, str):
                text = m.content
            else:
                allowed = ("text", "image_url") if takes_images else ("text",)
                if any(p.type not in allowed for p in m.content):
                    kinds = sorted({p.type for p in m.content if p.type not in allowed})
                    return error(400, f"messages.{i}.content: part type {', '.join(kinds)} is not supported by "
                                      f"this model ({' and '.join(allowed)} only)", param=f"messages.{i}.content")
                text = ""
                for j, part in enumerate(m.content):
                    if part.type == "text":
                        text += part.text or ""
                        continue
                    where = f"messages.{i}.content.{j}.image_url"
                    try:
                        images.append(await asyncio.to_thread(_read_image_part, host, part.image_url))
                    except UserError as e:
                        return error(400, f"{where}: {e}", param=where)
                    text = "<image>\n" + text if not text else text + "\n<image>\n"
            messages.append({"role": m.role, "content": text})
        if takes_images and sum(m["content"].count("<image>") for m in messages) != len(images):
            return error(400, "messages: write images as image_url parts, not as <image> in the text",
                         param="messages")
        try:              # off the event loop: a long prompt must not stall /health and the other streams
            prompt_ids, stops, stop_ids = await asyncio.to_thread(host.encode, req.model, messages)
        except UserError as e:
            return error(400, str(e), param="messages")
        limit = host.context_length
        room = limit - len(prompt_ids)
        max_new = req.max_completion_tokens or req.max_tokens
        if room < 1 or (max_new is not None and max_new > room):
            return error(400, f"this model's context is {limit} tokens; the prompt has {len(prompt_ids)} and "
                              f"max_tokens asks for {max_new or 1} more", param="messages",
                         code="context_length_exceeded")
        user_stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        params = GenerationParams(max_new_tokens=min(max_new or 512, room), temperature=req.temperature,
                                  top_p=req.top_p, top_k=req.top_k, repetition_penalty=req.repetition_penalty,
                                  stop=user_stops + stops)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        gen = GenRequest(req.model, prompt_ids, params, stop_ids,
                         emit=lambda item: loop.call_soon_threadsafe(queue.put_nowait, item), seed=req.seed,
                         images=images, group=group)
        sched.submit(gen)
        created = int(time.time())

        async def next_item() -> tuple:
            try:
                return await queue.get()
            except asyncio.CancelledError:   # the client went away: stop its row
                gen.cancelled.set()
                raise

        first = await next_item()
        if first[0] == "error":
            return error(500, first[1], code="generation_failed")
        if not req.stream:
            parts, item = [], first
            while item[0] == "delta":
                parts.append(item[1])
                item = await next_item()
            if item[0] == "error":
                return error(500, item[1], code="generation_failed")
            return JSONResponse({
                "id": gen.id, "object": "chat.completion", "created": created, "model": req.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                             "finish_reason": item[1]}],
                "usage": item[2]})

        def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
            c: dict[str, Any] = {"id": gen.id, "object": "chat.completion.chunk", "created": created,
                                 "model": req.model, "choices": [{"index": 0, "delta": delta,
                                                                  "finish_reason": finish}]}
            if usage is not None:
                c["usage"] = usage
            return f"data: {json.dumps(c, ensure_ascii=False)}\n\n"

        async def events():
            item = first
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    if item[0] == "delta":
                        yield chunk({"content": item[1]})
                    elif item[0] == "done":
                        yield chunk({}, item[1] if item[1] != "cancelled" else "stop", item[2])
                        break
                    else:
                        yield f"data: {json.dumps({'error': {'message': item[1], 'type': 'server_error'}})}\n\n"
                        break
                    item = await queue.get()
                yield "data: [DONE]\n\n"
            finally:
                gen.cancelled.set()          # a client that went away stops its generation

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def list_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": served_list(host)})

    async def add_adapter(request: Request) -> Response:
        body = await json_object(request)
        if isinstance(body, Response):
            return body
        if not isinstance(body.get("name"), str) or not isinstance(body.get("path"), str):
            return error(400, "expected {\"name\": str, \"path\": str}", param="name")
        try:
            sm = await asyncio.to_thread(host.add_adapter, body["name"], body["path"], body.get("template"),
                                         body.get("system"))
        except UserError as e:
            return error(400, str(e), param="path")
        return JSONResponse({"id": sm.name, "object": "model", "path": sm.path, "template": sm.template,
                             "system": sm.system})

    async def delete_adapter(request: Request) -> Response:
        name = request.path_params["name"]
        try:
            await asyncio.to_thread(host.remove_adapter, name)
        except KeyError:
            return error(404, f"no adapter named '{name}'" + (" (the base cannot be removed)" if name == BASE else ""),
                         param="name", code="model_not_found")
        return JSONResponse({"id": name, "deleted": True})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "base": host.base_path, "models": list(host.models),
                             "device": str(host.device), "context_length": host.context_length, **sched.stats})

    async def index(request: Request) -> Response:
        page = resources.files("engine.serve").joinpath("web/chat.html").read_text(encoding="utf-8")
        return HTMLResponse(page)

    async def not_found(request: Request, exc: Exception) -> Response:
        return error(404, f"no such endpoint: {request.method} {request.url.path} (the API is under /v1: "
                          "/v1/chat/completions, /v1/models, /v1/adapters; and /health)", code="not_found")

    async def not_allowed(request: Request, exc: Exception) -> Response:
        return error(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        sched.close()

    app = Starlette(routes=[
        Route("/", index),
        Route("/health", health),
        Route("/v1/models", list_models),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/adapters", add_adapter, methods=["POST"]),
        Route("/v1/adapters/{name}", delete_adapter, methods=["DELETE"]),
    ], middleware=[Middleware(ApiKeyMiddleware, key=api_key)] if api_key else [], lifespan=lifespan,
        exception_handlers={404: not_found, 405: not_allowed})

    app.state.host = host
    app.state.scheduler = sched
    return app


def bind(host: str, port: int):
    """The listening socket, taken before the model loads: a busy port is one line at once, not after
    minutes of loading."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"--port: {host}:{port} is already in use (another service?); "
                            "choose another --port") from None
        raise UserError(f"--host/--port: cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(load: Callable[[], ModelHost], *, adapters: list[tuple[str, str]], host: str = "127.0.0.1",
          port: int = 8000, api_key: str | None = None, warmup: bool = True, log=print, label: str = "",
          max_request_mb: float = MAX_REQUEST_MB) -> int:
    """Listen on host:port (taken first: a busy port is refused before minutes of loading), ``load`` the
    model host, add the adapters, then serve until SIGTERM or SIGINT."""
    import uvicorn

    sock = bind(host, port)
    log(f"loading {label}")
    mh = load()
    for name, path in adapters:
        sm = mh.add_adapter(name, path)
        log(f"adapter {name}: {sm.path} (template {sm.template})")
    if warmup and mh.static_cache:
        log("compiling the decode step for batches of 1 and 2 (once per start, about a minute)")
        log(f"compiled in {mh.warmup():.0f}s")
    app = build_app(mh, api_key=api_key, max_request_mb=max_request_mb)
    log(f"serving {', '.join(mh.models)} on http://{host}:{port} (web chat at /, OpenAI API at /v1)")
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal to the handler that
    # was there before it: make that one a clean exit.
    import signal

    stopped = {"by": None}

    def done(signum, frame):
        stopped["by"] = signal.Signals(signum).name

    old = {s: signal.signal(s, done) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        server.run(sockets=[sock])
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    log(f"shut down{' on ' + stopped['by'] if stopped['by'] else ''}")
    return 0
