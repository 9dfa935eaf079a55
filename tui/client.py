"""The TUI's side of the inference service: start `tunedeck serve` when none runs, add adapters,
stream chat completions. HTTP only; the model lives in the service's process."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from engine.core.constants import GROUP_HEADER

from .workspace import engine_command, engine_env


class ServiceError(Exception):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceClient:
    def __init__(self, workspace: Path, url: str | None = None, api_key: str | None = None):
        self.workspace = workspace
        self.url = url
        self.api_key = api_key
        self.proc: subprocess.Popen | None = None
        self.base: str | None = None
        self.log_path = workspace / "work_dirs" / "serve.log"
        # the service this app started, from its start: a kept one, or one whose app was killed (its terminal
        # closed), is found by the next app in this workspace instead of running on unseen
        self.record = workspace / "work_dirs" / "service.json"
        self.keep = False
        if self.url is None:
            try:
                self.url = json.loads(self.record.read_text())["url"]
            except (OSError, ValueError, KeyError, TypeError):
                pass

    def started_here(self) -> bool:
        """Whether this app started a service that is still running."""
        return self.proc is not None and self.proc.poll() is None

    def describe(self) -> str:
        name = Path(self.base).name if self.base else "?"
        return f"the inference service for {name} at {self.url} (pid {self.proc.pid if self.proc else '?'})"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def health(self) -> dict | None:
        import httpx

        if not self.url:
            return None
        try:
            r = httpx.get(f"{self.url}/health", headers=self.headers, timeout=2)
            return r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None

    def ensure(self, base: str, progress: Callable[[str], None], timeout: float = 900, *,
               extra_args: tuple[str, ...] = (), models: tuple[str, ...] = ()) -> None:
        """A service for ``base`` (serving ``models`` too): reuse the running one, else (re)start ours
        and wait until it answers."""
        h = self.health()
        if h is not None and Path(h.get("base", "")) == Path(base) and set(models) <= set(h.get("models", [])):
            self.base = base
            return
        self.close()
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(engine_command("serve", base, "--port", str(port), *extra_args),
                                     cwd=self.workspace, env=engine_env(), stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.base = base
        self._write_record()
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                self.record.unlink(missing_ok=True)
                raise ServiceError(f"the service exited ({self.proc.returncode}): {self.last_log_line()}")
            if self.health() is not None:
                return
            progress(f"starting the inference service: {self.last_log_line() or 'loading'} "
                     f"({time.time() - t0:.0f}s)")
            time.sleep(0.5)
        raise ServiceError("the service did not come up in time")

    def last_log_line(self) -> str:
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return lines[-1][-120:] if lines else ""

    def add_adapter(self, name: str, path: Path) -> dict:
        import httpx

        r = httpx.post(f"{self.url}/v1/adapters", json={"name": name, "path": str(path)}, headers=self.headers,
                       timeout=300)
        if r.status_code != 200:
            raise ServiceError(r.json()["error"]["message"])
        return r.json()

    def stream(self, model: str, messages: list[dict], usage: dict | None = None, group: str | None = None,
               **params) -> Iterator[str]:
        """The answer's pieces as they come; ``usage`` is filled with the service's token counts at the end.
        ``group`` ("ID/N"): this question is one of N sent together, which the service answers in one batch."""
        import httpx

        body = {"model": model, "messages": messages, "stream": True, **params}
        headers = self.headers | ({GROUP_HEADER: group} if group else {})
        try:
            with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=body, headers=headers,
                              timeout=httpx.Timeout(10, read=600)) as r:
                if r.status_code != 200:
                    r.read()
                    raise ServiceError(r.json().get("error", {}).get("message", f"HTTP {r.status_code}"))
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise ServiceError(chunk["error"]["message"])
                    if usage is not None and chunk.get("usage"):
                        usage.update(chunk["usage"])
                    piece = chunk["choices"][0]["delta"].get("content")
                    if piece:
                        yield piece
        except httpx.HTTPError as e:
            dead = "" if self.alive() else f" (the service died: {self.last_log_line()})"
            raise ServiceError(f"lost the service: {type(e).__name__}{dead}") from None

    def _write_record(self) -> None:
        self.record.parent.mkdir(parents=True, exist_ok=True)
        self.record.write_text(json.dumps({"url": self.url, "pid": getattr(self.proc, "pid", None),
                                           "base": self.base}))

    def close(self) -> None:
        """Stop the service this app started, unless the user chose to keep it (then the next app in this
        workspace finds it through work_dirs/service.json)."""
        if self.proc is None:
            return
        if self.keep and self.started_here():
            self.proc = None                  # its record stays
            return
        self.record.unlink(missing_ok=True)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None
