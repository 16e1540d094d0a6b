"""The sampler's KV cache and where its arrays live: prompt / new-token length buckets, the placement of rows and
KV heads on a mesh, the chunked prefill that fills a cache, and host transfers.

    prompt_bucket(n): powers of two from 16 to 256, then multiples of 128; new_tokens_bucket(n): powers of two
    from 16. The prefill runs chunks of PREFILL_CHUNK tokens under a lax.scan (the remainder first): bounded
    working memory, and each chunk attends only to the cache slots filled so far (model._prefix_attention).
    Placement: rows over data x fsdp, KV heads over tensor when the tensor axis divides them (else
    replicated); parameters by `sharding_rules` (tensor parallel over whole heads and the MLP).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax.experimental import multihost_utils
import numpy as np

from selfalign_jax.core import mesh as MS
from selfalign_jax.core import model as M
from selfalign_jax.core.buckets import pow2

PREFILL_CHUNK = 256  # prompt tokens per prefill step (bounds the working memory)


def prompt_bucket(n: int) -> int:
    """Padded prompt length: powers of two from 16 to 256, then multiples of 128."""
    return max(16, pow2(n)) if n <= 256 else -(-n // 128) * 128


def new_tokens_bucket(n: int) -> int:
    return max(16, pow2(n))


def chunks(Tp: int) -> tuple[int, int]:
    """(first, C): a prefill of Tp tokens runs a first chunk of `first` tokens (0: none), then chunks of C."""
    C = min(Tp, PREFILL_CHUNK)
    return Tp % C, C



@dataclasses.dataclass(frozen=True)
class Placement:
    """Where the sampler's arrays live on a mesh: rows over data x fsdp, KV heads over tensor when the
    tensor axis divides them (else replicated). Hashable: a static argument of the jitted functions."""

    mesh: jax.sharding.Mesh
    kv: str | None  # mesh axis of the cache's KV-head dimension

    def spec(self, *axes) -> jax.sharding.NamedSharding:
        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(*axes))

    @property
    def rows(self) -> int:
        return MS.batch_size_multiple(self.mesh)


def sharding_rules(cfg: M.Config, mesh) -> M.ShardingRules:
    """The model's sharding rules for inference on `mesh`: tensor parallel over whole heads and the MLP; query
    / KV heads replicated when the tensor axis does not divide their count."""
    t = mesh.shape.get("tensor", 1)
    return M.ShardingRules(q_heads="tensor" if cfg.n_heads % t == 0 else None,
                           kv_heads="tensor" if cfg.n_kv_heads % t == 0 else None)


def placement(cfg: M.Config, mesh) -> Placement | None:
    if mesh is None:
        return None
    t = mesh.shape.get("tensor", 1)
    return Placement(mesh, "tensor" if t > 1 and cfg.n_kv_heads % t == 0 else None)


def place_params(params: M.Params, cfg: M.Config, mesh) -> M.Params:
    """Parameters placed on `mesh` by `sharding_rules` (a no-op for arrays already placed so)."""
    return jax.device_put(params, M.param_shardings(cfg, mesh, sharding_rules(cfg, mesh)))


def constrain_cache(cache: M.Cache, pl: Placement | None) -> M.Cache:
    if pl is None:
        return cache
    kv = pl.spec(MS.BATCH, pl.kv)
    wsc = jax.lax.with_sharding_constraint
    return M.Cache(k=[wsc(x, kv) for x in cache.k], v=[wsc(x, kv) for x in cache.v],
                   pos_BxS=wsc(cache.pos_BxS, pl.spec(MS.BATCH)), end=wsc(cache.end, pl.spec()))


def host(tree):
    """jax.device_get that also works on arrays spanning other processes' devices (multi-host): a
    replicated array is read from a local shard, a sharded one gathered from every process."""
    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(jax.device_get(x))
        if x.is_fully_replicated:
            return np.asarray(x.addressable_shards[0].data)
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.tree.map(one, tree)


def to_rows(x, pl: Placement | None):
    """A host array with a leading batch dim onto the mesh rows (as is without a mesh)."""
    return x if pl is None else MS.put(np.asarray(x), pl.spec(MS.BATCH))


def prefill_cache(params, cfg: M.Config, tokens_BxT, pos_BxT, cache: M.Cache) -> M.Cache:
    """Tokens into the cache in chunks of PREFILL_CHUNK (a lax.scan; the remainder first): bounded working
    memory, and each chunk attends to the slots filled so far only."""
    B, T = tokens_BxT.shape
    first, C = chunks(T)
    if first:
        cache = M.apply(params, cfg, tokens_BxT[:, :first], pos_BxT[:, :first], cache)[1]
        tokens_BxT, pos_BxT, T = tokens_BxT[:, first:], pos_BxT[:, first:], T - first
    if C == T:
        return M.apply(params, cfg, tokens_BxT, pos_BxT, cache)[1]

    def body(cache, xs):
        return M.apply(params, cfg, xs[0], xs[1], cache)[1], None

    split = lambda a: a.reshape(B, T // C, C).transpose(1, 0, 2)  # noqa: E731
    return jax.lax.scan(body, cache, (split(tokens_BxT), split(pos_BxT)))[0]


@functools.partial(jax.jit, static_argnames=("cfg", "B", "S", "place"))
def init_cache(*, cfg: M.Config, B: int, S: int, place: Placement | None) -> M.Cache:
    return constrain_cache(M.init_cache(cfg, B, S), place)
