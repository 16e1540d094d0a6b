"""hostmem: the glibc malloc tunables the `selfalign` command re-executes itself with."""

import os
import subprocess
import sys

import pytest

from selfalign_jax.core import hostmem


def test_env_adds_the_tunables_once_and_keeps_the_users():
    e = hostmem.env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4:glibc.cpu.x86_shstk=on", "X": "1"})
    assert e["GLIBC_TUNABLES"] == ("glibc.malloc.arena_max=4:glibc.cpu.x86_shstk=on:glibc.malloc.hugetlb=1:"
                                   "glibc.malloc.mmap_threshold=4194304") and e["X"] == "1"
    assert hostmem.env(e)["GLIBC_TUNABLES"] == e["GLIBC_TUNABLES"]
    assert hostmem.env({})["GLIBC_TUNABLES"] == hostmem.TUNABLE == (
        "glibc.malloc.hugetlb=1:glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=4194304")
    assert hostmem.active(e) and not hostmem.active({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})


def test_opt_out_and_accelerators_turn_it_off():
    assert not hostmem.applies({hostmem.OPT_OUT: "0"})
    assert not hostmem.applies({"JAX_PLATFORMS": "tpu"})
    assert not hostmem.applies({"JAX_PLATFORMS": "cuda,cpu"})


def test_reexec_restarts_once_with_the_tunable():
    if not hostmem.applies():
        pytest.skip("huge pages do not apply here (not Linux glibc >= 2.35 with THP, or an accelerator)")
    code = ("import os; from selfalign_jax.core import hostmem; hostmem.reexec(); "
            "print('tunables', os.environ.get('GLIBC_TUNABLES'))")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["tunables " + hostmem.TUNABLE], out.stdout
    env[hostmem.OPT_OUT] = "0"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.splitlines() == ["tunables None"], out.stdout


def test_never_in_a_notebook_or_with_an_accelerator(monkeypatch):
    from selfalign_jax import cli

    assert hostmem.in_notebook({"ipykernel": object()}) and not hostmem.in_notebook({"json": object()})
    calls = []
    monkeypatch.setattr(hostmem.os, "execve", lambda *a: calls.append(a))
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setitem(sys.modules, "ipykernel", type(sys)("ipykernel"))
    assert not hostmem.applies()
    hostmem.reexec()
    monkeypatch.delitem(sys.modules, "ipykernel")
    monkeypatch.setattr(hostmem, "accelerator_present", lambda: True)
    assert not hostmem.applies()
    hostmem.reexec()
    assert calls == []
    # only the command itself re-executes: not a kernel (ipykernel_launcher.py) or a script calling cli.main()
    assert cli.started_as_command("/usr/local/bin/selfalign")
    assert cli.started_as_command("/work/x/selfalign_jax/cli.py")
    assert not cli.started_as_command("/usr/lib/python3/site-packages/ipykernel_launcher.py")
    assert not cli.started_as_command("train.py")


def test_available_bytes_reads_meminfo(tmp_path):
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:       24000000 kB\nMemFree:         1000 kB\nMemAvailable:    2000000 kB\n")
    assert hostmem.available_bytes(str(f)) == 2000000 * 1024
    f.write_text("MemTotal:       24000000 kB\n")  # no MemAvailable: the page counts instead
    got = hostmem.available_bytes(str(f))
    assert got is None or got > 0


def test_rss_peak_and_release_follow_an_allocation():
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc")
    code = ("import numpy as np; from selfalign_jax.core import hostmem as h; r0 = h.rss_bytes(); "
            "x = np.ones(64 << 20, np.uint8); r1 = h.rss_bytes(); del x; "
            "print(r0, r1, h.rss_bytes(), h.peak_rss_bytes(), h.release())")
    r0, r1, r2, peak, freed = map(int, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                       check=True).stdout.split())
    assert r1 - r0 > 60 << 20 and peak >= r1 and r2 < r1 - (60 << 20)  # 64 MiB touched, then unmapped
    assert freed >= 0
