"""One process per run directory: an `fcntl` lock on RUN_DIR/.lock, held for the life of the process; and
one per output (`outputs`: `selfalign finetune --out OUT` locks .OUT.lock beside OUT, as OUT itself is replaced
when the model is exported, for as long as the command runs).

The kernel drops the lock when its holder exits (however it dies), so a stale lock file never blocks;
the file holds the holder's PID for the message a second process prints. A directory on a read-only
filesystem is not locked (nothing can write there).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

from selfalign_jax.core.errors import UserError

_HELD: dict[Path, int] = {}  # resolved lock file -> open lock fd (kept until the process exits)


def acquire(directory) -> None:
    """Lock `directory` for this process (again: a no-op), or raise UserError naming the holder's PID."""
    _acquire(Path(directory).resolve() / ".lock", directory, "--run-dir")


def acquire_output(path, flag: str = "--out") -> None:
    """Lock the output `path` (a file or directory, which need not exist yet; its parent is made) for this
    process: a second process writing the same output is refused, naming `flag`."""
    lock = _output_lock(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    _acquire(lock, path, flag)


@contextlib.contextmanager
def outputs(*path_flags):
    """Lock each (path, flag) output for the block (`acquire_output`); the locks this block took are dropped when
    it ends, however it ends, so a later command of the same process (an API caller, a test) can write there."""
    taken = []
    try:
        for path, flag in path_flags:
            held = _output_lock(path) in _HELD
            acquire_output(path, flag)
            if not held:
                taken.append(path)
        yield
    finally:
        for path in taken:
            release_output(path)


def _output_lock(path) -> Path:
    """The lock file of the output `path`: .NAME.lock beside it."""
    target = Path(path).resolve()
    return target.parent / f".{target.name}.lock"


def _acquire(p: Path, what, flag: str) -> None:
    if p in _HELD:
        return
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
        raise UserError(f"{what}: in use by another selfalign process (PID {holder}); "
                        f"wait for it to finish or use another {flag}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[p] = fd


def release(directory) -> None:
    """Drop this process's lock on `directory` (tests; a command holds it until it exits)."""
    _release(Path(directory).resolve() / ".lock")


def release_output(path) -> None:
    """Drop this process's lock on the output `path` (tests)."""
    _release(_output_lock(path))


def _release(p: Path) -> None:
    fd = _HELD.pop(p, None)
    if fd is not None:
        os.close(fd)
