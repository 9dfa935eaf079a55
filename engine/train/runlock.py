"""One trainer per run directory: an advisory lock (``RUN/.trainer.lock``) held by the live trainer.

The lock is an ``flock`` on the file, so it goes with the process: a trainer killed with SIGKILL, or
a machine that rebooted, leaves a file whose lock anyone can take again (a stale lock is taken over
by simply locking it). The file holds the holder's pid, for ``tunedeck stop`` and the messages.

A launcher takes the lock while it lays out the run directory (so two starts into one directory
cannot both pass the check) and, for a detached run, hands the very same open file to the worker,
which keeps it for the run's lifetime: there is no moment when the directory is unguarded.
Torch-free (the TUI reads ``holder``)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from engine.core.errors import UserError

LOCK_FILE = ".trainer.lock"
FD_ENV = "TUNEDECK_RUN_LOCK_FD"         # a detached worker's inherited lock


class RunLock:
    def __init__(self, run_dir: Path | str, name: str = LOCK_FILE):
        self.path = Path(run_dir) / name        # another name: the same kind of lock on another thing
        self.fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock (non-blocking); False when a live process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        self.write_pid(os.getpid())
        return True

    def write_pid(self, pid: int) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{pid}\n".encode(), 0)

    def holder(self) -> int | None:
        """The pid of the live process holding the lock, or None."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    return int(os.pread(fd, 32, 0).decode().strip() or 0) or -1
                except ValueError:
                    return -1
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def release(self, remove: bool = False) -> None:
        """Unlock; ``remove`` also deletes the lock file (a refused start leaves nothing behind)."""
        if self.fd is not None:
            try:
                if remove:
                    self.path.unlink(missing_ok=True)
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None

    def forget(self) -> None:
        """Close our descriptor without unlocking: a child holding the same open file keeps the lock."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def hand_over(self) -> int:
        """The lock's file descriptor, inheritable, for a child that keeps the lock after we exit."""
        assert self.fd is not None
        os.set_inheritable(self.fd, True)
        return self.fd

    @classmethod
    def adopt(cls, run_dir: Path | str) -> RunLock | None:
        """In a detached worker: the lock its launcher handed over (None when there is none)."""
        raw = os.environ.pop(FD_ENV, None)
        if raw is None:
            return None
        lock = cls(run_dir)
        lock.fd = int(raw)
        lock.write_pid(os.getpid())
        return lock


def claim(run_dir: Path) -> RunLock:
    """The run directory's lock, or a one-line refusal naming the live trainer."""
    lock = RunLock(run_dir)
    if not lock.acquire():
        pid = lock.holder()
        who = f"pid {pid}" if pid and pid > 0 else "another process"
        raise UserError(f"{run_dir}: a trainer ({who}) is running in it; stop it first "
                        f"(tunedeck stop {run_dir}) or choose another --work-dir")
    return lock
