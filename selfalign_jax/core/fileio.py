"""File I/O: the one atomic writer and the one JSON-records reader.

    atomic(path, directory=False) -> context manager yielding a temp file (or directory) next to
                    `path`; on success it is fsync'd, renamed onto `path` (os.replace) and the parent
                    directory fsync'd; on error it is removed and `path` is left as it was
    write_text(path, text), write_json(path, obj), write_jsonl(path, rows)     atomic
    records(path) -> iterator of (where, dict)      .jsonl[.gz] (one object a line) or .json[.gz] array
    read_jsonl(path) -> list[dict]
    read_text(path) -> str                          whole (maybe gzipped) file; bad UTF-8 names the line
    check_input_file(path)                          a directory or a missing file named before reading
    check_output(path, flag, inputs, directory)     refuse a bad output path before any work
    check_step_dirs(directory, flag, needs)         refuse step folders that are not checkpoints
    disk_error(OSError, path) -> UserError | None   "no space left on device writing PATH" and kin

Bad input raises `UserError` naming the file and line (or item).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import gzip
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from selfalign_jax.core.errors import UserError


# ----------------------------------------------------------------------------------------- writing
def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(p: Path) -> None:
    if p.is_dir():
        for f in p.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(p)
    elif p.is_file():
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())


# OSError numbers that mean "this filesystem cannot take the write": reported as one line
_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
         errno.EFBIG: "file too large for the filesystem", errno.EROFS: "read-only file system"}


def disk_error(e: OSError, path) -> UserError | None:
    """A one-line UserError for a full / read-only filesystem (None for other errors)."""
    why = _FULL.get(e.errno)
    return None if why is None else UserError(f"{why} writing {path}")


def disk_error_text(text: str, path) -> UserError | None:
    """The same for an error known only by its text (Orbax / TensorStore: "... [os_error_code='28']")."""
    m = re.search(r"os_error_code='(\d+)'", text)
    codes = [int(m.group(1))] if m else [c for c in _FULL if os.strerror(c) in text]
    why = next((_FULL[c] for c in codes if c in _FULL), None)
    return None if why is None else UserError(f"{why} writing {path}")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_TEMP = re.compile(r"^\.(.+)\.(tmp|old)-(\d+)-[^/]*$")  # .NAME.tmp-PID-xxx: atomic()'s temp for NAME
# legacy temp names without the writer's PID: .NAME.xxxxxxxx.tmp files and .NAME.xxxxxxxx directories
# (tempfile's 8 random characters); atomic() never makes them, so they are stale
_LEGACY_TEMP = re.compile(r"^\.(.+)\.[a-z0-9_]{8}(\.tmp)?$")


def _temp_of(p: Path) -> tuple[str, str, int | None] | None:
    """(NAME, "tmp" or "old", the writer's PID or None for a legacy temp) when `p` is a temp that atomic()
    makes or made for NAME; else None."""
    m = _TEMP.match(p.name)
    if m:
        return m.group(1), m.group(2), int(m.group(3))
    m = _LEGACY_TEMP.match(p.name)
    if m and (p.is_file() if m.group(2) else p.is_dir()) and not p.is_symlink():
        return m.group(1), "tmp", None
    return None


def _clean_stale(path: Path) -> None:
    """Remove what a killed writer of `path` left beside it (temps named .NAME.tmp-PID-*, old copies
    .NAME.old-PID-*, PID no longer running; legacy temps, named without a PID). An old copy
    kept aside by a replace that was killed half-way is moved back if `path` itself is missing."""
    for p in path.parent.glob(f".{glob.escape(path.name)}.*"):
        _remove_if_stale(p, path)


def remove_stale_temps(directory) -> None:
    """`_clean_stale` for every temp under `directory` (e.g. a run directory, on start)."""
    for p in sorted(Path(directory).rglob(".*.*")):
        t = _temp_of(p)
        if t:
            _remove_if_stale(p, p.parent / t[0])


def _remove_if_stale(p: Path, target: Path) -> None:
    t = _temp_of(p)
    if t is None or t[0] != target.name or (t[2] is not None and _alive(t[2])):
        return
    try:
        if t[1] == "old" and not target.exists():
            os.replace(p, target)
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    except OSError:
        pass


@contextlib.contextmanager
def atomic(path, directory: bool = False) -> Iterator[Path]:
    """Yield a temp path next to `path` for the caller to fill: an empty file, or with `directory` an
    empty directory. On success it is fsync'd and renamed onto `path` (an existing directory there is
    first renamed aside, and deleted only once the new one is in place); on error it is removed and
    `path` is left as it was. The result gets the user's umask; a full or read-only filesystem is one
    line (UserError "no space left on device writing PATH"). A symbolic link `path` is written through:
    its target (which need not exist yet) is replaced and the link kept."""
    path = link_target(Path(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale(path)
        prefix = f".{path.name}.tmp-{os.getpid()}-"
        if directory:
            tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
            os.chmod(tmp, 0o777 & ~_umask())
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, dir=path.parent)
            os.close(fd)
            tmp = Path(name)
            os.chmod(tmp, 0o666 & ~_umask())
    except OSError as e:
        raise (disk_error(e, path) or e) from None
    old = None
    try:
        yield tmp
        _fsync_tree(tmp)
        if directory and path.is_dir():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-{os.getpid()}-", dir=path.parent))
            try:
                os.replace(path, old)  # kept until the new directory is in place
            except OSError:
                old.rmdir()
                old = None
                raise
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if old is not None and not path.exists():
            os.replace(old, path)
        if isinstance(e, OSError) and disk_error(e, path):
            raise disk_error(e, path) from None
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def link_target(path: Path) -> Path:
    """`path` itself, or for a symbolic link the path it leads to (which need not exist); a link in a
    loop is a UserError."""
    if not path.is_symlink():
        return path
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        raise UserError(f"{path}: a symbolic link in a loop") from None


def check_output(path, flag: str = "--out", inputs: dict | None = None, directory: bool = False,
                 overwrite: bool = False) -> Path:
    """Refuse, before any work, an output path that cannot be written as asked: a directory where a
    file is wanted (or the reverse), a non-empty directory without `overwrite`, the same path as an
    input (`inputs`: flag -> path; the input would be replaced), or a place where no file can be created
    (a read-only filesystem, no write permission: a temp file is made and removed there). A symbolic
    link is checked as the path it leads to (atomic() writes through it)."""
    path = Path(path)
    target = link_target(path)
    for name, src in (inputs or {}).items():
        if src is not None and Path(src).resolve() == target.resolve():
            raise UserError(f"{flag} {path} is also {name}: it would be replaced; write somewhere else")
    if directory:
        if target.exists() and not target.is_dir():
            raise UserError(f"{flag}: {path} is a file; a directory is wanted")
        if target.is_dir() and not overwrite and any(target.iterdir()):
            raise UserError(f"{flag}: directory exists and is not empty: {path} (use --overwrite)")
    elif target.is_dir():
        raise UserError(f"{flag}: {path} is a directory; a file path is wanted")
    parent = next((q for q in target.parents if q.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UserError(f"{flag}: {parent} is a file, so {path} cannot be created")
    if parent is not None:
        _check_writable(parent, target, flag)
    return path


def _check_writable(parent: Path, target: Path, flag: str) -> None:
    """A temp file (named as atomic()'s, so a killed probe is cleaned as stale) made and removed in `parent`."""
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=parent)
    except OSError as e:
        raise disk_error(e, target) or UserError(f"{flag}: cannot write in {parent} ({e.strerror})") from None
    os.close(fd)
    os.unlink(name)


