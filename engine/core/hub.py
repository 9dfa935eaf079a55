"""Whether the model hub can be reached: a name that is not a local path is only looked up there
when it can be, so an offline machine says so in seconds instead of retrying for minutes."""

from __future__ import annotations

import functools
import os
import socket
import threading
from urllib.parse import urlparse


def explicitly_offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                                               "HF_DATASETS_OFFLINE"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """A TCP connection to the hub's endpoint (HF_ENDPOINT) within ``timeout`` seconds, name lookup
    included; probed once per endpoint and process (a run loads its tokenizer and model separately)."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    return _connects(host, port, timeout)


@functools.lru_cache(maxsize=8)
def _connects(host: str, port: int, timeout: float) -> bool:
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(result and result[0])


def cached_model(repo_id: str) -> bool:
    """The hub model is in the local Hugging Face cache (its config.json is)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, "config.json")
    except Exception:
        return False
    return isinstance(hit, str)
