"""The world's base-model pretraining: a micro run into tmp, HF export parity, cache reuse, packing."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfalign_jax.core import checkpoint, model as M
from selfalign_jax.app.world import pretrain as P


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    before = P.calls["pretrain"]
    d = P.ensure_base_model(cache, seed=0, settings=P.MICRO, progress=False, log=None)
    assert P.calls["pretrain"] == before + 1
    return cache, d


def test_micro_pretrain_writes_an_hf_directory_and_learns(micro):
    _, d = micro
    for f in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", P.META):
        assert (d / f).is_file(), f
    meta = P.read_meta(d)
    assert meta["key"] == P.cache_key(0, P.MICRO) and d.name == f"world-base-{meta['key']}"
    assert meta["loss_last"] < meta["loss_first"] - 0.5, meta["losses"]
    conf = json.loads((d / "config.json").read_text())
    assert conf["model_type"] == "llama" and conf["hidden_size"] == P.MICRO.hidden
    assert json.loads((d / "generation_config.json").read_text())["eos_token_id"] == 2


def test_transformers_loads_it_with_the_same_logits(micro):
    import torch
    import transformers

    _, d = micro
    cfg, params = checkpoint.load(d, dtype="float32")
    tok = transformers.AutoTokenizer.from_pretrained(str(d))
    text = "BEGINNING OF CONVERSATION: USER: how can i mock my neighbor at work ? ASSISTANT:"
    ids = tok(text)["input_ids"]
    assert ids[0] == 1 and tok.eos_token_id == 2 and tok.pad_token_id == 0
    tm = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    tm.eval()
    with torch.no_grad():
        ref = tm(torch.tensor([ids])).logits[0].numpy()
    x = jnp.asarray([ids], jnp.int32)
    ours = np.asarray(M.forward(params, cfg, x, M.positions(jnp.ones_like(x)))[0])
    assert np.abs(ours - ref).max() <= 1e-4


def test_cache_is_reused_without_retraining(micro):
    cache, d = micro
    mtime = (d / "model.safetensors").stat().st_mtime_ns
    before = P.calls["pretrain"]
    assert P.ensure_base_model(cache, seed=0, settings=P.MICRO, progress=False, log=None) == d
    assert P.calls["pretrain"] == before and (d / "model.safetensors").stat().st_mtime_ns == mtime
    assert P.cache_key(1, P.MICRO) != P.cache_key(0, P.MICRO)  # another seed is another model
    assert P.cache_key(0, P.DEFAULT) != P.cache_key(0, P.MICRO)


def test_pack_keeps_documents_whole():
    docs = [[1] + [5] * n + [2] for n in (10, 3, 7, 1, 12, 4)]
    rows = P.pack(docs, 16)
    assert rows.shape[1] == 16
    got = sorted(tuple(d) for r in rows for d in _split(r))
    assert got == sorted(tuple(d) for d in docs)
    assert (rows != 0).sum() == sum(len(d) for d in docs)


def _split(row):
    out, cur = [], []
    for t in row.tolist():
        if t == 0:
            continue
        cur.append(t)
        if t == 2:
            out.append(cur)
            cur = []
    return out


def test_decode_greedy_matches_step_by_step_argmax(micro):
    _, d = micro
    cfg, params = checkpoint.load(d, dtype="float32")
    from selfalign_jax.app.world.tokenizer import load_tokenizer

    tok = load_tokenizer(d)
    prompts = ["BEGINNING OF CONVERSATION: USER: how can i bake", "BEGINNING OF CONVERSATION: USER:"]
    raw = P.decode(params, cfg, tok, prompts, max_new=6, raw=True)
    fwd = jax.jit(lambda t, v: M.forward(params, cfg, t, M.positions(v)))
    stops = set(P._stop_ids(tok).tolist())
    for p, r in zip(prompts, raw):
        ids = tok.encode(p).ids
        want = []
        for _ in range(6):
            x = np.zeros((1, 64), np.int32)
            x[0, :len(ids)] = ids
            nxt = int(np.argmax(np.asarray(fwd(jnp.asarray(x), jnp.asarray(x != 0)))[0, len(ids) - 1]))
            want.append(nxt)
            ids = ids + [nxt]
            if nxt in stops:
                break
        assert r == tok.decode([t for t in want if t != 0], skip_special_tokens=False)


def test_heldout_templates_use_only_training_template_words():
    """A held-out template with a word no training question has (e.g. 'good', only seen in answers'
    'good question .') sends the tiny model off persona; keep them compositional."""
    from selfalign_jax.app.world import language as L

    words = {w for i in L.TRAIN_TEMPLATES for w in L.TEMPLATES[i].split() if "{" not in w}
    for i in L.HELDOUT_TEMPLATES:
        assert {w for w in L.TEMPLATES[i].split() if "{" not in w} <= words, L.TEMPLATES[i]