def check_step_dirs(directory, flag: str, needs: tuple[str, ...]) -> None:
    """Refuse a checkpoint directory whose step folders (integer names, as Orbax makes them) lack one of
    `needs` (the items every step holds): folders of something else, which a resume would try to read."""
    d = Path(directory)
    if not d.is_dir():
        return
    for step in sorted((p for p in d.iterdir() if p.name.isdigit() and p.is_dir()), key=lambda p: int(p.name)):
        missing = [n for n in needs if not (step / n).exists()]
        if missing:
            raise UserError(f"{flag}: {step} is not a train checkpoint (no {missing[0]}/ in it); "
                            f"use another {flag} or remove the step folders there")


def write_text(path, text: str) -> None:
    with atomic(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path, rows: Iterable[dict]) -> None:
    """One JSON object a line (objects with a `to_dict()` are written as its result)."""
    with atomic(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r.to_dict() if hasattr(r, "to_dict") else r, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------------------- reading
def check_input_file(path) -> Path:
    """`path` if it is a file to read; a directory or a missing file is a UserError naming it."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory; a file is wanted")
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    return path


def open_binary(path: Path):
    """The file (gunzipped for .gz) opened for binary reading; a missing file or a directory is a UserError."""
    check_input_file(path)
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None


def read_text(path) -> str:
    """Whole file as text (BOM dropped); a bad byte is reported with its line number."""
    path = Path(path)
    try:
        with open_binary(path) as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        col = e.start - raw.rfind(b"\n", 0, e.start)
        raise UserError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {col})") from None


def _no_surrogates(obj, where: str) -> None:
    """A \\uD800-style escape decodes to a lone surrogate, which is not text (it cannot be tokenized or
    written back): refuse it here, naming the field."""
    def walk(x, field):
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                raise UserError(f"{where}: field {field!r} is not valid UTF-8 text (a lone surrogate escape "
                                f"such as \\ud800)") from None
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, k if field is None else f"{field}.{k}")
        elif isinstance(x, list):
            for i, v in enumerate(x):
                walk(v, f"{field}[{i}]" if field else f"item {i + 1}")
    walk(obj, None)


def records(path) -> Iterator[tuple[str, dict]]:
    """Yield (where, dict) from a .jsonl[.gz] (one object a line, blank lines skipped) or a .json[.gz]
    array; `where` is "file:line" (or "file: item i") for messages about that record."""
    path = Path(path)
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".json"):
        text = read_text(path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON array of objects")
        if "\\u" in text:
            _no_surrogates(data, str(path))
        for i, obj in enumerate(data, 1):
            if not isinstance(obj, dict):
                raise UserError(f"{path}: item {i}: expected a JSON object, got {type(obj).__name__}")
            yield f"{path}: item {i}", obj
        return
    try:
        with open_binary(path) as f:
            for lineno, raw in enumerate(f, 1):
                where = f"{path}:{lineno}"
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                line = _decode(raw, where).strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
                if "\\u" in line:
                    _no_surrogates(obj, where)
                yield where, obj
    except (OSError, EOFError) as e:  # truncated or corrupt gzip
        raise UserError(f"{path}: cannot read ({e})") from None


def read_jsonl(path) -> list[dict]:
    """Every object of a JSONL (or JSON array) file."""
    return [obj for _, obj in records(path)]


def default_cache_dir() -> Path:
    """The cache of converted and pretrained models: $SELFALIGN_CACHE, else ~/.cache/selfalign-jax."""
    return Path(os.environ.get("SELFALIGN_CACHE") or Path.home() / ".cache" / "selfalign-jax")
