"""The sampler (core/generate/sampler.py, static batches) against transformers: greedy parity for every family,
the chunked prefill, penalties in generation, stop strings, compile counts, batching, batch sizing, the CLI."""

import json

import numpy as np
import pytest
import torch

import hf_fixtures as fx
from selfalign_jax.core import checkpoint, model as M
from selfalign_jax.core.generate import cache as gen_cache, sizing, steps
from gen_call import generate as gen
from selfalign_jax.core.errors import UserError

PROMPTS = ["the a of to and in is it you that he was", "word but not what", "one"]
NEW = 10


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return fx.model_loader(tmp_path_factory)


def _hf_generate(tm, tok, prompts, **kw):
    """transformers generate on a left-padded batch: (new ids per row cut after EOS, raw logits per step)."""
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        out = tm.generate(**enc, do_sample=False, max_new_tokens=NEW, pad_token_id=0, output_logits=True,
                          return_dict_in_generate=True, **kw)
    new = out.sequences[:, enc["input_ids"].shape[1]:].tolist()
    rows = [r[:r.index(2) + 1] if 2 in r else r for r in new]
    return rows, torch.stack(out.logits, 1).float().numpy()


@pytest.mark.parametrize("family", fx.ALL)
def test_greedy_matches_transformers(models, family):
    _, tm, cfg, params, tok = models(family)
    ref, ref_logits = _hf_generate(tm, tok, PROMPTS)
    res = gen(params, cfg, tok, PROMPTS, max_new_tokens=NEW, stop=())
    for i, (r, g) in enumerate(zip(res, ref)):
        assert r.token_ids == g, (family, i, r.token_ids, g)
        assert r.finish_reason == ("eos" if g[-1] == 2 else "length")
        ref_lp = torch.log_softmax(torch.tensor(ref_logits[i, :len(g)]), -1).numpy()[np.arange(len(g)), g]
        np.testing.assert_allclose(r.logprobs, ref_lp, atol=2e-4)
        assert r.prompt_tokens == len(tok(PROMPTS[i])["input_ids"]) and r.truncated == 0
    assert [r.text.strip() for r in res] == [tok.decode(r.token_ids, skip_special_tokens=True).strip() for r in res]


@pytest.mark.parametrize("chunk,key_block,chunks", [(8, 128, (0, 8)), (12, 5, (8, 12))])
def test_chunked_prefill_matches_transformers(models, monkeypatch, request, chunk, key_block, chunks):
    """Prefill chunks (32 prompt columns: 4 x 8, or 8 then 2 x 12), each attending to the filled slots in key
    blocks (one block, or blocks of 5): the same tokens as transformers."""
    _, tm, cfg, params, tok = models("mistral")  # sliding window 4: chunk boundaries inside windows
    monkeypatch.setattr(gen_cache, "PREFILL_CHUNK", chunk)
    monkeypatch.setattr(M, "KEY_BLOCK", key_block)
    prompts = [" ".join(fx.WORDS[4:30]), " ".join(fx.WORDS[40:52])]  # 27 and 13 tokens: 32 columns
    assert gen_cache.chunks(gen_cache.prompt_bucket(26)) == chunks
    steps.prefill.clear_cache()  # the module constants are read when tracing: before and after this test
    request.addfinalizer(steps.prefill.clear_cache)
    before = steps.TRACES["prefill"]
    res = gen(params, cfg, tok, prompts, max_new_tokens=NEW, stop=())
    assert steps.TRACES["prefill"] == before + 1
    ref, _ = _hf_generate(tm, tok, prompts)
    assert [r.token_ids for r in res] == ref


def test_topk1_and_tiny_topp_equal_greedy(models):
    _, _, cfg, params, tok = models("llama")
    greedy = gen(params, cfg, tok, PROMPTS, max_new_tokens=NEW, stop=())
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        res = gen(params, cfg, tok, PROMPTS, max_new_tokens=NEW, stop=(), temperature=1.3, seed=5, **kw)
        assert [r.token_ids for r in res] == [r.token_ids for r in greedy], kw
    sampled = gen(params, cfg, tok, PROMPTS, max_new_tokens=NEW, stop=(), temperature=1.3, seed=5)
    assert [r.token_ids for r in sampled] != [r.token_ids for r in greedy]  # the test can fail


