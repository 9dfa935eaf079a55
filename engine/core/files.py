"""Small file helpers with no heavy imports (the TUI imports them at start-up)."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())             # as open() would create it, not mkstemp's 0600
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def mount_of(path: Path) -> tuple[str, str]:
    """(device, mount point) of the filesystem holding ``path``, from /proc/mounts where it can be read."""
    path = Path(path).resolve()
    best = ("", "/")
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return best
    for line in lines:
        parts = line.split()
        if len(parts) < 2:
            continue
        dev, mnt = parts[0], parts[1].replace("\\040", " ")
        if (path == Path(mnt) or Path(mnt) in path.parents) and len(mnt) >= len(best[1]):
            best = (dev, mnt)
    return best


def disk_full_message(path: Path, what: str, error: OSError) -> str:
    """One line for a write that ran out of space (ENOSPC / EDQUOT): the device, and what was being written."""
    dev, mnt = mount_of(path)
    where = f"{dev} (mounted at {mnt})" if dev else mnt
    reason = "disk quota exceeded" if getattr(error, "errno", None) == errno.EDQUOT else "no space left on device"
    target = f" ({Path(error.filename).name})" if getattr(error, "filename", None) else ""
    return f"{reason} {where} while writing {what}{target}; free some space, then resume the run"


def cache_dir(*parts: str) -> Path:
    """tunedeck's cache folder ($TUNEDECK_CACHE, else $XDG_CACHE_HOME/tunedeck, else ~/.cache/tunedeck),
    or a folder under it: converted models, compile caches."""
    env = os.environ.get("TUNEDECK_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tunedeck"
    return base.joinpath(*parts)


def model_dir_problem(field: str, path: str) -> str | None:
    """Why a local model folder cannot be loaded, or None (a hub id is checked where it is loaded)."""
    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").is_file():
            return f"{field}: {path!r} is a directory but holds no config.json (not a model folder)"
        return None
    if p.exists():
        return f"{field}: {path!r} is a file, not a model directory"
    if p.is_absolute():
        return f"{field}: {path!r}: no such model directory"
    return None
