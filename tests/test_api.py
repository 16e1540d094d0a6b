"""selfalign_jax.api: the verbs raise UserError (the CLI turns it into one line + exit 2), config overrides,
the memory check before any compile, a .gguf converted once, a run resumed on another mesh."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import hf_fixtures as fx
from selfalign_jax import api
from selfalign_jax.app import rundir
from selfalign_jax.app.config import IsaraConfig
from selfalign_jax.core.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("api")
    m = fx.make_model("llama", d / "model")
    (d / "pairs.jsonl").write_text("".join(json.dumps({"question": f"q {i} w", "answer": f"a {i} w"}) + "\n"
                                           for i in range(8)))
    return d, m


def test_bad_input_raises_user_error_not_exit(tiny, tmp_path):
    d, _ = tiny
    with pytest.raises(UserError, match="no such preset"):
        api.run(d / "model", d / "pairs.jsonl", tmp_path / "run", config="nope")
    with pytest.raises(UserError, match="not empty"):
        api.finetune(d / "model", d / "pairs.jsonl", d)
    with pytest.raises(UserError, match="--eval-out needs --seeds"):
        api.data(d / "pairs.jsonl", tmp_path / "x.jsonl", eval_out=tmp_path / "y.jsonl")
    with pytest.raises(UserError, match="unknown field 'nope'"):
        api.isara_config("fast", nope=1)
    with pytest.raises(UserError, match=r"^overrides: sft\.grad_accum must be >= 1$"):
        api.isara_config("fast", sft={"grad_accum": 0})


def test_same_checks_as_the_cli_before_any_work(tiny, tmp_path):
    """The argument checks live in the API: a Python caller gets the CLI's one line, nothing written."""
    d, _ = tiny
    pairs = d / "pairs.jsonl"
    cases = [
        (lambda: api.run(d / "model", pairs, tmp_path / "r", scorer="world"), "--scorer needs --eval"),
        (lambda: api.run(d / "model", pairs, tmp_path / "r", iterations=0), "iterations must be >= 1"),
        (lambda: api.run(d / "model", pairs, pairs), "is a file, not a directory"),
        (lambda: api.generate(d / "model", pairs, pairs), "is also --prompts"),
        (lambda: api.generate(d / "model", pairs, tmp_path / "o.jsonl", batch_size=0), "--batch-size must be >= 1"),
        (lambda: api.evaluate(d / "model", pairs, "world", out=pairs), "is also --data"),
        (lambda: api.finetune(tmp_path / "nope", pairs, tmp_path / "ft"), "model directory not found"),
        (lambda: api.finetune(d / "model", pairs, tmp_path / "ft", grad_accum=0), "--grad-accum must be >= 1"),
        (lambda: api.convert(d / "model", pairs), "is a file; a directory is wanted"),
        (lambda: api.data(pairs, tmp_path / "s.jsonl", seeds=0), "--seeds must be >= 1"),
    ]
    for call, match in cases:
        with pytest.raises(UserError, match=match):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_overrides_over_preset_and_mesh():
    c = api.isara_config("fast", None, 7, "fsdp=1", iterations=1, sft={"max_length": 32},
                         question_gen={"temperature": 0.5})
    pre = rundir.load_config("fast")
    assert c.iterations == 1 and c.sft.max_length == 32 and c.sft.lr == pre.sft.lr
    assert c.question_gen.temperature == 0.5 and c.question_gen.max_new_tokens == 7 == c.answer_gen.max_new_tokens
    assert c.mesh == "fsdp=1" and c.generate == pre.generate
    assert rundir.load_config("tpu-v5e-8").mesh == "fsdp=8"