def test_changing_sampling_params_does_not_recompile(models):
    _, _, cfg, params, tok = models("llama")
    gen(params, cfg, tok, PROMPTS, max_new_tokens=NEW, stop=())
    before = dict(steps.TRACES)
    for kw in (dict(temperature=0.7), dict(temperature=1.0, top_p=0.9), dict(temperature=0.5, top_k=5),
               dict(temperature=[0.0, 1.0, 2.0], top_p=[1.0, 0.5, 0.8], top_k=[0, 3, 7], repetition_penalty=1.2),
               dict(temperature=0.9, seed=11, stop=("the",))):
        gen(params, cfg, tok, PROMPTS, max_new_tokens=NEW, **{"stop": (), **kw})
    assert dict(steps.TRACES) == before
    # no_repeat_ngram is static: a value no other test uses compiles one more decode (the jit cache is global)
    gen(params, cfg, tok, PROMPTS, max_new_tokens=NEW, stop=(), no_repeat_ngram=5)
    assert steps.TRACES["decode"] == before["decode"] + 1


def test_penalty_and_ngram_generation_match_transformers(models):
    _, tm, cfg, params, tok = models("llama")
    kw = dict(repetition_penalty=1.3, no_repeat_ngram=3)
    res = gen(params, cfg, tok, PROMPTS, max_new_tokens=NEW, stop=(), **kw)
    plain = gen(params, cfg, tok, PROMPTS, max_new_tokens=NEW, stop=())
    assert [r.token_ids for r in res] != [r.token_ids for r in plain]  # the processors changed something
    for p, r in zip(PROMPTS, res):  # one row at a time: transformers would count left padding as tokens
        ref, _ = _hf_generate(tm, tok, [p], repetition_penalty=1.3, no_repeat_ngram_size=3)
        assert r.token_ids == ref[0], (p, r.token_ids, ref[0])


def test_stop_strings_cut_exactly(models):
    _, _, cfg, params, tok = models("llama")

    def text_of(ids):  # the fixture tokenizer: one word per token, joined by spaces; specials dropped
        ws = [w for w in (tok.decode([t], skip_special_tokens=True) for t in ids) if w]
        return " " + " ".join(ws) if ws else ""

    full = gen(params, cfg, tok, PROMPTS, max_new_tokens=NEW, stop=(), ignore_eos=True)
    assert [r.text for r in full] == [text_of(r.token_ids) for r in full]
    w0, w1 = full[0].text.split(), full[1].text.split()
    stops = (w0[4][1:] if len(w0[4]) > 2 else w0[4], " ".join(w1[2:4]))  # inside a token; across two tokens
    hits = 0
    for every in (1, 3, 8):
        res = gen(params, cfg, tok, PROMPTS, max_new_tokens=NEW, stop=stops, ignore_eos=True,
                         stop_check_every=every)
        for f, r in zip(full, res):
            k = next((k for k in range(1, NEW + 1) if any(s in text_of(f.token_ids[:k]) for s in stops)), None)
            if k is None:
                assert (r.token_ids, r.text, r.finish_reason) == (f.token_ids, f.text, "length")
                continue
            hits += 1
            text_k = text_of(f.token_ids[:k])
            cut = min(i for i in (text_k.find(s) for s in stops) if i >= 0)
            assert r.text == text_k[:cut] and r.finish_reason == "stop", (every, r, text_k, stops)
            assert r.token_ids == f.token_ids[:k] and len(r.logprobs) == k
            np.testing.assert_allclose(r.logprobs, f.logprobs[:k], atol=1e-5)
    assert hits >= 6


def test_batches_order_and_determinism(models):
    _, _, cfg, params, tok = models("llama")
    prompts = PROMPTS + ["time has come", "people water long", "long day"]
    kw = dict(max_new_tokens=NEW, stop=(), temperature=1.0, seed=3)
    one = gen(params, cfg, tok, prompts[:4], batch_size=4, **kw)
    again = gen(params, cfg, tok, prompts[:4], batch_size=4, **kw)
    streamed = gen(params, cfg, tok, prompts[:4], batch_size=2, **kw)  # 2 batches, sorted by length
    assert [r.token_ids for r in one] == [r.token_ids for r in again] == [r.token_ids for r in streamed]
    other = gen(params, cfg, tok, prompts[:4], batch_size=4, **{**kw, "seed": 4})
    assert [r.token_ids for r in other] != [r.token_ids for r in one]
    g4 = gen(params, cfg, tok, prompts, max_new_tokens=NEW, stop=(), batch_size=4)  # batches of 4 + 2
    g2 = gen(params, cfg, tok, prompts[3:5], max_new_tokens=NEW, stop=(), batch_size=4)
    g2 += gen(params, cfg, tok, prompts[5:], max_new_tokens=NEW, stop=(), batch_size=4)
    assert [r.token_ids for r in g4[3:]] == [r.token_ids for r in g2]
    assert [r.prompt_tokens for r in g4] == [len(tok(p)["input_ids"]) for p in prompts]
    assert gen(params, cfg, tok, [], max_new_tokens=NEW) == []
    assert [r.token_ids for r in gen(params, cfg, tok, PROMPTS, max_new_tokens=0)] == [[], [], []]


