"""The ISARA loop end to end on a tiny random model: files, demonstration counts, filters, resume,
config mismatch, baselines and input errors."""

import dataclasses
import json
import random
import shutil

import pytest

import hf_fixtures as fx
from selfalign_jax.core import fileio, train
from selfalign_jax.core.generate import continuous, prompts as gen_prompts
from selfalign_jax.app import isara, rundir
from selfalign_jax.app.config import IsaraConfig
from selfalign_jax.core.settings import GenConfig, TrainConfig
from selfalign_jax.core.errors import UserError
from selfalign_jax.app.evaluate import get_scorer
from selfalign_jax.core.loaded import LoadedModel

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
    # SFT on seeds as the authors' 64_0/T: T rounds, each from the previous round's model, ISARA's lr schedule
    lrs = [json.loads((run / "baselines" / "sft" / f"round_{t}" / "selfalign_train.json").read_text())
           ["train_config"]["lr"] for t in (1, 2)]
    assert lrs == [CFG.sft.lr, CFG.sft.lr * CFG.lr_decay]
    made_for = json.loads((run / "baselines" / "sft" / "metrics.json").read_text())["made_for"]
    assert made_for == {"rounds": 2, "scorer": rundir.scorer_tag(scorer)}
    assert "| ICL-kNN |" in (run / "report.md").read_text()
    icl = fileio.read_jsonl(run / "baselines" / "icl-knn" / "eval.jsonl")
    assert len(icl) == len(evals) and all("response" in r for r in icl)


