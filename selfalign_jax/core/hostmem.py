"""glibc malloc tunables for host memory when JAX runs on the CPU (Linux, glibc >= 2.35): transparent huge
pages, one arena per two threads at most, large blocks mapped on their own.

XLA:CPU allocates an executable's temporaries afresh on every call: for the bench train step
(`scripts/bench_train.py`) one block of 2.8 GB, which the kernel maps in 4 KiB pages on first
touch, every step: ~700,000-750,000 page faults and ~1.3 s of system time per step on a 2-core
machine. glibc's `glibc.malloc.hugetlb=1` tunable has malloc advise transparent huge pages for
such blocks (2 MiB pages: 7,000-17,000 faults, 0.25 s). Measured there: step 6.35 s -> 5.72-5.83 s.

Two more tunables keep freed memory from staying resident: `glibc.malloc.arena_max=2` (glibc otherwise
gives every thread that allocates its own arena, whose freed blocks only that arena reuses) and
`glibc.malloc.mmap_threshold=4194304` (blocks of 4 MiB and more are mapped and unmapped on their own; by default
the threshold grows to 32 MiB as large blocks are freed, and such blocks then stay in the arenas). Measured on
the real demo's SFT alone (`scripts/bench_demo_memory.py sft`, SmolLM2-135M, 6 steps; the three runs side by
side on the 2-core machine, one each): peak RSS 3.70 GiB with huge pages alone, 3.31 GiB with arena_max=2,
3.23 GiB with the mmap threshold; the resident set no longer grows from step to step.

glibc reads tunables once, at process start, so the `selfalign` command re-executes itself once
with the tunables added to GLIBC_TUNABLES (a tunable already set there is kept; only where they apply: Linux,
glibc >= 2.35, THP in "always" or "madvise" mode, no accelerator plugin installed nor accelerator device file
present, JAX_PLATFORMS unset or cpu, and not inside a notebook kernel: a kernel must never be replaced under its
client). SELFALIGN_HUGEPAGES=0 turns this off. In a notebook or your own script, start Python with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1:glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=4194304`
to get the same.

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

TUNABLES = {"glibc.malloc.hugetlb": "1", "glibc.malloc.arena_max": "2", "glibc.malloc.mmap_threshold": str(4 << 20)}
TUNABLE = ":".join(f"{k}={v}" for k, v in TUNABLES.items())
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


def _tunables(environ) -> dict[str, str]:
    """GLIBC_TUNABLES of `environ` as {name: value}, in order."""
    items = [t.split("=", 1) for t in environ.get("GLIBC_TUNABLES", "").split(":") if "=" in t]
    return {k: v for k, v in items}


def active(environ=None) -> bool:
    """Every one of TUNABLES is set in GLIBC_TUNABLES (to our value or the user's)."""
    have = _tunables(os.environ if environ is None else environ)
    return all(k in have for k in TUNABLES)


def env(environ=None) -> dict:
    """A copy of `environ` with the TUNABLES not set yet added to GLIBC_TUNABLES (the others kept as they are)."""
    out = dict(os.environ if environ is None else environ)
    have = _tunables(out)
    add = [f"{k}={v}" for k, v in TUNABLES.items() if k not in have]
    if add:
        out["GLIBC_TUNABLES"] = ":".join(t for t in (out.get("GLIBC_TUNABLES", ""), *add) if t)
    return out


def reexec() -> None:
    """Re-execute this process (same interpreter, same command line) with the tunables set, where
    they apply and are not set yet; otherwise return. Call before JAX is imported."""
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
