"""Token choice: transformers' logits processors and warpers as pure functions of [B, V] logits.

    repetition_penalty(logits, seen, penalty) -> no-repeat-ngram ban (`ngram_ban`) -> temperature -> top-k (keep
    logits >= the k-th largest) -> top-p (keep a token while the mass ranked above it is < top_p; the top token
    always) -> one draw per row by inverse CDF (`draw`). Top-k / top-p are exact thresholds found without sorting
    (`keep`); tied logits are kept or dropped together. `sample_logits` / `warp_logits` are the jitted entry
    points for callers with their own logits (and the tests).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _ukey(z):
    """float32 -> uint32 with the same order (for exact bisection over float values)."""
    b = jax.lax.bitcast_convert_type(z, jnp.int32)
    b = jnp.where(b >= 0, b, b ^ jnp.int32(0x7FFFFFFF))
    return jax.lax.bitcast_convert_type(b, jnp.uint32) ^ jnp.uint32(0x80000000)


def _from_ukey(u):
    b = jax.lax.bitcast_convert_type(u ^ jnp.uint32(0x80000000), jnp.int32)
    return jax.lax.bitcast_convert_type(jnp.where(b >= 0, b, b ^ jnp.int32(0x7FFFFFFF)), jnp.float32)


def _bisect(pred, B):
    """Per row, the largest uint32 `lo` with pred(lo) true, given pred(0) true and pred monotone decreasing
    (32 halvings of [0, 2^32), each one pass over the row)."""
    def body(_, c):
        lo, hi = c
        mid = lo + (hi - lo) // 2
        ok = pred(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 32, body, (jnp.zeros((B,), jnp.uint32), jnp.full((B,), 0xFFFFFFFF, jnp.uint32)))
    return lo

CANDIDATES = 64  # top-k / top-p are resolved on the 64 largest logits when they suffice


def keep_mask(z_BxV, top_k_B, top_p_B):
    """[B, V] bool: the tokens top-k then top-p keep, z = logits / temperature (-inf = banned).

    TopKLogitsWarper keeps logits >= the k-th largest; TopPLogitsWarper then drops a token when the ascending
    cumulative probability up to it is <= 1 - top_p, i.e. when the mass of the tokens ranked above it is
    >= top_p (the top token always stays; top_p >= 1 is off). No sort (XLA:CPU sorts [32, 32000] in ~200 ms):
    both cut-offs are thresholds on z, read off lax.top_k's 64 largest values when the cut falls among them,
    else found exactly by bisection over the float bit patterns. Tied logits are kept or dropped together."""
    B, V = z_BxV.shape
    C = min(CANDIDATES, V)
    # [B, C] descending; the barrier keeps XLA:CPU's TopK kernel (~2 ms), which it otherwise rewrites into
    # a full sort of the rows when the result feeds other ops in the same computation
    vals = jax.lax.optimization_barrier(jax.lax.top_k(z_BxV, C)[0])
    k = jnp.where((top_k_B <= 0) | (top_k_B >= V), V, top_k_B)
    kth = jnp.take_along_axis(vals, (jnp.minimum(k, C) - 1)[:, None], axis=1)[:, 0]
    need_k = (k < V) & (k > C)

    def bisect_k():
        uk = _ukey(z_BxV)
        lo = _bisect(lambda u: jnp.sum(uk >= u[:, None], axis=-1) >= k, B)  # the k-th largest key
        return jnp.where(need_k, _from_ukey(lo), kth)

    kth = jax.lax.cond(jnp.any(need_k), bisect_k, lambda: kth)
    kth = jnp.where(k >= V, -jnp.inf, kth)
    keep = z_BxV >= kth[:, None]
    m = vals[:, :1]
    p = jnp.where(keep, jnp.exp(z_BxV - m), 0.0)
    target = top_p_B * jnp.sum(p, axis=-1)
    pv = jnp.where(vals >= kth[:, None], jnp.exp(vals - m), 0.0)
    excl = _cumsum(pv) - pv  # mass ranked above each candidate
    kc = (excl < target[:, None]) | (jnp.arange(C) == 0)
    pmin = jnp.min(jnp.where(kc, vals, jnp.inf), axis=-1)  # exact when some candidate is dropped
    need_p = (top_p_B < 1) & kc.all(-1)

    def bisect_p():  # smallest key u with mass(z > u) < target: kept = z >= u
        uk = _ukey(z_BxV)
        lo = _bisect(lambda u: jnp.sum(jnp.where(uk > u[:, None], p, 0.0), axis=-1) >= target, B)
        return jnp.where(need_p, _from_ukey(lo + 1), pmin)

    pmin = jax.lax.cond(jnp.any(need_p), bisect_p, lambda: pmin)
    return keep & ((z_BxV >= pmin[:, None]) | (top_p_B >= 1)[:, None])


def _cumsum(x_BxN):
    """Inclusive cumsum over a short last axis as a matmul with a triangular 0/1 matrix (XLA:CPU lowers
    jnp.cumsum to a chain of reduce-windows: slower to compile and to run at these sizes)."""
    n = x_BxN.shape[-1]
    tri = jnp.asarray(np.triu(np.ones((n, n), np.float32)))
    return jnp.dot(x_BxN, tri, precision=jax.lax.Precision.HIGHEST)


def _inverse_cdf(p_BxV, u_B, block: int = 128):
    """Per row the index i with cdf(i-1) <= u * total < cdf(i) of the unnormalised p >= 0, never a zero-mass
    index: block sums, then a cumsum over blocks and one within the chosen block (a [B, V] cumsum on
    XLA:CPU costs ~10 ms at V = 32000)."""
    B, V = p_BxV.shape
    nb = -(-V // block)
    pb = jnp.pad(p_BxV, ((0, 0), (0, nb * block - V))).reshape(B, nb, block)
    s = pb.sum(-1)
    cs = _cumsum(s)
    t = u_B * cs[:, -1]
    last_b = jnp.max(jnp.where(s > 0, jnp.arange(nb), 0), axis=-1)
    j = jnp.minimum(jnp.sum(cs <= t[:, None], axis=-1), last_b)
    blk = jnp.take_along_axis(pb, j[:, None, None], axis=1)[:, 0]
    c2 = _cumsum(blk) + (jnp.take_along_axis(cs, j[:, None], axis=1) - jnp.take_along_axis(
        s, j[:, None], axis=1))
    last_i = jnp.max(jnp.where(blk > 0, jnp.arange(block), 0), axis=-1)
    i = jnp.minimum(jnp.sum(c2 <= t[:, None], axis=-1), last_i)
    return (j * block + i).astype(jnp.int32)


def draw(x_BxV, keys_B, step, temperature_B, top_k_B, top_p_B):
    """One draw per row from softmax(x / T) after top-k and top-p, by inverse CDF with one uniform per row
    (u = uniform(fold_in(row key, step)), step a scalar or one per row: the index of the token the row draws).
    Rows with temperature 0 get an arbitrary id (callers use argmax)."""
    B, V = x_BxV.shape
    z = x_BxV / jnp.where(temperature_B > 0, temperature_B, 1.0)[:, None]
    step_B = jnp.broadcast_to(jnp.asarray(step, jnp.int32), (B,))
    u_B = jax.vmap(lambda k, s: jax.random.uniform(jax.random.fold_in(k, s)))(keys_B, step_B)
    warp = (temperature_B > 0) & (((top_k_B > 0) & (top_k_B < V)) | (top_p_B < 1))
    keep = jax.lax.cond(jnp.any(warp), lambda: keep_mask(z, top_k_B, top_p_B), lambda: jnp.ones((B, V), bool))
    p = jnp.where(keep, jnp.exp(z - z.max(-1, keepdims=True)), 0.0)
    return _inverse_cdf(p, u_B)


@jax.jit
def sample_logits(logits_BxV, keys_B, step, temperature_B, top_k_B, top_p_B):
    """The sampler's draw for given (already penalised) logits; temperature 0 rows get the argmax. For tests
    and for callers with their own logits."""
    x = logits_BxV.astype(jnp.float32)
    tok = draw(x, keys_B, step, temperature_B, top_k_B, top_p_B)
    return jnp.where(temperature_B > 0, tok, jnp.argmax(x, axis=-1).astype(jnp.int32))


@jax.jit
def warp_logits(logits_BxV, temperature_B, top_k_B, top_p_B):
    """Logits / temperature with -inf where top-k / top-p remove a token (transformers' Temperature ->
    TopK -> TopP warpers); for tests."""
    z = logits_BxV.astype(jnp.float32) / jnp.where(temperature_B > 0, temperature_B, 1.0)[:, None]
    return jnp.where(keep_mask(z, top_k_B, top_p_B), z, -jnp.inf)

def repetition_penalty(logits_BxV, seen_BxV, penalty_B):
    """RepetitionPenaltyLogitsProcessor: a seen token's logit is divided by the penalty if > 0, else
    multiplied by it."""
    pen = penalty_B[:, None]
    return jnp.where(seen_BxV, jnp.where(logits_BxV < 0, logits_BxV * pen, logits_BxV / pen), logits_BxV)


def ngram_ban(hist_BxL, start_B, cur, n: int, V: int):
    """NoRepeatNGramLogitsProcessor on hist[b, start_b:cur_b] (the row's ids; left padding before start_b; cur a
    scalar or one per row): [B, V] bool of the ids that would complete an n-gram already in it."""
    B, L = hist_BxL.shape
    cur_B = jnp.broadcast_to(jnp.asarray(cur, jnp.int32), (B,))
    W = L - n + 1  # windows hist[i : i + n]
    i = jnp.arange(W)
    ok = (i[None, :] >= start_B[:, None]) & (i[None, :] + n <= cur_B[:, None])
    if n > 1:
        cols = jnp.maximum(cur_B - n + 1, 0)[:, None] + jnp.arange(n - 1)[None, :]
        prefix = jnp.take_along_axis(hist_BxL, jnp.minimum(cols, L - 1), axis=1)
        for j in range(n - 1):
            ok &= hist_BxL[:, j:j + W] == prefix[:, j:j + 1]
    banned_ids = jnp.where(ok, hist_BxL[:, n - 1:n - 1 + W], V)  # V: dropped
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], banned_ids.shape)
    return jnp.zeros((B, V), bool).at[rows, banned_ids].set(True, mode="drop")