def test_context_limit_and_truncation(models):
    _, _, cfg, params, tok = models("llama")
    assert cfg.max_pos == 64
    long = " ".join(fx.WORDS[4:4 + 70])  # 70 words + BOS = 71 tokens
    (r,) = gen(params, cfg, tok, [long], max_new_tokens=NEW, stop=(), ignore_eos=True, batch_size=4)
    assert r.truncated == 71 - 63 and r.prompt_tokens == 63
    assert len(r.token_ids) == 1 and r.finish_reason == "context"  # position 63 is the last one
    ids = tok(long)["input_ids"]
    (r2,) = gen(params, cfg, tok, [[ids[0]] + ids[-62:]], max_new_tokens=NEW, stop=(), ignore_eos=True,
                       batch_size=4)
    assert r2.token_ids == r.token_ids  # truncation kept BOS and the last 62 tokens
    with pytest.raises(UserError, match="context length"):
        gen(params, cfg, tok, [long], max_new_tokens=NEW, truncate="error")


def test_bad_arguments(models):
    _, _, cfg, params, tok = models("llama")
    for kw, msg in ((dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top.p"), (dict(top_k=-2), "top.k"),
                    (dict(repetition_penalty=0.0), "repetition.penalty"), (dict(temperature=[1.0, 2.0]), "one per")):
        with pytest.raises(UserError, match=msg):
            gen(params, cfg, tok, PROMPTS, **kw)


def test_auto_batch_size():
    cfg = checkpoint.config_from_hf(fx.hf_config("llama").to_dict())
    b = sizing.auto_batch_size(cfg, 100, 100, budget_bytes=1 << 30)
    assert b & (b - 1) == 0 and 1 <= b <= 64
    small = sizing.auto_batch_size(cfg, 2000, 200, budget_bytes=4 << 20)
    assert small < sizing.auto_batch_size(cfg, 100, 100, budget_bytes=64 << 20)
    assert sizing.auto_batch_size(cfg, 100, 100, budget_bytes=1) == 1
    assert [gen_cache.prompt_bucket(n) for n in (1, 16, 17, 256, 257, 300, 513, 1100)] == [
        16, 16, 32, 256, 384, 384, 640, 1152]


def test_cli_generate(models, tmp_path):
    from selfalign_jax.commands import generate as cmd

    path, _, cfg, params, tok = models("llama")
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"prompt": p, "id": i, "meta": {"k": [i]}}) + "\n" for i, p in enumerate(PROMPTS))
                   + "\n")
    out = tmp_path / "out.jsonl"
    cmd.main(model=path, prompts=inp, out=out, max_new_tokens=NEW, no_stop=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    ref = gen(params, cfg, tok, PROMPTS, max_new_tokens=NEW, stop=())
    assert [r["completion"] for r in rows] == [r.text for r in ref]
    assert [(r["id"], r["meta"], r["prompt"]) for r in rows] == [(i, {"k": [i]}, p) for i, p in enumerate(PROMPTS)]
    stop_word = ref[0].text.split()[2]
    cmd.main(model=path, prompts=inp, out=out, max_new_tokens=NEW, stop=(stop_word,))
    first = json.loads(out.read_text().splitlines()[0])["completion"]
    assert stop_word not in first and ref[0].text.startswith(first)
    for bad, msg in (('{"prompt": "a"}\n[1, 2]\n', r"in\.jsonl:2: expected a JSON object"),
                     ('{"prompt": "a"}\n\n{"prompt": 3}\n', r"in\.jsonl:3: \"prompt\" is int"),
                     ('{"text": "a"}\n', r"in\.jsonl:1: no \"prompt\" key"),
                     ('{"prompt": "a"\n', r"in\.jsonl:1: malformed JSON")):
        inp.write_text(bad)
        with pytest.raises(UserError, match=msg):
            cmd.main(model=path, prompts=inp, out=out)
