"""Bad input (issue 27): each case answers with one line naming the file, line or field and exit 2, before
any work where the problem can be seen before it, and leaves what was already written as it was."""

import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest

import hf_fixtures as fx
from selfalign_jax.core.errors import UserError


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    p = tmp_path_factory.mktemp("llama")
    fx.make_model("llama", p)
    return p


def _main(capsys, *argv):
    """The CLI in this process: (exit code, stderr)."""
    from selfalign_jax import cli
    capsys.readouterr()  # what fixtures printed
    with pytest.raises(SystemExit) as e:
        cli.main([str(a) for a in argv])
    return e.value.code, capsys.readouterr().err


def _refused(capsys, argv, match):
    """The CLI exits 2 with one line matching `match`; returns the line."""
    code, err = _main(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and re.search(match, lines[0]), (argv, code, err)
    return lines[0]


def _qa(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _no_work(monkeypatch):
    """Loading a model (the first work of generate / finetune / run) fails the test."""
    from selfalign_jax import api
    from selfalign_jax.core import checkpoint

    def work(*a, **k):
        raise AssertionError("work started before the bad input was refused")
    monkeypatch.setattr(api.LoadedModel, "load", work)
    monkeypatch.setattr(checkpoint, "load_tokenizer", work)


# ---------------------------------------------------------------------------------------- inputs
def test_seeds_without_answer_named_no_format_flag(src, tmp_path, capsys, monkeypatch):
    _no_work(monkeypatch)
    noans = _qa(tmp_path / "q.jsonl", [{"question": "the water"}, {"question": "is good"}])
    line = _refused(capsys, ["run", "--model", src, "--seeds", noans, "--run-dir", tmp_path / "r"],
                    rf"{noans}:1: missing field 'answer'")
    assert "--format" not in line
    other = _qa(tmp_path / "p.jsonl", [{"prompt": "the water"}])
    line = _refused(capsys, ["run", "--model", src, "--seeds", other, "--run-dir", tmp_path / "r"],
                    rf"{other}: cannot tell the format from fields \['prompt'\]; seeds are")
    assert "pass --format" not in line
    assert not (tmp_path / "r").exists()


def test_directory_given_as_input_file(src, tmp_path, capsys, monkeypatch):
    _no_work(monkeypatch)
    d = tmp_path / "dir.jsonl"
    d.mkdir()
    for argv in (["run", "--model", src, "--seeds", d, "--run-dir", tmp_path / "r"],
                 ["run", "--model", src, "--seeds", tmp_path, "--run-dir", tmp_path / "r"],
                 ["finetune", "--model", src, "--data", d, "--out", tmp_path / "ft"],
                 ["generate", "--model", src, "--prompts", d, "--out", tmp_path / "o.jsonl"]):
        _refused(capsys, argv, r": is a directory; a (prompts )?file is wanted")
    assert not (tmp_path / "r").exists() and not (tmp_path / "ft").exists()


@pytest.mark.parametrize("preset,match", [
    ({"generate": "many"}, r"field 'generate' must be an integer, got \"many\""),
    ({"sft": {"lr": "fast"}}, r"field 'sft\.lr' must be a number, got \"fast\""),
    ({"sft": 3}, r"field 'sft' must be an object of TrainConfig fields, got 3"),
    ({"question_gen": {"early_stopping": "sometimes"}}, r"field 'question_gen\.early_stopping' must be true or"),
    ({"embedder": "bert"}, r"field 'embedder' must be one of \"encoder\", \"lm\", \"hashing\", got \"bert\""),
    ([1, 2], r"a preset is a JSON object of fields, got list"),
])
def test_preset_wrong_type_names_file_and_field(src, tmp_path, capsys, monkeypatch, preset, match):
    _no_work(monkeypatch)
    p = tmp_path / "preset.json"
    p.write_text(json.dumps(preset))
    seeds = _qa(tmp_path / "s.jsonl", [{"question": "the water", "answer": "is good"}] * 4)
    _refused(capsys, ["run", "--model", src, "--seeds", seeds, "--run-dir", tmp_path / "r", "--config", p],
             rf"error: {re.escape(str(p))}: {match}")
    assert not (tmp_path / "r").exists()


def test_truncated_gguf_names_tensor_and_bytes(tmp_path, capsys):
    from transformers import AutoModelForCausalLM
    m = tmp_path / "m"
    fx.make_model("llama", m)
    g = fx.write_gguf(AutoModelForCausalLM.from_pretrained(m), tmp_path / "m.gguf", "llama")
    size = g.stat().st_size
    with open(g, "r+b") as f:
        f.truncate(size - 5000)
    line = _refused(capsys, ["convert", "--model", g, "--out", tmp_path / "out"],
                    rf"{re.escape(str(g))}: truncated: tensor \S+ needs (\d+) bytes at offset (\d+), the file has "
                    rf"(\d+) there \({size - 5000} bytes in all; its tensors need {size}\)")
    n, off, have = map(int, re.search(r"needs (\d+) bytes at offset (\d+), the file has (\d+)", line).groups())
    assert have == size - 5000 - off and have < n
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------- outputs
def test_foreign_step_folders_in_checkpoint_dir(src, tmp_path, capsys, monkeypatch):
    _no_work(monkeypatch)
    data = _qa(tmp_path / "d.jsonl", [{"question": "the water", "answer": "is good"}] * 3)
    ck = tmp_path / "ck"
    for step in ("1", "2"):
        (ck / step).mkdir(parents=True)
        (ck / step / "notes.txt").write_text("mine")
    _refused(capsys, ["finetune", "--model", src, "--data", data, "--out", tmp_path / "ft", "--checkpoint-dir", ck],
             rf"--checkpoint-dir: {re.escape(str(ck / '1'))} is not a train checkpoint \(no meta/ in it\)")
    # the default checkpoint directory (OUT.ckpt) too
    shutil.copytree(ck, tmp_path / "ft.ckpt")
    _refused(capsys, ["finetune", "--model", src, "--data", data, "--out", tmp_path / "ft"],
             r"ft\.ckpt/1 is not a train checkpoint")
    assert not (tmp_path / "ft").exists()
    assert sorted(p.name for p in ck.rglob("*")) == ["1", "2", "notes.txt", "notes.txt"]


def test_read_only_output_refused_before_generating(src, tmp_path, capsys, monkeypatch):
    from selfalign_jax.core import fileio
    _no_work(monkeypatch)
    prompts = _qa(tmp_path / "p.jsonl", [{"prompt": "the water"}])
    out = tmp_path / "ro" / "o.jsonl"
    (tmp_path / "ro").mkdir()
    real = fileio.tempfile.mkstemp

    def ro(*a, dir=None, **k):  # noqa: A002 - the folder of --out is on a read-only filesystem
        if dir is not None and os.path.samefile(dir, tmp_path / "ro"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*a, dir=dir, **k)
    monkeypatch.setattr(fileio.tempfile, "mkstemp", ro)
    line = _refused(capsys, ["generate", "--model", src, "--prompts", prompts, "--out", out],
                    rf"error: read-only file system writing {re.escape(str(out))}$")
    assert line
    os.chmod(tmp_path / "ro", 0o555)  # no write permission (refused by the kernel unless running as root)
    monkeypatch.setattr(fileio.tempfile, "mkstemp", real)
    try:
        if os.geteuid() != 0:
            _refused(capsys, ["generate", "--model", src, "--prompts", prompts, "--out", out],
                     rf"--out: cannot write in {re.escape(str(tmp_path / 'ro'))} \(Permission denied\)")
    finally:
        os.chmod(tmp_path / "ro", 0o755)
    assert list((tmp_path / "ro").iterdir()) == []


def test_second_finetune_on_one_out_refused(src, tmp_path, capsys, monkeypatch):
    from selfalign_jax.app import runlock
    _no_work(monkeypatch)
    data = _qa(tmp_path / "d.jsonl", [{"question": "the water", "answer": "is good"}] * 3)
    out = tmp_path / "ft"
    p = fx.hold_lock(out, "acquire_output")
    try:
        _refused(capsys, ["finetune", "--model", src, "--data", data, "--out", out],
                 rf"error: {re.escape(str(out))}: in use by another selfalign process \(PID {p.pid}\); wait for it "
                 r"to finish or use another --out")
    finally:
        p.kill()
        p.wait()
    assert not out.exists() and not (tmp_path / "ft.ckpt").exists()
    runlock.acquire_output(out)  # the holder died: its lock went with it
    runlock.release_output(out)


def test_dangling_and_overwrite_directory_symlinks_written_through(src, tmp_path, capsys):
    """`--out LINK` writes where the link leads (the link kept), with no temp or old copy left beside."""
    from selfalign_jax import cli
    target, link = tmp_path / "real" / "out", tmp_path / "link"
    (tmp_path / "real").mkdir()
    link.symlink_to(target, target_is_directory=True)  # dangling: the target does not exist yet
    cli.main(["convert", "--model", str(src), "--out", str(link)])
    assert link.is_symlink() and (target / "model.safetensors").is_file()
    (target / "old.txt").write_text("the previous model's")
    _refused(capsys, ["convert", "--model", src, "--out", link], r"directory exists and is not empty: .*link")
    cli.main(["convert", "--model", str(src), "--out", str(link), "--overwrite"])
    assert link.is_symlink() and (target / "model.safetensors").is_file() and not (target / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["out"]
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    _refused(capsys, ["convert", "--model", src, "--out", loop], r"loop: a symbolic link in a loop")


def test_replace_aside_failing_leaves_no_old_copy(tmp_path, monkeypatch):
    from selfalign_jax.core import fileio
    out = tmp_path / "out"
    out.mkdir()
    (out / "f").write_text("kept")
    real = os.replace

    def fail_aside(a, b):
        if ".out.old-" in str(b):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(a, b)
    monkeypatch.setattr(fileio.os, "replace", fail_aside)
    with pytest.raises(OSError):
        with fileio.atomic(out, directory=True) as tmp:
            (tmp / "f").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "f").read_text() == "kept"


# --------------------------------------------------------------------------- runs, reports, cluster
def _cfg():
    return fx.tiny_run_config()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    return fx.finished_run(tmp_path_factory)


def test_stage_cut_at_row_boundary_redone(finished, tmp_path, capsys):
    from selfalign_jax.app import rundir
    from selfalign_jax.core import fileio
    d, seeds, _ = finished
    run = tmp_path / "r"
    shutil.copytree(d / "run", run, ignore=shutil.ignore_patterns(".lock"))
    it = run / "iter_1"
    answers = fileio.read_jsonl(it / "answers.jsonl")
    assert len(answers) == 4
    (it / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in answers[:3]))
    capsys.readouterr()
    rows = rundir.run(d / "model", seeds, run, _cfg())
    out = capsys.readouterr().out
    assert "iter_1/answers.jsonl: 3 rows, the run asks for 4; redoing it" in out
    assert len(fileio.read_jsonl(it / "answers.jsonl")) == 4 and rows[-1]["candidates"] == 4
    assert json.loads((it / "filter.json").read_text())["candidates"] == 4
    # questions.jsonl cut too: it and everything after it are redone
    qs = fileio.read_jsonl(it / "questions.jsonl")
    (it / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qs[:2]))
    rundir.run(d / "model", seeds, run, _cfg())
    assert "iter_1/questions.jsonl: 2 rows, the run asks for 4; redoing it" in capsys.readouterr().out
    assert len(fileio.read_jsonl(it / "questions.jsonl")) == 4 and len(fileio.read_jsonl(it / "answers.jsonl")) == 4


