"""Beam search and beam-sample against transformers' generate(num_beams=...): token-identical beam search on
every family with and without length_penalty / early_stopping / the exponential decay penalty; beam-sample
deterministic for a key, num_beams=1 = plain sampling, the best-scoring beam returned."""

import jax
import numpy as np
import pytest
import torch

import hf_fixtures as fx

from selfalign_jax.core.generate import beam, prompts as gen_prompts
from gen_call import generate as gen
from selfalign_jax.core.settings import GenConfig
from selfalign_jax.core.errors import UserError

PROMPTS = ["the a of to and in is it you that he was", "word but not what", "one"]
NEW = 10


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    get = fx.model_loader(tmp_path_factory)
    return lambda family: get(family)[1:]


def _hf_beam(tm, tok, prompt, **kw):
    """transformers beam search on one prompt (no padding): the returned new ids, padding after EOS removed."""
    enc = tok([prompt], return_tensors="pt")
    with torch.no_grad():
        out = tm.generate(**enc, do_sample=False, max_new_tokens=NEW, pad_token_id=0, **kw)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    return new[:new.index(2) + 1] if 2 in new else new


FAMILIES = ("llama", "mistral", "qwen2", "gemma", "opt")


@pytest.mark.parametrize("family", FAMILIES)
def test_beam_search_matches_transformers(models, family):
    tm, cfg, params, tok = models(family)
    settings = [dict(), dict(length_penalty=2.0)]  # length_penalty is traced: one compile per family
    if family == "llama":
        settings += [dict(length_penalty=2.0, early_stopping=True), dict(length_penalty=-0.5, early_stopping="never"),
                     dict(exponential_decay_length_penalty=(2, 1.5), repetition_penalty=1.3, no_repeat_ngram=2)]
    for kw in settings:
        res = gen(params, cfg, tok, PROMPTS, num_beams=4, max_new_tokens=NEW, stop=(), **kw)
        hf_kw = {("no_repeat_ngram_size" if k == "no_repeat_ngram" else k): v for k, v in kw.items()}
        for p, r in zip(PROMPTS, res):
            assert r.token_ids == _hf_beam(tm, tok, p, num_beams=4, **hf_kw), (family, kw, p)
            assert len(r.logprobs) == len(r.token_ids)


def test_eos_hypotheses_and_batching(models):
    tm, cfg, params, tok = models("llama")
    # make EOS likely so that hypotheses finish at different lengths
    prompts = PROMPTS + ["time has come", "people water long"]
    kw = dict(num_beams=3, max_new_tokens=NEW, stop=(), exponential_decay_length_penalty=(1, 3.0))
    res = gen(params, cfg, tok, prompts, batch_size=2, **kw)
    assert any(r.finish_reason == "eos" for r in res) and any(len(r.token_ids) < NEW for r in res)
    for p, r in zip(prompts, res):
        assert r.token_ids == _hf_beam(tm, tok, p, num_beams=3, exponential_decay_length_penalty=(1, 3.0)), p
    assert [r.token_ids for r in gen(params, cfg, tok, prompts, batch_size=8, **kw)] == [
        r.token_ids for r in res]


def test_beam_sample(models):
    _, cfg, params, tok = models("llama")
    kw = dict(max_new_tokens=NEW, stop=(), do_sample=True, top_k=50, repetition_penalty=1.2, no_repeat_ngram=3,
              length_penalty=2.0, exponential_decay_length_penalty=(4, 1.6))
    a = gen(params, cfg, tok, PROMPTS, num_beams=5, seed=1, **kw)
    b = gen(params, cfg, tok, PROMPTS, num_beams=5, seed=1, batch_size=1, **kw)
    c = gen(params, cfg, tok, PROMPTS, num_beams=5, seed=2, **kw)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]  # per key, whatever the batch
    assert [r.token_ids for r in a] != [r.token_ids for r in c]
    # the best-scoring beam is returned: the finished hypotheses are kept best first and generate returns the first
    ids = gen_prompts.tokenize_prompts(tok, PROMPTS, cfg)[0]
    job_rows = gen_prompts.Job(GenConfig(no_repeat_ngram=3), params, cfg, tok, ids, jax.random.key(1),
                               *[np.full(3, v, dt) for v, dt in ((1.0, np.float32), (50, np.int32), (1.0, np.float32),
                                                                  (1.2, np.float32))], np.full(3, NEW), (2,), 0, (), 1,
                               None)
    order = [0, 1, 2]  # generate sorts by length: the same order here
    st = beam._search(params, *job_rows.rows(order, 4), np.float32(2.0), np.int32(4), np.float32(1.6), cfg=cfg, nb=5,
                      Tn=16, sample=True, early=False, ngram=3, eos=(2,), pad=0, place=None)
    fin = np.asarray(st.fin_score)[:3]
    assert np.asarray(st.fin_done)[:3].all() and (np.diff(fin, axis=1) <= 0).all() and (fin[:, 0] > fin[:, -1]).all()
    for p, r in enumerate(a):
        assert r.token_ids == np.asarray(st.fin_out)[p, 0, :np.asarray(st.fin_len)[p, 0]].tolist()
    # num_beams = 1 is plain sampling (transformers' semantics), also through the beam entry point
    one_kw = {k: v for k, v in kw.items() if k != "exponential_decay_length_penalty"}
    plain = gen(params, cfg, tok, PROMPTS, max_new_tokens=NEW, stop=(), temperature=1.0, top_k=50, seed=4)
    one = gen(params, cfg, tok, PROMPTS, num_beams=1, seed=4, **one_kw)
    plain_pen = gen(params, cfg, tok, PROMPTS, max_new_tokens=NEW, stop=(), temperature=1.0, top_k=50, seed=4,
                           repetition_penalty=1.2, no_repeat_ngram=3)
    assert [r.token_ids for r in one] == [r.token_ids for r in plain_pen] != [r.token_ids for r in plain]


def test_bad_arguments(models):
    _, cfg, params, tok = models("llama")
    for kw, msg in ((dict(num_beams=0), "num_beams"), (dict(num_beams=2, early_stopping="sometimes"), "early_stopping"),
                    (dict(num_beams=2, exponential_decay_length_penalty=(3,)), "exponential_decay"),
                    (dict(num_beams=2, do_sample=True, temperature=0.0), "temperature")):
        with pytest.raises(UserError, match=msg):
            gen(params, cfg, tok, PROMPTS, **kw)


def test_cli_generate_beams_and_paper_preset(models, tmp_path):
    import json

    from selfalign_jax.app import rundir
    from selfalign_jax.commands import generate as cmd

    path = tmp_path / "m"
    fx.make_model("llama", path)
    _, cfg, params, tok = models("llama")
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    cmd.main(model=path, prompts=inp, out=out, max_new_tokens=NEW, no_stop=True, num_beams=4, length_penalty=2.0,
             early_stopping="never", mesh="data=1")
    ref = gen(params, cfg, tok, PROMPTS, num_beams=4, max_new_tokens=NEW, stop=(), length_penalty=2.0,
                        early_stopping="never")
    assert [json.loads(line)["completion"] for line in out.read_text().splitlines()] == [r.text for r in ref]
    c = rundir.load_config("paper")
    for g, decay in ((c.question_gen, [15, 1.6]), (c.answer_gen, [30, 1.05])):
        assert (g.num_beams, g.do_sample, g.top_k, g.temperature) == (5, True, 50, 1.0)
        assert list(g.exponential_decay_length_penalty) == decay
    assert c.question_gen.length_penalty == 2.0
