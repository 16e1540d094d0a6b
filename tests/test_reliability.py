"""Hostile inputs and faults (issue 18): each is one line naming the file / tensor / field, a non-zero
exit, and nothing already written lost."""

import json
import shutil
import subprocess
import sys

import pytest

import hf_fixtures as fx
from selfalign_jax.core import checkpoint
from selfalign_jax.core.errors import UserError


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    p = tmp_path_factory.mktemp("llama")
    fx.make_model("llama", p)
    return p


def _copy(src, tmp_path, name="m"):
    d = tmp_path / name
    shutil.copytree(src, d)
    return d


def _one_line(fn, match):
    with pytest.raises(UserError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "selfalign_jax.cli", *args], capture_output=True, text=True,
                          env=env)


# ------------------------------------------------------------------------------------ run directories
def _cfg():
    return fx.tiny_run_config()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    return fx.finished_run(tmp_path_factory)


def test_second_process_refused_naming_the_holder(finished, tmp_path):
    from selfalign_jax.app import rundir, runlock
    d, seeds, _ = finished
    run = tmp_path / "r"
    run.mkdir()
    p = fx.hold_lock(run)
    try:
        for force in (False, True):
            msg = _one_line(lambda: rundir.run(d / "model", seeds, run, _cfg(), force=force),
                            rf"in use by another selfalign process \(PID {p.pid}\)")
            assert str(run) in msg
        assert [x.name for x in run.iterdir()] == [".lock"]  # nothing written by the refused run
    finally:
        p.kill()
        p.wait()
    runlock.acquire(run)  # the holder died: its lock went with it, the stale file does not block
    runlock.release(run)


def test_run_dir_that_is_a_file_or_foreign(finished, tmp_path):
    from selfalign_jax.app import rundir
    d, seeds, _ = finished
    f = tmp_path / "file"
    f.write_text("x")
    _one_line(lambda: rundir.run(d / "model", seeds, f, _cfg()), "is a file, not a directory")
    _one_line(lambda: rundir.run(d / "model", seeds, d / "model", _cfg(), force=True),
              r"config\.json: not a selfalign run config")
    assert (d / "model" / "model.safetensors").is_file() and not (d / "model" / "superseded-1").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    _one_line(lambda: rundir.run(d / "model", seeds, tmp_path / "other", _cfg()), "holds other files")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{oops")
    _one_line(lambda: rundir.run(d / "model", seeds, tmp_path / "bad", _cfg()), "not valid JSON")


def test_unusable_stage_output_is_redone(finished, tmp_path, capsys):
    from selfalign_jax.core import fileio
    from selfalign_jax.app import rundir
    d, seeds, rows = finished
    run = tmp_path / "r"
    shutil.copytree(d / "run", run, ignore=shutil.ignore_patterns(".lock"))
    (run / "iter_1" / "answers.jsonl").write_bytes(b"")
    killed = run / "iter_1" / ".model.tmp-999999999-abc"  # an export killed half-way
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"half")
    legacy = run / "iter_1" / ".questions.jsonl.x7_k2p9q.tmp"  # a legacy temp name (no PID)
    legacy.write_text("half")
    (run / "iter_1" / "kept.jsonl").write_text("not json\n")
    new = rundir.run(d / "model", seeds, run, _cfg())
    assert "iter_1/answers.jsonl: empty; redoing it" in capsys.readouterr().out
    assert not killed.exists() and not legacy.exists()
    answers = fileio.read_jsonl(run / "iter_1" / "answers.jsonl")
    assert len(answers) == 4
    f = json.loads((run / "iter_1" / "filter.json").read_text())
    assert f["candidates"] == 4 and f["kept"] == len(fileio.read_jsonl(run / "iter_1" / "kept.jsonl"))
    assert new[-1]["candidates"] == 4 and (run / "iter_1" / "model" / "model.safetensors").is_file()
    # an unparsable kept.jsonl alone: the filter and everything after it are redone
    (run / "iter_1" / "kept.jsonl").write_text("{\n")
    rundir.run(d / "model", seeds, run, _cfg())
    assert "iter_1/kept.jsonl: unreadable" in capsys.readouterr().out
    assert fileio.read_jsonl(run / "iter_1" / "answers.jsonl") == answers  # not redone


