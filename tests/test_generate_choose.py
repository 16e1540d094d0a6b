"""Token choice (core/generate/choose.py) against transformers: sampled frequencies against the softmax, the
temperature / top-k / top-p warpers and the repetition-penalty / n-gram processors on random logits."""

import jax
import numpy as np
import torch

from selfalign_jax.core.generate import choose, steps


def _freq(tokens, V):
    return np.bincount(np.asarray(tokens), minlength=V) / len(tokens)


def test_sampled_frequencies_match_softmax():
    N, V = 40000, 6
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, 3.0], np.float32)
    keys = steps.row_keys(jax.random.key(0), np.arange(N, dtype=np.uint32))
    full = lambda a, dt=np.float32: np.full((N,), a, dt)  # noqa: E731
    X = np.broadcast_to(logits, (N, V))
    se = lambda p: 4.5 * np.sqrt(p * (1 - p) / N) + 1e-4  # noqa: E731

    def check(T, k, p, expect):
        got = _freq(choose.sample_logits(X, keys, 0, full(T), full(k, np.int32), full(p)), V)
        assert np.all(np.abs(got - expect) <= se(expect)), (T, k, p, got, expect)
        return got

    soft = lambda z: np.exp(z - z.max()) / np.exp(z - z.max()).sum()  # noqa: E731
    got = check(0.8, 0, 1.0, soft(logits / 0.8))
    assert np.abs(got - soft(logits)).max() > 0.03  # a different temperature is told apart
    top3 = np.where(logits >= np.sort(logits)[-3], logits / 1.5, -np.inf)
    got = check(1.5, 3, 1.0, soft(top3))
    assert got[[2, 3, 4]].sum() == 0
    # nucleus at T=1: probabilities sorted 0.63 (id 5), 0.23 (id 0), 0.09 (id 1) ...: top_p 0.8 keeps ids 5 and 0
    p1 = soft(logits)
    assert p1[5] < 0.8 < p1[5] + p1[0]
    got = check(1.0, 0, 0.8, np.where(np.isin(np.arange(V), [5, 0]), p1, 0) / (p1[5] + p1[0]))
    assert set(np.nonzero(got)[0]) == {0, 5}
    # a different step draws differently, the same step the same
    a = choose.sample_logits(X[:256], keys[:256], 0, full(1.0)[:256], full(0, np.int32)[:256], full(1.0)[:256])
    b = choose.sample_logits(X[:256], keys[:256], 1, full(1.0)[:256], full(0, np.int32)[:256], full(1.0)[:256])
    c = choose.sample_logits(X[:256], keys[:256], 0, full(1.0)[:256], full(0, np.int32)[:256], full(1.0)[:256])
    assert (np.asarray(a) != np.asarray(b)).any() and (np.asarray(a) == np.asarray(c)).all()


def test_warpers_match_transformers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    rng = np.random.default_rng(0)
    # V = 40: cut-offs among the 64 lax.top_k candidates; V = 300 with flat logits: k > 64 and nuclei of
    # more than 64 tokens go through the bisection
    for B, V, scale, ks, ps in ((96, 40, 2.0, [0, 1, 2, 5, 20, 40, 60], [0.05, 0.3, 0.5, 0.9, 0.99, 1.0]),
                                (48, 300, 0.5, [0, 10, 100, 250], [0.2, 0.5, 0.9, 1.0])):
        logits = rng.normal(0, scale, (B, V)).astype(np.float32)
        T = rng.uniform(0.3, 2.0, B).astype(np.float32)
        K = rng.choice(ks, B).astype(np.int32)
        P = rng.choice(ps, B).astype(np.float32)
        ours = np.asarray(choose.warp_logits(logits, T, K, P))
        for b in range(B):
            x = torch.tensor(logits[b:b + 1])
            x = TemperatureLogitsWarper(float(T[b]))(None, x)
            if K[b] > 0:
                x = TopKLogitsWarper(int(K[b]))(None, x)
            if P[b] < 1:
                x = TopPLogitsWarper(float(P[b]))(None, x)
            ref = x.numpy()[0]
            np.testing.assert_array_equal(np.isfinite(ours[b]), np.isfinite(ref), err_msg=f"V {V} row {b}")
            np.testing.assert_allclose(ours[b][np.isfinite(ref)], ref[np.isfinite(ref)], rtol=1e-6)
        if V > 64:
            kept = np.isfinite(ours).sum(1)
            assert (kept[(K == 100) & (P == 1)] == 100).all() and (kept[(K == 0) & (P == 0.9)] > 64).any()
    # exact nucleus on a constructed distribution (sorted mass 0.5, 0.3, 0.15, 0.05, shuffled ids)
    probs = np.array([0.15, 0.5, 0.05, 0.3], np.float32)
    lg = np.log(probs)[None]
    for p, keep in ((0.85, {0, 1, 3}), (0.5, {1}), (0.51, {1, 3}), (0.96, {0, 1, 2, 3}), (1e-6, {1})):
        w = np.asarray(choose.warp_logits(lg, np.ones(1, np.float32), np.zeros(1, np.int32), np.array([p], np.float32)))
        assert set(np.nonzero(np.isfinite(w[0]))[0]) == keep, (p, w)


def test_processors_match_transformers():
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(1)
    B, V, L = 16, 12, 30
    logits = rng.normal(0, 2, (B, V)).astype(np.float32)
    ids = rng.integers(0, 5, (B, L))  # small alphabet: many repeated n-grams
    seen = np.zeros((B, V), bool)
    seen[np.arange(B)[:, None], ids] = True
    ours = np.asarray(choose.repetition_penalty(logits, seen, np.full((B,), 1.3, np.float32)))
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor(ids), torch.tensor(logits)).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    lens = rng.integers(1, L + 1, B)
    pad = 5
    hist = np.full((B, pad + L + 4), -1, np.int32)  # rows left-padded (-1), then L slots, then empty
    for b in range(B):
        hist[b, pad + L - lens[b]:pad + L] = ids[b, :lens[b]]
    start = pad + L - lens
    for n in (1, 2, 3, 4):
        got = np.asarray(jax.jit(choose.ngram_ban, static_argnums=(3, 4))(hist, start, pad + L, n, V))
        for b in range(B):
            row = torch.tensor(ids[b:b + 1, :lens[b]])
            want = ~np.isfinite(NoRepeatNGramLogitsProcessor(n)(row, torch.zeros(1, V)).numpy()[0])
            np.testing.assert_array_equal(got[b], want, err_msg=f"n={n} row {b} len {lens[b]}")
        assert got.any()
