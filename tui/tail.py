"""Following growing files: only what was appended since the last read."""

from __future__ import annotations

import json
from pathlib import Path


class LogTail:
    """Reads only what was appended since the last call (toolong-style: one read per tick)."""

    def __init__(self, path: Path, max_bytes: int = 1 << 20):
        self.path = path
        self.offset = 0
        self.max_bytes = max_bytes
        self.partial = ""
        self.restarted = False

    def read_new(self) -> list[str]:
        try:
            size = self.path.stat().st_size
        except OSError:
            return []
        self.restarted = size < self.offset
        if self.restarted:            # rewritten: start over
            self.offset, self.partial = 0, ""
        if size == self.offset:
            return []
        start = max(self.offset, size - self.max_bytes)    # far behind: skip to the last MiB
        with open(self.path, "rb") as f:
            f.seek(start)
            data = f.read(size - start)
        self.offset = size
        text = self.partial + data.decode("utf-8", errors="replace")
        lines = text.split("\n")
        self.partial = lines.pop()
        return lines


class JsonlTail(LogTail):
    """New records of a growing .jsonl file."""

    def read_records(self) -> list[dict]:
        out = []
        for line in self.read_new():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out
