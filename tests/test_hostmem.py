"""hostmem: the glibc huge-page tunable the `selfalign` command re-executes itself with."""

import os
import subprocess
import sys

import pytest

from selfalign_jax.core import hostmem


def test_env_adds_the_tunable_once_and_keeps_others():
    e = hostmem.env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"})
    assert e["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + hostmem.TUNABLE and e["X"] == "1"
    assert hostmem.env(e)["GLIBC_TUNABLES"] == e["GLIBC_TUNABLES"]
    assert hostmem.env({})["GLIBC_TUNABLES"] == hostmem.TUNABLE
    assert hostmem.active(e) and not hostmem.active({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})


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
