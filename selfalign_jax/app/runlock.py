"""One process per run directory: an `fcntl` lock on RUN_DIR/.lock, held for the life of the process.

The kernel drops the lock when its holder exits (however it dies), so a stale lock file never blocks;
the file holds the holder's PID for the message a second process prints. A directory on a read-only
filesystem is not locked (nothing can write there).
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from selfalign_jax.core.errors import UserError

_HELD: dict[Path, int] = {}  # resolved directory -> open lock fd (kept until the process exits)


def acquire(directory) -> None:
    """Lock `directory` for this process (again: a no-op), or raise UserError naming the holder's PID."""
    d = Path(directory).resolve()
    if d in _HELD:
        return
    p = d / ".lock"
    try:
        fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        if e.errno in (errno.EROFS, errno.EACCES):
            return
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise UserError(f"{directory}: in use by another selfalign process (PID {holder}); "
                        "wait for it to finish or use another --run-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[d] = fd


def release(directory) -> None:
    """Drop this process's lock on `directory` (tests; a command holds it until it exits)."""
    fd = _HELD.pop(Path(directory).resolve(), None)
    if fd is not None:
        os.close(fd)