def test_finished_run_reported_read_only(finished, tmp_path, monkeypatch):
    import errno
    from selfalign_jax.core import fileio
    from selfalign_jax.app import report, rundir
    d, seeds, rows = finished
    run = tmp_path / "r"
    shutil.copytree(d / "run", run)

    def ro(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(fileio, "atomic", ro)
    monkeypatch.setattr(report, "write", ro)
    assert rundir.run(d / "model", seeds, run, _cfg()) == rows


def test_stale_export_temps_removed_and_overwrite_keeps_old(src, tmp_path, monkeypatch):
    import os
    from selfalign_jax.core import fileio
    cfg, params = checkpoint.load(src)
    out = tmp_path / "out"
    stale = [tmp_path / ".out.tmp-999999999-abc", tmp_path / ".out.tmp-999999998-x"]
    stale[0].mkdir()
    (stale[0] / "model.safetensors").write_bytes(b"half")
    stale[1].write_text("half")
    legacy = [tmp_path / ".out.k2j_h4g5", tmp_path / ".out.ab12cd34.tmp"]  # legacy temp names (no PID)
    legacy[0].mkdir()
    (legacy[0] / "model.safetensors").write_bytes(b"half")
    legacy[1].write_text("half")
    mine = tmp_path / f".out.tmp-{os.getpid()}-live"  # a live writer's temp is left alone
    mine.mkdir()
    other = tmp_path / ".out.abcdefgh"  # a file in a temp directory's name: not ours, kept
    other.write_text("user's")
    checkpoint.save(out, cfg, params, tokenizer_from=src)
    assert not any(p.exists() for p in stale + legacy) and mine.is_dir() and other.is_file()
    other.unlink()
    before = (out / "model.safetensors").read_bytes()
    real = os.replace

    def fail_on_new(a, b):  # the new model cannot be put in place
        if ".out.tmp-" in str(a):
            raise OSError(5, "Input/output error")
        return real(a, b)

    monkeypatch.setattr(fileio.os, "replace", fail_on_new)
    with pytest.raises(OSError):
        checkpoint.save(out, cfg, params, tokenizer_from=src, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".out.tmp-%d-live" % os.getpid(), "out"])


# ------------------------------------------------------------------- arguments, messages, the CLI rule
def _main(capsys, *argv):
    """The CLI in this process: (exit code, stderr)."""
    from selfalign_jax import cli
    with pytest.raises(SystemExit) as e:
        cli.main(list(argv))
    err = capsys.readouterr().err
    return e.value.code, err


