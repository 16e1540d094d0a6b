"""Log-likelihood of continuations under a loaded model (TruthfulQA MC, the pairwise judge)."""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from selfalign_jax.core import model as M
from selfalign_jax.core.buckets import run_padded
from selfalign_jax.app.evaluate.base import pad_id
from selfalign_jax.core.loaded import LoadedModel


def _cont_lp(params, cfg, tokens_BxT, valid_BxT, target_BxT):
    """Sum over target tokens of log p(token | tokens before it), and the number of target tokens."""
    logits = M.forward(params, cfg, tokens_BxT, M.positions(valid_BxT))[:, :-1]  # predicts tokens[1:]
    nxt = tokens_BxT[:, 1:]
    lp = jnp.take_along_axis(logits, nxt[..., None], -1)[..., 0] - jax.nn.logsumexp(logits, -1)
    m = target_BxT[:, 1:]
    return jnp.stack([jnp.where(m, lp, 0.0).sum(-1), m.sum(-1).astype(jnp.float32)], -1)


@functools.cache
def _cont_fn():
    return jax.jit(_cont_lp, static_argnums=1)


def _encode_pairs(tok, prompts, continuations, max_len: int):
    """(ids, target masks): prompt tokens (special tokens added) + continuation tokens, the latter
    taken from tokenizing prompt + continuation together when that keeps the prompt's tokens
    (else tokenized alone); too long: the prompt loses tokens from the left."""
    rows, masks = [], []
    ctx_all = tok(list(prompts), add_special_tokens=True)["input_ids"]
    whole_all = tok([p + c for p, c in zip(prompts, continuations)], add_special_tokens=True)["input_ids"]
    for p, c, ctx, whole in zip(prompts, continuations, ctx_all, whole_all):
        ctx, whole = list(ctx), list(whole)
        if whole[:len(ctx)] == ctx:
            cont = whole[len(ctx):]
        else:
            cont = list(tok(c, add_special_tokens=False)["input_ids"])
        cont = cont[:max_len - 1]
        ctx = ctx[max(0, len(ctx) + len(cont) - max_len):]
        rows.append(ctx + cont)
        masks.append([0] * len(ctx) + [1] * len(cont))
    return rows, masks


def continuation_logprobs(lm: LoadedModel, prompts: Sequence[str], continuations: Sequence[str],
                          batch_size: int = 8, max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(sum of log p over each continuation's tokens given its prompt [n] float64, token counts [n])."""
    if len(prompts) != len(continuations):
        raise ValueError("prompts and continuations differ in length")
    if not prompts:
        return np.zeros(0), np.zeros(0, np.int64)
    cfg, params, tok = lm.cfg, lm.params, lm.tokenizer
    rows, masks = _encode_pairs(tok, prompts, continuations, min(max_len or cfg.max_pos, cfg.max_pos))
    fn = _cont_fn()
    res = run_padded(rows, lambda t, v, m: fn(params, cfg, t, v, m), batch_size, pad_id(cfg, tok),
                       masks=masks)
    return res[:, 0].astype(np.float64), res[:, 1].astype(np.int64)
