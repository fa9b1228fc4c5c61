"""One writer per output folder: an OS file lock held for the whole run.

Two ``hwloop finetune`` runs on one ``--out`` would interleave their step logs and leave the
last writer's report beside the other's checkpoint, both with exit code 0. :class:`FolderLock`
takes an exclusive, non-blocking lock on ``<folder>/.hwloop.lock`` (``fcntl.flock`` on POSIX,
``msvcrt.locking`` on Windows). The operating system releases it when the process exits, however
it exits (a crash or ``kill -9`` included), so a stale lock never blocks the next run; the lock
file itself stays and is harmless.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from hwloop.errors import CheckpointError

try:  # POSIX
    import fcntl as _fcntl
except ImportError:  # pragma: no cover - Windows
    _fcntl = None
    import msvcrt as _msvcrt

LOCK_NAME = ".hwloop.lock"


class FolderLock:
    """An exclusive lock on an output folder, as a context manager.

    Args:
        folder: the run's output folder (created if missing).
        what: how the error names the run (e.g. ``"hwloop finetune"``).

    Raises:
        CheckpointError: another process holds the folder; the message names the folder and the
            holder's process id and start command when it recorded them.
    """

    def __init__(self, folder: str | os.PathLike, what: str = "hwloop run"):
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK_NAME
        self._fd: Optional[int] = None

    def acquire(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if _fcntl is not None:
                _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
            else:  # pragma: no cover - Windows
                _msvcrt.locking(fd, _msvcrt.LK_NBLCK, 1)
        except OSError:
            holder = ""
            try:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() if hasattr(os, "pread") else ""
            except OSError:  # pragma: no cover
                pass
            os.close(fd)
            raise CheckpointError(
                f"{self.folder} is in use by another {self.what}"
                + (f" ({holder})" if holder else "")
                + ": two runs on one output folder would mix their logs and reports; wait for it "
                  "to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if _fcntl is not None:
                _fcntl.flock(self._fd, _fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def remove_if_empty(folder) -> bool:
    """Remove ``folder`` when a failed run left nothing in it but its lock file."""
    f = Path(folder)
    try:
        if f.is_dir() and all(c.name == LOCK_NAME for c in f.iterdir()):
            for c in f.iterdir():
                c.unlink()
            f.rmdir()
            return True
    except OSError:
        pass
    return False
