"""``tunedeck serve``: a text model with its adapters, or LLaVA checkpoints over one language model and
vision tower, behind the OpenAI-compatible service."""

from __future__ import annotations

from engine.core.errors import UserError
from engine.serve.server import MAX_REQUEST_MB
from engine.serve.server import serve as run_service


def serve(model: str, *, adapters: list[tuple[str, str]], host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, bits: int | None = None, template: str | None = None,
          system: str | None = None, trust_remote_code: bool = False, warmup: bool = True, log=print,
          visual_encoder: str | None = None, llavas: list[tuple[str, str]] | None = None,
          max_request_mb: float = MAX_REQUEST_MB) -> int:
    if not 0 < port < 65536:
        raise UserError(f"--port: {port} is not allowed: use 1-65535")
    if llavas or visual_encoder:
        if not (llavas and visual_encoder):
            raise UserError("--visual-encoder and --llava NAME=DIR go together")
        if adapters:
            raise UserError("--adapter: serve text adapters and LLaVA checkpoints from separate services")

        def load():
            from engine.llava.serve import LlavaHost

            return LlavaHost(model, visual_encoder, llavas, bits=bits, trust_remote_code=trust_remote_code)
    else:
        def load():
            from engine.serve.scheduler import ModelHost

            return ModelHost(model, bits=bits, template=template, system=system,
                             trust_remote_code=trust_remote_code)
    return run_service(load, adapters=adapters, host=host, port=port, api_key=api_key, warmup=warmup, log=log,
                       label=model, max_request_mb=max_request_mb)
