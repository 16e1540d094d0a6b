"""LoRA adapters on the attention (q, k, v, o) and MLP (gate, up, down) projections.

For a base weight W[out, in] the adapter is A[r, in] (uniform +-1/sqrt(in), as PEFT) and B[out, r]
(zeros), and the effective weight is W + (alpha / r) * B @ A. The trainer computes the effective
weights inside the loss before `model.apply` (the base stays frozen, only A and B are trained) and
`merge` folds them in for export, so the merged model computes the same function.

Adapters are a plain pytree: one dict per layer, {projection name: {'a': A, 'b': B}}.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from selfalign_jax.core import model as M
from selfalign_jax.core.settings import LORA_TARGETS

TARGETS = LORA_TARGETS


def lora_specs(cfg: M.Config, rank: int, targets=TARGETS) -> list[dict]:
    """Spec of every adapter array: A keeps W's `in` axis, B its `out` axis (for sharding)."""
    if rank < 1:
        raise ValueError("LoRA rank must be >= 1")
    out = []
    for ls in M.param_specs(cfg).layers:
        d = {}
        for name in targets:
            s = getattr(ls, name)
            if s is None:
                continue
            (o, i), (ao, ai) = s.shape, s.axes
            d[name] = {"a": M.Spec((rank, i), (None, ai), "lora_a"), "b": M.Spec((o, rank), (ao, None), "zeros")}
        out.append(d)
    return out


def init_lora(cfg: M.Config, key, rank: int, targets=TARGETS, dtype=jnp.float32) -> list[dict]:
    specs = lora_specs(cfg, rank, targets)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=M.is_spec)
    keys = jax.random.split(key, len(leaves))

    def make(s, k):
        if s.init == "zeros":
            return jnp.zeros(s.shape, dtype)
        bound = 1.0 / (s.shape[1] ** 0.5)
        return jax.random.uniform(k, s.shape, jnp.float32, -bound, bound).astype(dtype)

    return jax.tree.unflatten(treedef, [make(s, k) for s, k in zip(leaves, keys)])


def lora_shardings(cfg: M.Config, mesh, rank: int, targets=TARGETS, rules=M.ShardingRules()):
    return jax.tree.map(
        lambda s: jax.sharding.NamedSharding(mesh, M.logical_to_pspec(s.axes, s.shape, mesh, rules)),
        lora_specs(cfg, rank, targets), is_leaf=M.is_spec)


def merge(params: M.Params, adapters: list[dict], scale: float, dtype=None) -> M.Params:
    """params with W + scale * B @ A for every adapted projection (computed in fp32, cast to
    `dtype`, default W's dtype). Differentiable in both arguments; jit-friendly."""
    layers = []
    for lp, ad in zip(params.layers, adapters):
        upd = {}
        for name, ab in ad.items():
            w = getattr(lp, name)
            delta = jnp.einsum("or,ri->oi", ab["b"].astype(jnp.float32), ab["a"].astype(jnp.float32))
            upd[name] = (w.astype(jnp.float32) + scale * delta).astype(dtype or w.dtype)
        layers.append(M.Layer(**{**vars(lp), **upd}))
    return M.Params(**{**vars(params), "layers": layers})
