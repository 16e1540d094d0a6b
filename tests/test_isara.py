"""The ISARA loop end to end on a tiny random model: files, demonstration counts, filters, resume,
config mismatch, baselines and input errors."""

import dataclasses
import json
import random
import shutil

import pytest

import hf_fixtures as fx
from selfalign_jax import fileio, isara, rundir, train
from selfalign_jax.config import GenConfig, IsaraConfig, TrainConfig
from selfalign_jax.errors import UserError
from selfalign_jax.evaluate import get_scorer

CFG = IsaraConfig(
    iterations=2, generate=6, demos=4, context_budget=400, embedder="hashing",
    question_gen=GenConfig(max_new_tokens=12, temperature=1.0, repetition_penalty=1.05, no_repeat_ngram=3),
    answer_gen=GenConfig(max_new_tokens=12, temperature=1.0, repetition_penalty=1.2, no_repeat_ngram=3),
    eval_max_new_tokens=8, sft=TrainConfig(lr=1e-3, batch_size=4, grad_accum=1, max_length=64), batch_size=8, seed=3)
DATA_FILES = ["questions.jsonl", "answers.jsonl", "filter.json", "kept.jsonl", "eval.jsonl", "metrics.json"]


def _sent(rng, n):
    return " ".join(rng.choice(fx.WORDS[4:120]) for _ in range(n))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("isara")
    fx.make_model("llama", d / "model", max_position_embeddings=512)
    rng = random.Random(0)
    seeds = [{"question": _sent(rng, 8), "answer": _sent(rng, 9)} for _ in range(10)]
    evals = [{"question": _sent(rng, 7), "category": "ab"[i % 2]} for i in range(4)]
    (d / "kw.txt").write_text("water\npeople\n")
    scorer = get_scorer(f"keywords:{d / 'kw.txt'}")
    return d, seeds, evals, scorer


@pytest.fixture(scope="module")
def reference_run(world):
    d, seeds, evals, scorer = world

    class Recording(train.StepFns):  # every compiled train step built during the run
        def __init__(self, spec):
            super().__init__(spec)
            STEPS_BUILT.append(self)

    train._make_step.cache_clear()
    orig, train.StepFns = train.StepFns, Recording
    try:
        rows = rundir.run(d / "model", seeds, d / "ref", CFG, evals, scorer)
    finally:
        train.StepFns = orig
    return d / "ref", rows


STEPS_BUILT: list = []


def test_one_train_step_compile_per_shape_across_iterations(reference_run):
    """Both iterations' SFT (a new learning rate, step count and seed) share one jitted step: the schedule
    is traced, so each batch shape is traced (compiled) once in the whole run."""
    assert len(STEPS_BUILT) == 1
    shapes = STEPS_BUILT[0].traced_shapes
    assert shapes and len(shapes) == len(set(shapes)), shapes


def test_demo_counts_rule():
    assert isara.demo_counts(1, 8) == [8]
    assert isara.demo_counts(2, 8) == [7, 1]
    assert isara.demo_counts(3, 8) == [6, 1, 1]
    assert sum(isara.demo_counts(5, 8)) == 8


def test_full_run_writes_every_file(reference_run):
    run, rows = reference_run
    for t in (1, 2):
        for f in DATA_FILES:
            assert (run / f"iter_{t}" / f).is_file(), f"iter_{t}/{f}"
        assert (run / f"iter_{t}" / "model" / "model.safetensors").is_file()
        assert not (run / f"iter_{t}" / "model.ckpt").exists()  # train state dropped once exported
        assert (run / "index" / f"D_{t}.json").is_file()
    for f in ("config.json", "seeds.jsonl", "metrics.jsonl", "report.md", "report.png", "index/D_0.json",
              "pretrained/metrics.json"):
        assert (run / f).is_file(), f
    assert [r["row"] for r in rows] == ["pretrained", "isara_it1", "isara_it2"]
    report = (run / "report.md").read_text()
    assert "| Pretrained |" in report and "| ISARA it2 |" in report
    # the filters were applied and counted
    for t in (1, 2):
        f = json.loads((run / f"iter_{t}" / "filter.json").read_text())
        kept = fileio.read_jsonl(run / f"iter_{t}" / "kept.jsonl")
        assert f["candidates"] == CFG.generate and f["kept"] == len(kept)
        assert f["kept"] + sum(f["dropped"].values()) == f["candidates"]
        assert all(len(k["question"].split()) >= 5 and len(k["answer"].split()) >= 5 for k in kept)
    q2 = fileio.read_jsonl(run / "iter_2" / "questions.jsonl")
    assert all(r["n_demos"] <= 4 for r in q2)
    scaling = rows[-1]["scaling_ratio"]
    assert scaling == pytest.approx((rows[1]["kept"] + rows[2]["kept"]) / 10, abs=1e-4)


