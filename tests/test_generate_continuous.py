"""Continuous batching: greedy output identical to static batching, sampled output independent of the slot count
and of the slot a prompt lands in, per-row limits, stop strings, no compile when prompts are inserted."""

import numpy as np
import pytest

import hf_fixtures as fx
from selfalign_jax.core import checkpoint
from selfalign_jax.core.generate import cache as gen_cache, continuous, prompts as gen_prompts, steps
from selfalign_jax.core.generate import sizing as gen_sizing
from gen_call import generate as gen

WORDS = fx.WORDS[4:]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    fx.make_model("llama", path)
    cfg, params = checkpoint.load(path, dtype="float32")
    return cfg, params, checkpoint.load_tokenizer(path)


def _prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(1, 20)))) for _ in range(n)]


def _limits(n, seed=0):
    return [int(x) for x in np.random.default_rng(seed).choice([1, 3, 6, 12, 20], n)]


def test_greedy_identical_to_static(llama):
    cfg, params, tok = llama
    prompts, lim = _prompts(11), _limits(11)
    static = gen(params, cfg, tok, prompts, max_new_tokens=lim, stop=(), batch_size=4)
    cont = gen(params, cfg, tok, prompts, max_new_tokens=lim, stop=(), batch_size=4, continuous=True)
    assert [r.token_ids for r in cont] == [r.token_ids for r in static]
    assert [r.finish_reason for r in cont] == [r.finish_reason for r in static]
    assert [len(r.token_ids) for r in static if r.finish_reason == "length"] == [
        m for m, r in zip(lim, static) if r.finish_reason == "length"]
    for a, b in zip(cont, static):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_sampled_independent_of_slots_and_stop_strings(llama):
    cfg, params, tok = llama
    prompts, lim = _prompts(9, 1), _limits(9, 1)
    kw = dict(max_new_tokens=lim, temperature=1.0, top_k=20, repetition_penalty=1.2, no_repeat_ngram=2, seed=7,
              stop=())
    ref = gen(params, cfg, tok, prompts, batch_size=16, **kw)  # one static batch
    got = {b: gen(params, cfg, tok, prompts, batch_size=b, continuous=True, **kw) for b in (2, 4)}
    for b, res in got.items():
        assert [r.token_ids for r in res] == [r.token_ids for r in ref], b
    other = gen(params, cfg, tok, prompts, batch_size=2, continuous=True, **{**kw, "seed": 8})
    assert [r.token_ids for r in other] != [r.token_ids for r in ref]
    # stop strings: the same cut as static batching (checked every 3 steps on the host)
    stop = (ref[0].text.split()[1],) if len(ref[0].text.split()) > 1 else ("the",)
    kw.update(stop=stop, stop_check_every=3)
    st = gen(params, cfg, tok, prompts, batch_size=4, **kw)
    ct = gen(params, cfg, tok, prompts, batch_size=2, continuous=True, **kw)
    assert [(r.text, r.token_ids, r.finish_reason) for r in ct] == [(r.text, r.token_ids, r.finish_reason) for r in st]
    assert any(r.finish_reason == "stop" for r in ct)


def test_insertions_take_at_most_a_quarter_of_the_batch(llama, monkeypatch):
    """The first fill of 8 slots runs as insertions of insert_rows(8) = 2 prompts (each prompt's cache and prefill
    2 rows, not 8), and the output is static batching's."""
    cfg, params, tok = llama
    prompts, lim = _prompts(11, 4), _limits(11, 4)
    rows = []
    real = continuous.insert

    def spy(params, st, tokens_RxP, *a, **k):
        rows.append(tokens_RxP.shape[0])
        return real(params, st, tokens_RxP, *a, **k)
    monkeypatch.setattr(continuous, "insert", spy)
    cont = gen(params, cfg, tok, prompts, max_new_tokens=lim, stop=(), batch_size=8, continuous=True)
    static = gen(params, cfg, tok, prompts, max_new_tokens=lim, stop=(), batch_size=8)
    assert gen_sizing.insert_rows(8, 1) == 2 and max(rows) == 2 and len(rows) >= 5
    assert [r.token_ids for r in cont] == [r.token_ids for r in static]


def test_inserting_prompts_does_not_recompile(llama):
    cfg, params, tok = llama
    kw = dict(stop=(), batch_size=4, continuous=True, temperature=0.8)
    gen(params, cfg, tok, _prompts(9, 2), max_new_tokens=_limits(9, 2), **kw)
    before = dict(steps.TRACES)
    # other prompts (same length buckets), other limits, other sampling parameters: many insertions, no trace
    res = gen(params, cfg, tok, _prompts(13, 3), max_new_tokens=_limits(13, 3), **{**kw, "temperature": 0.0})
    assert dict(steps.TRACES) == before
    assert before["insert"] >= 1 and len(res) == 13


def test_cache_shrinks_when_long_prompts_are_done(llama, monkeypatch):
    """Long prompts first, then short ones: once the running rows and the queue fit half the prompt slots, the
    batch decodes over a smaller cache (`_shrink`); greedy output stays identical to static batching, sampled
    output to a single static batch."""
    cfg, params, tok = llama
    rng = np.random.default_rng(5)
    prompts = [" ".join(rng.choice(WORDS, n)) for n in [30, 28] + [int(x) for x in rng.integers(1, 6, 7)]]
    lens = [len(t) for t in gen_prompts.tokenize_prompts(tok, prompts, cfg)[0]]
    assert gen_cache.prompt_bucket(max(lens) - 1) >= 32 and gen_cache.prompt_bucket(sorted(lens)[-3] - 1) == 16, lens
    monkeypatch.setattr(continuous, "SHRINK_FROM", 32)
    shrunk, orig = [], continuous.shrink
    monkeypatch.setattr(continuous, "shrink", lambda st, **k: shrunk.append(k["S"]) or orig(st, **k))
    lim = _limits(len(prompts), 4)
    for kw in (dict(), dict(temperature=1.0, top_k=20, repetition_penalty=1.2, no_repeat_ngram=2, seed=3)):
        ref = gen(params, cfg, tok, prompts, max_new_tokens=lim, stop=(), batch_size=16, **kw)
        shrunk.clear()
        cont = gen(params, cfg, tok, prompts, max_new_tokens=lim, stop=(), batch_size=2, continuous=True, **kw)
        assert shrunk == [16 + gen_cache.new_tokens_bucket(max(lim))]
        assert [r.token_ids for r in cont] == [r.token_ids for r in ref]
        for a, b in zip(cont, ref):
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
