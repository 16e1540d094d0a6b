"""The SFT loss: token NLL of a batch, with the LM head and cross-entropy fused and chunked
(`fused_xent`: no [B, T, V] logits kept, and positions with weight 0 get no LM-head matmul)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from selfalign_jax.core import model as M


def token_nll(params: M.Params, cfg: M.Config, batch: dict, remat: bool = False, fused: bool = True,
              chunk_tokens: int = 512, streams: int = 1, grad_into=None, unroll: bool = False):
    """(sum over weighted positions of -log p(target), sum of weights) for one [b, T] batch.
    fused: the fused LM-head + cross-entropy (`fused_xent`, no [b, T, V] logits kept); else the
    plain `model.logits` + logsumexp (reference). streams: the model runs on that many independent
    row slices (the same sums; on CPU their ops overlap across cores, filling the idle time of one
    chain); the loss then runs once on all rows (its matmuls are large enough to use every core).
    grad_into (one stream, stacked layers): a gradient sum the layers' gradient is added into; unroll: the layer
    scan unrolled (`model.apply`)."""
    b = batch["tokens"].shape[0]
    if grad_into is not None and streams != 1:
        raise ValueError("grad_into runs one stream")
    rows = [slice(i * b // streams, (i + 1) * b // streams) for i in range(streams)]
    hs = [M.apply(params, cfg, batch["tokens"][r], batch["pos"][r], remat=remat, grad_into=grad_into,
                  unroll=unroll)[0] for r in rows]
    h = hs[0] if streams == 1 else jnp.concatenate(hs, axis=0)
    w = batch["weights"]
    if fused:
        w_VxE = params.embed if params.lm_head is None else params.lm_head
        nll = fused_xent(h, w_VxE.astype(h.dtype), batch["targets"], w, chunk_tokens, cfg.final_softcap)
        return nll, jnp.sum(w)
    lg = M.logits(params, cfg, h)  # fp32 [b, T, V]
    lse = jax.nn.logsumexp(lg, axis=-1)
    tgt = jnp.take_along_axis(lg, batch["targets"][..., None], axis=-1)[..., 0]
    return jnp.sum((lse - tgt) * w), jnp.sum(w)


def _divisor(n: int, at_most: int) -> int:
    """The largest divisor of n that is <= at_most (>= 1)."""
    d = max(1, min(n, at_most))
    while n % d:
        d -= 1
    return d


def _xent_chunks(h_BxTxE, w_VxE, targets_BxT, weights_BxT, chunk_tokens: int, softcap: float | None = None):
    """sum(weights * nll) and its gradients w.r.t. h and w, a chunk of positions at a time: logits
    [b*c, V] (fp32) exist for one chunk only; the gradient of the logits, (softmax - onehot) * w,
    is formed right away and multiplied into dh and dW (the loss is the step's only output, so the
    backward pass needs no logits).

    Only positions that carry loss are computed: each row's weighted positions are moved to its
    front (a stable sort along the row), and the loop stops after the longest row's count, in
    chunks of c positions and then a tail of c/8-position chunks. Prompt and padding positions
    cost no LM-head matmul (dh there is 0, as is their true gradient). The sort and the chunks
    run along the sequence, so the batch sharding stays. softcap: logits cap * tanh(logits / cap) (gemma2)."""
    B, T, E = h_BxTxE.shape
    V = w_VxE.shape[0]
    c = _divisor(T, chunk_tokens // max(B, 1))
    ct = _divisor(c, c // 8)
    order_BxT = jnp.argsort(weights_BxT == 0, axis=1, stable=True)  # weighted positions first
    h_s = jnp.take_along_axis(h_BxTxE, order_BxT[..., None], axis=1)
    t_s = jnp.take_along_axis(targets_BxT, order_BxT, axis=1)
    w_s = jnp.take_along_axis(weights_BxT.astype(jnp.float32), order_BxT, axis=1)
    live = jnp.max(jnp.sum(weights_BxT != 0, axis=1)).astype(jnp.int32)
    n_full = live // c
    n_tail = (live - n_full * c + ct - 1) // ct
    w_ExV = w_VxE.T  # one transpose per step: the logits matmul reads [E, V] in place

    def chunk(start, n, carry):
        dWt, dh_s, loss = carry
        h = jax.lax.dynamic_slice_in_dim(h_s, start, n, axis=1).reshape(B * n, E)
        t = jax.lax.dynamic_slice_in_dim(t_s, start, n, axis=1).reshape(B * n)
        w = jax.lax.dynamic_slice_in_dim(w_s, start, n, axis=1).reshape(B * n)
        lg = jnp.einsum("ne,ev->nv", h, w_ExV, preferred_element_type=jnp.float32)
        if softcap is not None:
            th = jnp.tanh(lg / softcap)
            lg = softcap * th
        m = jax.lax.stop_gradient(lg.max(-1, keepdims=True))
        e = jnp.exp(lg - m)
        s = e.sum(-1, keepdims=True)
        lse = jnp.log(s[:, 0]) + m[:, 0]
        hit = jax.lax.broadcasted_iota(jnp.int32, lg.shape, 1) == t[:, None]
        tgt = jnp.sum(jnp.where(hit, lg, 0.0), -1)
        loss = loss + jnp.sum(w * (lse - tgt))
        dlg = (e / s - hit.astype(jnp.float32)) * w[:, None]
        if softcap is not None:
            dlg = dlg * (1.0 - th * th)
        dlg = dlg.astype(h.dtype)
        dh = jnp.einsum("nv,ev->ne", dlg, w_ExV, preferred_element_type=jnp.float32)
        dh_s = jax.lax.dynamic_update_slice_in_dim(dh_s, dh.reshape(B, n, E), start, axis=1)
        dWt = dWt + jnp.einsum("nv,ne->ev", dlg, h, preferred_element_type=jnp.float32)
        return dWt, dh_s, loss

    carry = (jnp.zeros((E, V), jnp.float32), jnp.zeros((B, T, E), jnp.float32), jnp.zeros((), jnp.float32))
    carry = jax.lax.fori_loop(0, n_full, lambda i, cr: chunk(i * c, c, cr), carry)
    carry = jax.lax.fori_loop(0, n_tail, lambda i, cr: chunk(n_full * c + i * ct, ct, cr), carry)
    dWt, dh_s, loss = carry
    dh = jnp.take_along_axis(dh_s, jnp.argsort(order_BxT, axis=1)[..., None], axis=1)
    return loss, dh, dWt.T


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused_xent(h_BxTxE, w_VxE, targets_BxT, weights_BxT, chunk_tokens, softcap):
    return _xent_chunks(h_BxTxE, w_VxE, targets_BxT, weights_BxT, chunk_tokens, softcap)[0]


def _fused_fwd(h, w, t, wt, chunk_tokens, softcap):
    loss, dh, dW = _xent_chunks(h, w, t, wt, chunk_tokens, softcap)
    return loss, (dh.astype(h.dtype), dW.astype(w.dtype))


def _fused_bwd(chunk_tokens, softcap, res, g):
    dh, dW = res
    return g.astype(dh.dtype) * dh, g.astype(dW.dtype) * dW, None, None


_fused_xent.defvjp(_fused_fwd, _fused_bwd)


def fused_xent(h_BxTxE, w_VxE, targets_BxT, weights_BxT, chunk_tokens: int = 512, softcap: float | None = None):
    """sum over positions of weights * -log softmax(h @ w.T)[target] (logits soft-capped when
    softcap), differentiable in h and w, without materialising the [B, T, V] logits (LM head and
    cross-entropy fused, chunked)."""
    return _fused_xent(h_BxTxE, w_VxE, targets_BxT, weights_BxT, chunk_tokens, softcap)