def test_question_prompts_draw_per_pool_set(world, reference_run):
    """Iteration 2 prompts hold 3 seed questions and 1 question from D_1 (K = 4)."""
    run, _ = reference_run
    seeds = {s["question"] for s in fileio.read_jsonl(run / "seeds.jsonl")}
    d1 = {s["question"] for s in fileio.read_jsonl(run / "iter_1" / "kept.jsonl")}
    for r in fileio.read_jsonl(run / "iter_2" / "questions.jsonl"):
        if r["n_demos"] == 4:
            assert sum(q in seeds for q in r["demo_questions"]) == 3
            assert sum(q in d1 for q in r["demo_questions"]) == 1


def _files(run):
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.suffix in (".jsonl", ".json") and "model" not in p.parts
            and p.name != "config.json" and "ckpt" not in p.as_posix()}


def test_resume_after_failure_in_each_stage_equals_uninterrupted(world, reference_run, monkeypatch):
    d, seeds, evals, scorer = world
    ref, ref_rows = reference_run
    run = d / "resumed"
    # each run fails in the next stage (its first call), the following run resumes from there
    for name in ("write_questions", "write_answers", "filter_answers", "sft", "evaluate"):
        orig = getattr(isara, name)

        def boom(*a, _name=name, **k):
            raise RuntimeError(f"injected failure in {_name}")

        monkeypatch.setattr(isara, name, boom)
        with pytest.raises(RuntimeError, match=f"injected failure in {name}"):
            rundir.run(d / "model", seeds, run, CFG, evals, scorer)
        monkeypatch.setattr(isara, name, orig)
    rows = rundir.run(d / "model", seeds, run, CFG, evals, scorer)
    assert rows == ref_rows
    a, b = _files(ref), _files(run)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == b[k], f"{k} differs after resume"


def test_config_mismatch_refused_then_forced(world, reference_run, tmp_path, monkeypatch):
    d, seeds, evals, scorer = world
    ref, _ = reference_run
    run = tmp_path / "r"
    shutil.copytree(ref, run)
    other = dataclasses.replace(CFG, generate=7)
    with pytest.raises(UserError, match=r"different config \(isara\.generate\)"):
        rundir.run(d / "model", seeds, run, other, evals, scorer)
    assert (run / "iter_1" / "kept.jsonl").is_file()  # nothing lost

    def stop(*a, **k):  # the forced run only needs to start
        raise RuntimeError("stop here")

    monkeypatch.setattr(isara, "evaluate", stop)
    with pytest.raises(RuntimeError, match="stop here"):
        rundir.run(d / "model", seeds, run, other, evals, scorer, force=True)
    assert (run / "superseded-1" / "iter_1" / "kept.jsonl").is_file()
    assert json.loads((run / "config.json").read_text())["isara"]["generate"] == 7


def test_baselines_write_rows(world, reference_run, tmp_path):
    d, seeds, evals, scorer = world
    run = tmp_path / "b"
    shutil.copytree(reference_run[0], run)
    for kind in ("icl-knn", "icl-random", "sft"):
        rows = rundir.baseline(kind, d / "model", seeds, run, CFG, evals, scorer)
    names = [r["row"] for r in rows]
    assert names == ["pretrained", "sft", "icl-knn", "icl-random", "isara_it1", "isara_it2"]
    assert "| ICL-kNN |" in (run / "report.md").read_text()
    icl = fileio.read_jsonl(run / "baselines" / "icl-knn" / "eval.jsonl")
    assert len(icl) == len(evals) and all("response" in r for r in icl)


def test_input_errors(world, tmp_path):
    d, seeds, evals, scorer = world
    with pytest.raises(UserError, match="no seed pairs"):
        rundir.run(d / "model", [], tmp_path / "e1", CFG)
    with pytest.raises(UserError, match="fewer than --demos"):
        rundir.run(d / "model", seeds[:3], tmp_path / "e2", CFG)
    with pytest.raises(UserError, match="seed 2 has an empty"):
        rundir.run(d / "model", [seeds[0], {"question": "x", "answer": " "}] + seeds, tmp_path / "e3", CFG)
    with pytest.raises(UserError, match="unknown scorer"):
        get_scorer("nope")
    from selfalign_jax.data import read_eval
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError):
        read_eval(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"question": "ok words here"}\n{"question": \n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: malformed"):
        read_eval(tmp_path / "bad.jsonl")