def _qa(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_arguments_refused_before_work(src, tmp_path, capsys):
    data = _qa(tmp_path / "d.jsonl", [{"question": "the water", "answer": "is good"}] * 3)
    outdir = tmp_path / "od"
    outdir.mkdir()
    afile = tmp_path / "afile"
    afile.write_text("x")
    kw = tmp_path / "kw.txt"
    kw.write_text("water\n")
    other = _qa(tmp_path / "other.jsonl", [{"question": "something else", "answer": "x"}])
    preset = tmp_path / "preset.json"
    preset.write_text('{"sft": {"grad_accum": 0}}')
    m, d = str(src), str(data)
    cases = [
        (["eval", "--model", m, "--data", d, "--scorer", f"keywords:{kw}", "--out", d], "is also --data"),
        (["eval", "--model", m, "--data", d, "--scorer", f"keywords:{kw}", "--out", str(outdir)], "is a directory"),
        (["eval", "--model", m, "--data", d, "--scorer", f"keywords:{kw}", "--batch-size", "0"], "--batch-size must"),
        (["eval", "--model", m, "--data", d, "--scorer", f"pairwise:{m}:{other}"],
         rf"{other}: no answer for 3 of the 3 eval questions"),
        (["generate", "--model", m, "--prompts", d, "--out", d], "is also --prompts"),
        (["generate", "--model", m, "--prompts", d, "--out", "o.jsonl", "--batch-size", "-1"], "--batch-size must"),
        (["convert", "--model", m, "--out", str(afile)], "is a file; a directory is wanted"),
        (["convert", "--model", m, "--out", m, "--overwrite"], "is also --model"),
        (["finetune", "--model", m, "--data", d, "--out", str(afile)], "is a file; a directory is wanted"),
        (["finetune", "--model", m, "--data", d, "--out", str(tmp_path / "ft"), "--grad-accum", "0"],
         "error: --grad-accum must be >= 1"),
        (["finetune", "--model", str(tmp_path / "nope"), "--data", d, "--out", str(tmp_path / "ft")],
         "model directory not found"),
        (["data", "--input", d, "--out", str(outdir)], "is a directory"),
        (["run", "--model", m, "--seeds", d, "--run-dir", str(afile)], "is a file, not a directory"),
        (["run", "--model", m, "--seeds", d, "--run-dir", m], r"config\.json: not a selfalign run config"),
        (["run", "--model", m, "--seeds", d, "--run-dir", str(tmp_path / "r"), "--generate", "0"],
         "--generate must be >= 1"),
        (["run", "--model", m, "--seeds", d, "--run-dir", str(tmp_path / "r"), "--iterations", "0"],
         "--iterations must be >= 1"),
        (["run", "--model", m, "--seeds", d, "--run-dir", str(tmp_path / "r"), "--sft.grad-accum", "0"],
         "error: --sft.grad-accum must be >= 1"),  # the flag as typed (finetune's is --grad-accum)
        (["run", "--model", m, "--seeds", d, "--run-dir", str(tmp_path / "r"), "--batch-size", "4",
          "--sft.batch-size=0"], "error: --sft.batch-size must be >= 1"),
        (["run", "--model", m, "--seeds", d, "--run-dir", str(tmp_path / "r"), "--answer-gen.temperature", "-1"],
         "error: --answer-gen.temperature must be >= 0"),
        (["run", "--model", m, "--seeds", d, "--run-dir", str(tmp_path / "r"), "--config", str(preset)],
         rf"error: {preset}: sft.grad_accum must be >= 1"),
        (["run", "--model", m, "--seeds", d, "--run-dir", str(tmp_path / "r"), "--batch-size", "0"],
         "--batch-size must be >= 1"),
        (["run", "--model", m, "--seeds", d, "--run-dir", str(tmp_path / "r"), "--scorer", "world"],
         "--scorer needs --eval"),
    ]
    import re
    for argv, match in cases:
        code, err = _main(capsys, *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1 and re.search(match, err), (argv, err)
    assert not (tmp_path / "r").exists() and not (tmp_path / "ft").exists()
    assert data.read_text().count("\n") == 3 and afile.read_text() == "x"


def test_messages_name_file_line_field(src, tmp_path, capsys):
    m = str(src)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n")
    noans = _qa(tmp_path / "noans.jsonl", [{"question": "a b", "answer": "c d"}, {"question": "e f", "answer": " "}])
    long = _qa(tmp_path / "long.jsonl", [{"prompt": "the"}, {}, {"prompt": " ".join(["the"] * 100)}])
    long.write_text(long.read_text().replace("{}\n", "\n"))  # a blank line: the third prompt is on line 3
    sur = tmp_path / "sur.jsonl"
    sur.write_text('{"prompt": "ok"}\n{"prompt": "a \\udc80 b"}\n')
    cases = [
        (["run", "--model", m, "--seeds", str(empty), "--run-dir", str(tmp_path / "r")], rf"{empty}: no records"),
        (["run", "--model", m, "--seeds", str(blank), "--run-dir", str(tmp_path / "r")], rf"{blank}: no records"),
        (["run", "--model", m, "--seeds", str(noans), "--run-dir", str(tmp_path / "r")],
         rf"{noans}:2: field 'answer' is empty"),
        (["generate", "--model", m, "--prompts", str(long), "--out", str(tmp_path / "o.jsonl"), "--truncate",
          "error"], rf"{long}:3: the prompt has 101 tokens; the context length is 64"),
        (["generate", "--model", m, "--prompts", str(sur), "--out", str(tmp_path / "o.jsonl")],
         rf"{sur}:2: field 'prompt' is not valid UTF-8"),
        (["generate", "--model", m, "--prompts", str(empty), "--out", str(tmp_path / "o.jsonl")], "no prompts"),
    ]
    import re
    for argv, match in cases:
        code, err = _main(capsys, *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1 and re.search(match, err), (argv, err)
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_rule_other_exceptions(tmp_path, capsys, monkeypatch):
    from selfalign_jax.app import data as dataset
    src = _qa(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])

    def boom(*a, **k):
        raise KeyError("bug")

    monkeypatch.setattr(dataset, "load", boom)
    code, err = _main(capsys, "data", "--input", str(src), "--out", str(tmp_path / "o.jsonl"))
    assert code == 1 and err.strip().splitlines() == [
        "selfalign: internal error: KeyError: 'bug' (run with SELFALIGN_DEBUG=1 for the traceback)"]
    monkeypatch.setenv("SELFALIGN_DEBUG", "1")
    from selfalign_jax import cli
    with pytest.raises(KeyError):
        cli.main(["data", "--input", str(src), "--out", str(tmp_path / "o.jsonl")])


# ------------------------------------------------------------------------- disk full, umask
def test_disk_full_one_line_and_earlier_results_kept(tmp_path, capsys, monkeypatch):
    import errno
    from selfalign_jax.core import fileio
    src = _qa(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    out = tmp_path / "o.jsonl"
    out.write_text("earlier\n")
    def full_open(file, mode="r", *a, **k):  # every file opened for writing hits a full disk
        f = open(file, mode, *a, **k)
        if "w" in mode:
            def write(s):
                raise OSError(errno.ENOSPC, "No space left on device")
            f.write = write
        return f

    monkeypatch.setattr(fileio, "open", full_open, raising=False)
    code, err = _main(capsys, "data", "--input", str(src), "--out", str(out))
    assert code == 2 and err.strip() == f"selfalign: error: no space left on device writing {out}"
    assert out.read_text() == "earlier\n" and sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "o.jsonl"]
    # a raw OSError from any writer outside fileio: the same one line
    monkeypatch.setattr(fileio, "write_jsonl", lambda p, rows: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device", str(p))))
    code, err = _main(capsys, "data", "--input", str(src), "--out", str(out))
    assert code == 1 and err.strip() == f"selfalign: error: no space left on device writing {out}"


def test_file_size_limit_convert_one_line(src, tmp_path):
    """A real short write: RLIMIT_FSIZE below the model's size makes write() fail with EFBIG."""
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (100000, 100000)); "
            "from selfalign_jax import cli; cli.main(sys.argv[1:])")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", code, "convert", "--model", str(src), "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == f"selfalign: error: file too large for the filesystem writing {out}"
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert list(tmp_path.iterdir()) == []  # no half-written model, no temp left


def test_outputs_follow_umask(src, tmp_path):
    import os
    from selfalign_jax.core import fileio
    old = os.umask(0o022)
    try:
        fileio.write_json(tmp_path / "a.json", {"x": 1})
        fileio.write_jsonl(tmp_path / "b.jsonl", [{"x": 1}])
        with fileio.atomic(tmp_path / "d", directory=True) as t:
            (t / "f").write_text("x")
        os.umask(0o077)
        fileio.write_json(tmp_path / "c.json", {"x": 1})
    finally:
        os.umask(old)
    mode = lambda p: (tmp_path / p).stat().st_mode & 0o777  # noqa: E731
    assert (mode("a.json"), mode("b.jsonl"), mode("d"), mode("d/f"), mode("c.json")) == (
        0o644, 0o644, 0o755, 0o644, 0o600)


def test_file_size_limit_orbax_checkpoint_one_line(src, tmp_path):
    """Orbax's background save fails: one line, not its wall of thread tracebacks; the earlier step's
    data is untouched (the train data file) and no model is exported."""
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (50000, 50000)); "
            "from selfalign_jax import cli; cli.main(sys.argv[1:])")
    data = _qa(tmp_path / "d.jsonl", [{"question": "the water", "answer": "is good for you"}] * 4)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", code, "finetune", "--model", str(src), "--data", str(data), "--out",
                        str(out), "--batch-size", "2", "--grad-accum", "1", "--checkpoint-every", "1"],
                       capture_output=True, text=True)
    assert r.returncode != 0
    # no "RuntimeError: Event loop is closed" reports from TensorStore's threads either (they came through
    # sys.unraisablehook, often before the failure reached the CLI)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip() and not ln.startswith(("finetune", "4 examples"))]
    assert lines == [f"selfalign: error: file too large for the filesystem writing {out}.ckpt"], r.stderr[-3000:]
    assert not out.exists()
