"""Several hosts on one machine: 2 processes x 4 CPU devices (gloo collectives, coordinator on localhost)
run `selfalign finetune`, a sharded `selfalign generate` and `selfalign run` with JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID, and must equal one process with 8 devices; only process 0 writes
(each process runs in its own directory with relative --out; `run` shares one --run-dir, a shared disk);
killing one process fails the other within the heartbeat timeout instead of hanging."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import hf_fixtures as F

ROOT = Path(__file__).resolve().parents[1]
MESH = "data=2,fsdp=4"
TIMEOUT = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def env(devices: int, pid: int | None = None, port: int | None = None, **extra) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    e.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices), PYTHONPATH=str(ROOT), SELFALIGN_HUGEPAGES="0",
             SELFALIGN_HEARTBEAT_S="10", SELFALIGN_INIT_TIMEOUT_S="60", **extra)
    if pid is not None:
        e.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
    return e


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "selfalign_jax.cli", *map(str, args)]


def run_two(argv, cwds, port, timeout=TIMEOUT):
    procs = [subprocess.Popen(argv, cwd=cwds[i], env=env(4, i, port), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a process of the 2-process run hung")
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]
    return outs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("multihost")
    F.make_model("llama", d / "base")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    with open(d / "train.jsonl", "w") as f:
        for _ in range(16):
            q, a = " ".join(rng.choice(words, 5)), " ".join(rng.choice(words, 6))
            f.write(json.dumps({"question": q, "answer": a}) + "\n")
    with open(d / "prompts.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": " ".join(rng.choice(words, 3 + i))}) + "\n")
    return d


def finetune_args(d: Path, ckpt: Path):
    return ("finetune", "--model", d / "base", "--data", d / "train.jsonl", "--out", "model", "--checkpoint-dir",
            ckpt, "--mesh", MESH, "--batch-size", "8", "--grad-accum", "1", "--epochs", "2", "--max-length", "32",
            "--lr", "3e-3", "--dtype", "float32", "--checkpoint-every", "0")


def generate_args(model: Path):
    return ("generate", "--model", model, "--prompts", "../prompts.jsonl", "--out", "completions.jsonl",
            "--mesh", MESH, "--max-new-tokens", "8", "--batch-size", "8", "--no-stop")


def test_two_processes_equal_one_process_and_only_process_0_writes(setup):
    from safetensors.numpy import load_file

    d = setup
    one = d / "one"
    one.mkdir()
    for args in (finetune_args(d, one / "ckpt"), generate_args(one / "model")):
        r = subprocess.run(cli(*args), cwd=one, env=env(8), capture_output=True, text=True, timeout=TIMEOUT)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]

    cwds = [d / "p0", d / "p1"]
    for c in cwds:
        c.mkdir()
    port = free_port()
    outs = run_two(cli(*finetune_args(d, d / "two-ckpt")), cwds, port)
    assert "wrote model" in outs[0] and "wrote model" not in outs[1]
    outs = run_two(cli(*generate_args(one / "model")), cwds, free_port())  # the same model: the sampler alone
    assert list(cwds[1].iterdir()) == [], "process 1 wrote files"
    a, b = load_file(one / "model" / "model.safetensors"), load_file(cwds[0] / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    # gloo sums the gradients across processes in another order than one process does (fp32 rounding), and
    # Adam's normalisation turns that into up to lr-sized steps where a gradient is ~0: a few elements differ
    close = sum(int((np.abs(a[k] - b[k]) <= 1e-5).sum()) for k in a)
    assert close >= 0.999 * sum(v.size for v in a.values())
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=2e-3, err_msg=k)
    ref = [json.loads(x)["completion"] for x in (one / "completions.jsonl").read_text().splitlines()]
    got = [json.loads(x)["completion"] for x in (cwds[0] / "completions.jsonl").read_text().splitlines()]
    assert got == ref and len(ref) == 8


def test_killed_process_fails_the_other_instead_of_hanging(setup):
    d = setup
    cwds = [d / "k0", d / "k1"]
    for c in cwds:
        c.mkdir()
    args = list(finetune_args(d, d / "kill-ckpt"))
    args[args.index("--epochs") + 1] = "200"  # long enough to be killed mid-run
    port = free_port()
    procs = [subprocess.Popen(cli(*args), cwd=cwds[i], env=env(4, i, port), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        deadline = time.time() + TIMEOUT
        while not (cwds[0].parent / "kill-ckpt").exists() and time.time() < deadline:  # both are training
            if any(p.poll() is not None for p in procs):
                break
            time.sleep(0.5)
        time.sleep(3)
        procs[1].send_signal(signal.SIGKILL)
        t0 = time.time()
        try:
            out = procs[0].communicate(timeout=120)[0]
        except subprocess.TimeoutExpired:
            pytest.fail("process 0 hung after process 1 was killed")
        waited = time.time() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode != 0, out[-2000:]
    why = [ln for ln in out.splitlines() if any(w in ln.lower() for w in ("heartbeat", "unavailable", "terminat",
                                                                            "coordination", "connection"))]
    print(f"process 0 failed {waited:.1f}s after process 1 was killed:\n" + "\n".join(why[:5]))
    assert why, out[-2000:]


RUN_CFG = {"iterations": 1, "generate": 4, "demos": 2, "context_budget": 200, "embedder": "hashing",
           "batch_size": 8, "question_gen": {"max_new_tokens": 8}, "answer_gen": {"max_new_tokens": 8},
           "sft": {"lr": 1e-3, "batch_size": 8, "grad_accum": 1, "max_length": 32, "epochs": 1, "dtype": "float32"},
           "min_words": 1}


def test_two_processes_share_one_run_directory(setup):
    """`selfalign run --distributed` with one run directory on a shared disk (as the README asks): process 0
    creates, locks and writes it, process 1 reads what it wrote; the same stages and files as one process."""
    d = setup
    (d / "run.json").write_text(json.dumps(RUN_CFG))
    args = lambda rd: ("run", "--model", d / "base", "--seeds", d / "train.jsonl", "--run-dir", rd,  # noqa: E731
                       "--config", d / "run.json", "--mesh", MESH)
    one = d / "run-one"
    r = subprocess.run(cli(*args(one)), cwd=d, env=env(8), capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    cwds = [d / "r0", d / "r1"]
    for c in cwds:
        c.mkdir()
    two = d / "run-two"
    outs = run_two(cli(*args(two)), cwds, free_port())
    assert "in use by another" not in outs[1]
    files = lambda root: sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())  # noqa: E731
    assert files(two) == files(one) and (two / "iter_1" / "model" / "config.json").is_file()
    for name in ("seeds.jsonl", "iter_1/questions.jsonl", "iter_1/answers.jsonl", "iter_1/kept.jsonl"):
        assert (two / name).read_text() == (one / name).read_text(), name
    assert not any(p.name.startswith(".") and p.name != ".lock" for p in two.rglob("*")), "a temp was left"
    # resumed by two processes: every stage is reused, nothing is rewritten
    mtimes = {p: p.stat().st_mtime_ns for p in two.rglob("*.jsonl")}
    outs = run_two(cli(*args(two)), cwds, free_port())
    assert "done, reusing" in outs[0] and "done, reusing" in outs[1]
    assert {p: p.stat().st_mtime_ns for p in two.rglob("*.jsonl")} == mtimes
