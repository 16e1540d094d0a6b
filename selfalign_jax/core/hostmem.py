"""Transparent huge pages for host memory when JAX runs on the CPU (Linux, glibc >= 2.35).

XLA:CPU allocates an executable's temporaries afresh on every call: for the bench train step
(`scripts/bench_train.py`) one block of 2.8 GB, which the kernel maps in 4 KiB pages on first
touch, every step: ~700,000-750,000 page faults and ~1.3 s of system time per step on a 2-core
machine. glibc's `glibc.malloc.hugetlb=1` tunable has malloc advise transparent huge pages for
such blocks (2 MiB pages: 7,000-17,000 faults, 0.25 s). Measured there: step 6.35 s -> 5.72-5.83 s.

glibc reads tunables once, at process start, so the `selfalign` command re-executes itself once
with the tunable added to GLIBC_TUNABLES (only where it applies: Linux, glibc >= 2.35, THP in
"always" or "madvise" mode, no accelerator plugin installed nor accelerator device file present, JAX_PLATFORMS
unset or cpu, and not inside a notebook kernel: a kernel must never be replaced under its client).
SELFALIGN_HUGEPAGES=0 turns this off. In a notebook or your own script, start Python with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` to get the same.

Host memory figures for the trainer's budget and the peak-memory lines: `available_bytes` (the kernel's
MemAvailable), `rss_bytes` (this process's resident set now) and `peak_rss_bytes` (its high-water mark,
getrusage's ru_maxrss, as /usr/bin/time -v reports it); `release` hands the heap's free pages back to the
kernel (glibc's malloc_trim) between stages."""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import platform
import resource
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "SELFALIGN_HUGEPAGES"
THP = "/sys/kernel/mm/transparent_hugepage/enabled"
MEMINFO = "/proc/meminfo"
ACCELERATOR_DEVICES = ("/dev/accel0", "/dev/vfio/0", "/dev/nvidia0", "/dev/nvidiactl", "/dev/kfd")
NOTEBOOK_MODULES = ("ipykernel", "google.colab", "kaggle_secrets")
ACCELERATOR_PLUGINS = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")


def _glibc_at_least(major: int, minor: int) -> bool:
    lib, ver = platform.libc_ver()
    if lib != "glibc":
        return False
    try:
        return tuple(int(x) for x in ver.split(".")[:2]) >= (major, minor)
    except ValueError:
        return False


def _thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode ("always", "madvise", "never"), None if unknown."""
    try:
        text = open(THP).read()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")] if "[" in text else None


def _cpu_backend(environ) -> bool:
    plats = environ.get("JAX_PLATFORMS", "")
    if plats:
        return plats.split(",")[0].strip() == "cpu"
    return not any(importlib.util.find_spec(m) is not None for m in ACCELERATOR_PLUGINS)


def accelerator_present() -> bool:
    """A TPU / GPU device file on this machine (whatever JAX would pick)."""
    return any(os.path.exists(p) for p in ACCELERATOR_DEVICES)


def in_notebook(modules=None) -> bool:
    """Running inside a Jupyter / Colab / Kaggle kernel."""
    modules = sys.modules if modules is None else modules
    return any(m in modules for m in NOTEBOOK_MODULES)


def applies(environ=None) -> bool:
    """True where the tunable helps: Linux + glibc >= 2.35 + THP usable + CPU backend and no accelerator
    + not in a notebook + not opted out."""
    environ = os.environ if environ is None else environ
    return (environ.get(OPT_OUT, "1") != "0" and sys.platform.startswith("linux") and _glibc_at_least(2, 35)
            and _thp_mode() in ("always", "madvise") and _cpu_backend(environ) and not accelerator_present()
            and not in_notebook())


def active(environ=None) -> bool:
    environ = os.environ if environ is None else environ
    return TUNABLE in environ.get("GLIBC_TUNABLES", "").split(":")


def env(environ=None) -> dict:
    """A copy of `environ` with the tunable added to GLIBC_TUNABLES (other tunables kept)."""
    out = dict(os.environ if environ is None else environ)
    if not active(out):
        out["GLIBC_TUNABLES"] = ":".join(t for t in (out.get("GLIBC_TUNABLES", ""), TUNABLE) if t)
    return out


def reexec() -> None:
    """Re-execute this process (same interpreter, same command line) with the tunable set, where
    it applies and is not set yet; otherwise return. Call before JAX is imported."""
    if active() or not applies() or not getattr(sys, "orig_argv", None):
        return
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env())
    except OSError:  # cannot re-execute (unusual embedding): run on without
        return


def _meminfo_kib(field: str, path: str = MEMINFO) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_bytes(path: str = MEMINFO) -> int | None:
    """Host memory a new allocation can take without swapping (MemAvailable); None where unknown."""
    kib = _meminfo_kib("MemAvailable", path)
    if kib is not None:
        return kib << 10
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def rss_bytes() -> int:
    """This process's resident set now (VmRSS; the high-water mark where /proc is absent)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) << 10
    except (OSError, ValueError, IndexError):
        pass
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """This process's peak resident set (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak << 10


def release() -> int:
    """Return the free pages of every malloc arena to the kernel (glibc malloc_trim(0)); the bytes RSS dropped by
    (0 where it did not apply: not glibc). glibc keeps what XLA:CPU and the tokenizers free inside its arenas (one per
    thread, and blocks under the mmap threshold, which grows to 32 MiB as large blocks are freed): a stage's freed
    working memory then stays resident into the next stage."""
    name = ctypes.util.find_library("c")
    if not name or platform.libc_ver()[0] != "glibc":
        return 0
    before = rss_bytes()
    ctypes.CDLL(name).malloc_trim(0)
    return max(0, before - rss_bytes())