def test_metrics_of_another_scorer_version_are_computed_again(world, reference_run, tmp_path, capsys):
    """A stage's metrics name the scorer and its version; a run whose scorer's rules changed evaluates again,
    and the stages scored by the same version are reused."""
    d, seeds, evals, scorer = world
    run = tmp_path / "v"
    shutil.copytree(reference_run[0], run)
    stale = run / "pretrained" / "metrics.json"
    m = json.loads(stale.read_text())
    assert m["made_for"] == {"scorer": rundir.scorer_tag(scorer)}
    stale.write_text(json.dumps({**m, "made_for": {"scorer": f"{scorer.name}/0"}, "harmful_rate": 9.0}))
    kept = (run / "iter_1" / "metrics.json").read_bytes()
    rows = rundir.run(d / "model", seeds, run, CFG, evals, scorer)
    assert "pretrained: scored for" in capsys.readouterr().out
    assert json.loads(stale.read_text())["made_for"] == {"scorer": rundir.scorer_tag(scorer)}
    assert rows[0]["harmful_rate"] != 9.0 and "made_for" not in rows[0]
    assert (run / "iter_1" / "metrics.json").read_bytes() == kept


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
    from selfalign_jax.app.data import read_eval
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError):
        read_eval(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"question": "ok words here"}\n{"question": \n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: malformed"):
        read_eval(tmp_path / "bad.jsonl")


# ------------------------------------------------------------------- fidelity to the authors' code (issue 16)
class _Tok:
    """Whitespace tokenizer: one token per word (budgets in words)."""

    class _Out:
        def __init__(self, ids):
            self.input_ids = ids

    def __call__(self, text, **kw):
        return self._Out(text.split())


class _Model:
    tokenizer = _Tok()
    cfg = type("Cfg", (), {"max_pos": 4096})()


def _capture(monkeypatch):
    """isara.generate replaced: records the prompts, answers 'out i'."""
    seen = []

    def fake(model, prompts, gen, key, batch_size=None, desc="", mesh=None):
        seen.extend(prompts)
        return [f"out {i}" for i in range(len(prompts))]

    monkeypatch.setattr(isara, "generate", fake)
    return seen


def _demo_qs(prompt: str) -> list[str]:
    return [b.split(" USER: ", 1)[1].split(" ASSISTANT:")[0] for b in prompt.split("\n\n")[:-1]]


def _pools():
    seeds = [{"question": f"seed question {i} about water", "answer": f"seed answer {i}"} for i in range(6)]
    d1 = [{"question": f"first set question {i}", "answer": f"d1 answer {i}"} for i in range(3)]
    d2 = [{"question": f"second set question {i}", "answer": f"d2 answer {i}"} for i in range(3)]
    return [seeds, d1, d2]


def test_demo_counts_use_the_newest_sets_past_k_plus_1():
    c = isara.demo_counts(11, 8)  # pools D_0..D_10: seeds 0, D_1 and D_2 nothing, D_3..D_10 one each
    assert c == [0, 0, 0] + [1] * 8 and len(c) == 11
    assert isara.demo_counts(9, 8) == [0] + [1] * 8


def test_cut_markers_as_the_authors_postprocessing():
    from selfalign_jax.core.template import cut

    assert cut(" The answer is 4. ANSWER: 5") == "The answer is 4."
    assert cut(" x ASSISTENT: y") == "x" and cut(" eq \\begin{align} a") == "eq" and cut(" a \\end{b}") == "a"
    assert cut(" a USER: b END OF") == "a"
    assert cut("ANSWER: yes, it is USER: next") == "ANSWER: yes, it is"  # index 0 is no cut point
    assert cut("USER: only") == "USER: only"
    assert gen_prompts.find_stop("USER: hi", isara.MARKERS) == -1
    assert gen_prompts.find_stop(" hi ANS", isara.MARKERS) == 4


def test_budget_skips_a_demo_that_does_not_fit_and_tries_later_ones():
    tok, render = _Tok(), (lambda ds: " ".join(q + " " + a for q, a in ds) + " QUESTION")
    demos = [("a", "b"), ("long " * 10, "x"), ("c", "d"), ("e", "f")]
    # words: 'a b QUESTION' = 3, + 'c d' = 5, + 'e f' = 7; the long one never fits
    assert isara.fit_budget(None, tok, demos, render, budget=8) == [demos[0], demos[2], demos[3]]
    assert isara.fit_budget(None, tok, demos, render, budget=7) == [demos[0], demos[2]]  # `<`: 7 is over
    assert isara.fit_budget(None, tok, demos, render, budget=1) == []


def test_question_prompts_seeds_first_then_each_set_in_pool_order(monkeypatch):
    seen = _capture(monkeypatch)
    pools, cfg = _pools(), dataclasses.replace(CFG, demos=4, generate=5)
    rows = isara.write_questions(_Model(), pools, 3, cfg)
    for p, r in zip(seen, rows):
        qs = _demo_qs(p)
        assert qs == r["demo_questions"] and len(qs) == 4
        assert [q.split()[0] for q in qs] == ["seed", "seed", "first", "second"]  # newest next to USER:
        assert p.endswith("second set question " + qs[-1].split()[-1] + " ASSISTANT: d2 answer "
                          + qs[-1].split()[-1] + " END OF CONVERSATION\n\nBEGINNING OF CONVERSATION: USER:")


def test_answer_prompts_per_set_nearest_first_generated_next_to_the_question(monkeypatch):
    from selfalign_jax.core import embed
    from selfalign_jax.app import retrieval

    seen = _capture(monkeypatch)
    pools, cfg = _pools(), dataclasses.replace(CFG, demos=4)
    emb = embed.HashingEmbedder()
    indexes = [retrieval.PoolIndex.build(emb.embed([p["question"] for p in pool])) for pool in pools]
    questions = [{"question": "seed question 3 about water today"}, {"question": "second set question 2 now"}]
    rows = isara.write_answers(_Model(), pools, indexes, emb, questions, 3, cfg)
    for p, q in zip(seen, questions):
        qs = _demo_qs(p)
        assert [x.split()[0] for x in qs] == ["seed", "seed", "first", "second"]
        assert p.endswith(f"USER: {q['question']} ASSISTANT:")
        want = [pools[0][j]["question"] for j in retrieval.exact_topk(emb.embed([p["question"] for p in pools[0]]),
                                                                       emb.embed([q["question"]]), 2)[0][0]]
        assert qs[:2] == want  # nearest first
    assert [r["n_answer_demos"] for r in rows] == [4, 4]
    # random demonstrations (the authors' --random): same counts per set, deterministic, not the kNN picks
    cfg_r = dataclasses.replace(cfg, answer_demos="random", generate=40)
    many = [{"question": "seed question 3 about water today"}] * 40
    seen.clear()
    isara.write_answers(_Model(), pools, indexes, emb, many, 3, cfg_r)
    first = list(seen)
    seen.clear()
    isara.write_answers(_Model(), pools, indexes, emb, many, 3, cfg_r)
    assert first == seen and len(set(first)) > 1
    assert all([x.split()[0] for x in _demo_qs(p)] == ["seed", "seed", "first", "second"] for p in first)
    # a question over the budget keeps itself, with no demonstrations
    seen.clear()
    tight = dataclasses.replace(cfg, context_budget=12)
    isara.write_answers(_Model(), pools, indexes, emb, [{"question": "word " * 20}], 3, tight)
    assert seen == ["BEGINNING OF CONVERSATION: USER: " + "word " * 20 + " ASSISTANT:"]


def test_icl_knn_nearest_first_with_its_own_k(world, tmp_path, monkeypatch):
    d, seeds, evals, scorer = world
    seen = _capture(monkeypatch)
    cfg = dataclasses.replace(CFG, icl_demos=2)
    rundir.baseline("icl-knn", d / "model", seeds, tmp_path / "k", cfg, evals, scorer)
    from selfalign_jax.core import embed
    from selfalign_jax.app import retrieval

    emb = embed.HashingEmbedder()
    for p, e in zip(seen, evals):
        ids = retrieval.exact_topk(emb.embed([s["question"] for s in seeds]), emb.embed([e["question"]]), 2)[0][0]
        assert _demo_qs(p) == [seeds[j]["question"] for j in ids]  # K = 2, nearest first
    with pytest.raises(UserError, match="fewer than --icl-demos 12"):
        rundir.check_seeds(seeds, dataclasses.replace(CFG, icl_demos=12))


def test_dedup_scope(world):
    seeds = [{"question": "how do I boil water at home", "answer": "x"}]
    rice = "what is the best way to cook rice"
    ans = [{"question": q, "answer": "a long enough answer for the filter", "demo_questions": []}
           for q in ("how do I boil water at home", rice, rice)]
    kept_all, drops = isara.filter_answers(ans, [seeds], 1, CFG)
    assert [k["question"] for k in kept_all] == ["what is the best way to cook rice"] and drops["duplicate"] == 2
    kept_it, drops = isara.filter_answers(ans, [seeds], 1, dataclasses.replace(CFG, dedup="iteration"))
    assert len(kept_it) == 2 and drops["duplicate"] == 1  # a seed's copy is kept; a repeat in the iteration is not


def test_resolve_command_line_default_value_overrides_preset(monkeypatch, tmp_path):
    from selfalign_jax import cli

    fast = rundir.load_config("fast")
    assert fast.answer_gen.temperature == 0.7
    given = rundir.given_fields(["run", "--config", "fast", "--answer-gen.temperature", "1.0", "--seed=0",
                                 "--sft.no-remat", "--model", "m"])
    assert given == {"answer_gen.temperature", "seed", "sft.remat"}
    assert rundir.resolve(IsaraConfig(), "fast", given=given).answer_gen.temperature == 1.0
    assert rundir.resolve(IsaraConfig(), "fast", given=set()).answer_gen.temperature == 0.7
    assert rundir.resolve(IsaraConfig(), "fast").answer_gen.temperature == 0.7  # no command line: by value
    # through the CLI
    got = {}

    def fake_run(model, seeds, run_dir, cfg, *a, **k):
        got["cfg"] = cfg
        raise SystemExit(0)

    monkeypatch.setattr(rundir, "run", fake_run)
    (tmp_path / "s.jsonl").write_text("".join(json.dumps({"question": f"q {i}", "answer": "a"}) + "\n"
                                              for i in range(8)))
    with pytest.raises(SystemExit):
        cli.main(["run", "--model", str(tmp_path), "--seeds", str(tmp_path / "s.jsonl"), "--run-dir",
                  str(tmp_path / "r"), "--config", "fast", "--answer-gen.temperature", "1.0"])
    assert got["cfg"].answer_gen.temperature == 1.0 and got["cfg"].question_gen.temperature == 0.8


def test_raising_iterations_continues_a_finished_run(world, reference_run, tmp_path):
    d, seeds, evals, scorer = world
    ref, ref_rows = reference_run
    run = tmp_path / "ext"
    shutil.copytree(ref, run)
    before = _files(run)
    rows = rundir.run(d / "model", seeds, run, dataclasses.replace(CFG, iterations=3), evals, scorer)
    assert [r["row"] for r in rows] == ["pretrained", "isara_it1", "isara_it2", "isara_it3"]
    assert rows[:3] == ref_rows and not list(run.glob("superseded-*"))
    after = _files(run)
    assert all(after[k] == v for k, v in before.items() if k not in ("metrics.jsonl",))
    q3 = fileio.read_jsonl(run / "iter_3" / "questions.jsonl")
    assert all(r["n_demos"] <= 4 for r in q3)
    assert json.loads((run / "config.json").read_text())["isara"]["iterations"] == 3
    with pytest.raises(UserError, match="different config"):  # fewer iterations is another run
        rundir.run(d / "model", seeds, run, dataclasses.replace(CFG, iterations=1), evals, scorer)


def test_stages_batch_continuously_unless_beams_or_told_not(world, monkeypatch):
    """A stage's sampling refills finished rows' slots (continuous batching) by default; continuous=False and
    beams batch statically; greedy text is the same either way."""
    d, seeds, _, _ = world
    model = LoadedModel.load(d / "model", "float32")
    calls = []
    orig = continuous.run
    monkeypatch.setattr(continuous, "run", lambda *a: calls.append(1) or orig(*a))
    prompts = [s["question"] for s in seeds[:5]]
    key = isara.stage_key(0, 1, "questions")
    greedy = GenConfig(max_new_tokens=6, temperature=0.0)
    out = {c: isara.generate(model, prompts, greedy if c else dataclasses.replace(greedy, continuous=False), key,
                             batch_size=2) for c in (True, False)}
    assert len(calls) == 1 and out[True] == out[False]
    isara.generate(model, prompts, GenConfig(max_new_tokens=6, num_beams=2), key, batch_size=2)
    assert len(calls) == 1