def test_report_checks_every_run_before_writing(finished, tmp_path, capsys):
    d, _, _ = finished
    a = tmp_path / "a"
    shutil.copytree(d / "run", a, ignore=shutil.ignore_patterns(".lock"))
    (a / "report.md").unlink()
    (a / "report.png").unlink()
    _refused(capsys, ["report", a, tmp_path / "nope"], rf"error: {re.escape(str(tmp_path / 'nope'))}: no such run")
    empty = tmp_path / "empty"
    empty.mkdir()
    _refused(capsys, ["report", a, empty], rf"{re.escape(str(empty))}: no metrics\.jsonl")
    assert not (a / "report.md").exists() and not (a / "report.png").exists()


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_unreachable_coordinator_one_line(src, tmp_path):
    """A process other than 0 whose coordinator never answers: one line and exit 2 (not XLA's abort)."""
    prompts = _qa(tmp_path / "p.jsonl", [{"prompt": "the water"}])
    port = _free_port()
    env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
           "JAX_PROCESS_ID": "1", "SELFALIGN_INIT_TIMEOUT_S": "2", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "selfalign_jax.cli", "generate", "--model", str(src), "--prompts",
                        str(prompts), "--out", str(tmp_path / "o.jsonl")], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"selfalign: error: JAX_COORDINATOR_ADDRESS=127.0.0.1:{port}: no coordinator accepts connections there "
        "after 2 s (Connection refused); start process 0 first, or check the address and the firewall "
        "(SELFALIGN_INIT_TIMEOUT_S sets the wait)"], r.stderr[-2000:]
    assert not (tmp_path / "o.jsonl").exists()


def test_coordinator_address_checks():
    from selfalign_jax.core import mesh as MS
    with pytest.raises(UserError, match=r"JAX_COORDINATOR_ADDRESS=localhost: expected HOST:PORT"):
        MS.check_coordinator("localhost", 1, 1)
    with pytest.raises(UserError, match=r"cannot resolve host 'nosuchhost\.invalid'"):
        MS.check_coordinator("nosuchhost.invalid:1234", 1, 1)
    s = socket.socket()
    s.bind(("", 0))
    s.listen()
    port = s.getsockname()[1]
    try:
        with pytest.raises(UserError, match=rf"process 0 serves the coordinator on port {port}, which is in use"):
            MS.check_coordinator(f"localhost:{port}", 0, 1)
        MS.check_coordinator(f"127.0.0.1:{port}", 1, 1)  # a listening coordinator: passes
    finally:
        s.close()