def test_memory_check_before_compile(tiny, tmp_path, capsys):
    d, _ = tiny
    api.check_fits(d / "model", None, None, ts=api._train_settings(IsaraConfig().sft, "float32"))  # CPU: no check
    with pytest.raises(UserError, match="does not fit"):
        api.finetune(d / "model", d / "pairs.jsonl", tmp_path / "out", hbm_gib=1e-4)
    assert not (tmp_path / "out").exists()
    r = subprocess.run([sys.executable, "-m", "selfalign_jax.cli", "finetune", "--model", d / "model", "--data",
                        d / "pairs.jsonl", "--out", tmp_path / "out", "--hbm-gib", "0.0001"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "SELFALIGN_HUGEPAGES": "0"})
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "does not fit" in err[0], r.stderr[-2000:]
    with pytest.raises(UserError, match="does not fit"):
        api.run(d / "model", d / "pairs.jsonl", tmp_path / "run", config="fast", hbm_gib=1e-4, demos=2)
    assert not (tmp_path / "run").exists()


def test_gguf_model_converted_once(tiny, tmp_path):
    d, m = tiny
    g = fx.write_gguf(m, tmp_path / "m.gguf", "llama")
    first = api.hf_model(g, tmp_path / "run.models")
    assert first == tmp_path / "run.models" / "m" and (first / "config.json").is_file()
    stamp = (first / "config.json").stat().st_mtime_ns
    assert api.hf_model(g, tmp_path / "run.models") == first
    assert (first / "config.json").stat().st_mtime_ns == stamp
    assert api.hf_model(d / "model", tmp_path / "unused") == d / "model"


def test_run_resumes_on_another_mesh(tiny, tmp_path):
    d, _ = tiny
    seeds = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(8)]
    cfg = IsaraConfig(demos=2)
    rundir.RunDir(tmp_path, cfg, d / "model", seeds)
    rundir.RunDir(tmp_path, IsaraConfig(demos=2, mesh="data=1"), d / "model", seeds)  # not a different run
    with pytest.raises(UserError, match="different config"):
        rundir.RunDir(tmp_path, IsaraConfig(demos=3), d / "model", seeds)
    # a run directory written by a previous version (sft.mesh: null, no lm_layers) resumes too,
    # and packing (same results) never blocks a resume
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["isara"]["sft"]["mesh"] = None
    del conf["isara"]["lm_layers"]
    (tmp_path / "config.json").write_text(json.dumps(conf))
    rundir.RunDir(tmp_path, cfg, d / "model", seeds)
    rundir.RunDir(tmp_path, IsaraConfig(demos=2, sft=dataclasses.replace(cfg.sft, packing=False)), d / "model", seeds)
    with pytest.raises(UserError, match=r"different config \(isara.lm_layers\)"):
        rundir.RunDir(tmp_path, IsaraConfig(demos=2, lm_layers=0.5), d / "model", seeds)


def test_sft_source_drops_every_loaded_copy(tiny, tmp_path):
    """Before an SFT the run drops the base model and the LM embedder's share of it (the trainer reads the
    directory); the embedder reads its layers of the base model again on its next pass, with the same vectors."""
    d, _ = tiny
    seeds = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(8)]
    rd = rundir.RunDir(tmp_path, IsaraConfig(demos=2, embedder="lm", lm_layers=0.5), d / "model", seeds)
    texts = ["q 1 w", "a 2 w"]
    before = rd.embedder.embed(texts)
    assert rd.embedder.params is not None and "model" in rd.base.__dict__
    later = rundir.LazyModel(d / "model")
    later.model  # noqa: B018  (a later iteration's model, loaded for its generation stages)
    assert rd.sft_source(later) == d / "model"
    assert rd.embedder.params is None and "model" not in rd.base.__dict__ and "model" not in later.__dict__
    assert np.array_equal(rd.embedder.embed(texts), before)
    assert len(rd.embedder.params.layers) == rd.embedder.cfg.n_layers == 1 and "model" not in rd.base.__dict__


def test_package_exports_verbs_lazily():
    import selfalign_jax
    from selfalign_jax.app import data as data_module

    assert selfalign_jax.run is api.run and selfalign_jax.finetune is api.finetune
    assert selfalign_jax.eval is api.evaluate
    assert hasattr(data_module, "read_pairs")  # the data module, not the verb
    with pytest.raises(AttributeError):
        selfalign_jax.nope  # noqa: B018
    r = subprocess.run([sys.executable, "-c", "import sys, selfalign_jax; print('jax' in sys.modules)"],
                       capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin"})
    assert r.stdout.strip() == "False", r.stderr
