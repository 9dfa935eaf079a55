"""``tunedeck tree``: the tutorial's print_dir_tree, with sizes, following symlinks to model folders."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from engine.core.errors import UserError


def human_size(n: float) -> str:
    for unit in ("B", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}T"


def dir_size(path: Path, _seen: set | None = None) -> int:
    seen = _seen if _seen is not None else set()
    total = 0
    try:
        st = path.stat()
    except OSError:
        return 0
    key = (st.st_dev, st.st_ino)
    if key in seen:
        return 0
    seen.add(key)
    if not path.is_dir():
        return st.st_size
    try:
        for child in path.iterdir():
            total += dir_size(child, seen)
    except OSError:
        pass
    return total


def tree_lines(root: str | Path, max_depth: int = 32) -> Iterator[str]:
    root = Path(root)
    if not root.exists():
        raise UserError(f"{root}: no such directory")
    if not root.is_dir():
        raise UserError(f"{root}: not a directory")
    yield f"|-- {root.name or str(root)}/ ({human_size(dir_size(root))})"
    yield from _walk(root, "    ", {root.resolve()}, max_depth)


def _walk(path: Path, prefix: str, ancestors: set[Path], depth: int) -> Iterator[str]:
    if depth <= 0:
        return
    try:
        entries = sorted(path.iterdir(), key=lambda p: p.name)
    except OSError as e:
        yield f"{prefix}|-- [unreadable: {e.strerror}]"
        return
    files = [e for e in entries if not e.is_dir()]
    dirs = [e for e in entries if e.is_dir()]
    for f in files:
        try:
            size = human_size(f.stat().st_size)
        except OSError:
            size = "broken link"
        link = f" -> {os.readlink(f)}" if f.is_symlink() else ""
        yield f"{prefix}|-- {f.name} ({size}){link}"
    for d in dirs:
        real = d.resolve()
        link = f" -> {os.readlink(d)}" if d.is_symlink() else ""
        if real in ancestors:
            yield f"{prefix}|-- {d.name}/{link} (loop, not followed)"
            continue
        yield f"{prefix}|-- {d.name}/ ({human_size(dir_size(d))}){link}"
        yield from _walk(d, prefix + "    ", ancestors | {real}, depth - 1)
