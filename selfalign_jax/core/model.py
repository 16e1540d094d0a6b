"""One functional decoder for Hugging Face llama / mistral / qwen2 / qwen3 / gemma / gemma2 / gemma3_text / opt
checkpoints.

Parameters are a pytree of registered dataclasses holding the HF tensors as they are stored
(`[out, in]` linear weights, one `Layer` per decoder layer), so loading and exporting move no data.
Every array has a `Spec` (shape, logical axes) so that `shardings()` can place it on a mesh. The train step
holds the layers stacked instead (`stack_layers`: one `Layer` of [L, ...] arrays), which `apply` runs as one
`lax.scan`; the KV-cache path (sampling) runs the per-layer list.

Dimension letters: B batch, T query length, S key length (cache slots), D hidden, E embedding
(OPT's word_embed_proj_dim, else D), V vocab, N query heads, K kv heads, G = N / K, H head dim,
F mlp width, P learned positions.

Padding convention: `pos_BxT` holds each token's position, -1 at padding. Attention lets query q see
key s when `0 <= pos[s] <= pos[q]` (and `pos[q] - pos[s] < window` with a sliding window), which is
causal + padding mask in one rule, for the full forward and for the KV cache alike. In the full forward
a row may hold several sequences (packed SFT batches): each starts at position 0, and a query sees only
keys of its own sequence (sequence ids = running count of position-0 tokens along the row).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "opt")


# ----------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class Config:
    family: str
    vocab_size: int
    hidden: int  # D
    n_layers: int
    n_heads: int  # N
    n_kv_heads: int  # K
    head_dim: int  # H
    intermediate: int  # F
    max_pos: int
    norm: str = "rms"  # rms | rms1p (gemma: x * (1 + w)) | layernorm
    norm_eps: float = 1e-6
    act: str = "silu"  # silu | gelu_tanh | gelu | relu
    glu: bool = True  # gate/up/down (llama) vs fc1/fc2 (opt)
    rope_theta: float | None = 10000.0  # None: learned positions (opt)
    rope_type: str = "default"  # default | linear | llama3
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_pos: int = 8192
    local_rope_theta: float | None = None  # gemma3: RoPE base of the sliding-window layers (None: as global)
    local_rope_type: str = "default"  # default | linear
    local_rope_factor: float = 1.0
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    windows: tuple[int | None, ...] = ()  # per layer sliding window (None: full attention)
    emb_scale: bool = False  # gemma: embeddings * sqrt(D)
    qk_norm: bool = False  # qwen3 / gemma3: a norm (cfg.norm) over each head's q and k, before RoPE
    sandwich_norm: bool = False  # gemma2 / gemma3: norms on the attention and MLP outputs too
    query_pre_attn_scalar: float | None = None  # gemma2 / gemma3: scores scaled by this ** -0.5 (else H ** -0.5)
    attn_softcap: float | None = None  # gemma2: scores -> cap * tanh(scores / cap)
    final_softcap: float | None = None  # gemma2: logits -> cap * tanh(logits / cap)
    tied: bool = False
    pre_norm: bool = True  # opt do_layer_norm_before
    final_norm: bool = True
    embed_dim: int | None = None  # E when != D (opt project_in / project_out)
    pos_offset: int = 0  # opt: 2
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    pad_id: int | None = None
    dtype: str = "float32"  # compute and parameter dtype

    @property
    def E(self) -> int:
        return self.embed_dim or self.hidden

    @property
    def jdtype(self):
        return jnp.dtype(self.dtype)

    def window(self, i: int) -> int | None:
        return self.windows[i] if self.windows else None

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5


# ------------------------------------------------------------------------------------- parameters
@dataclasses.dataclass(frozen=True)
class Spec:
    """One parameter array: shape, logical axis names, init ('normal', 'zeros', 'ones')."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: str = "normal"


def _pytree(cls):
    fields = [f.name for f in dataclasses.fields(cls)]
    return jax.tree_util.register_dataclass(cls, data_fields=fields, meta_fields=[])


@_pytree
@dataclasses.dataclass
class Layer:
    attn_norm: Any
    attn_norm_b: Any
    q_norm: Any  # [H] (qk_norm)
    k_norm: Any  # [H] (qk_norm)
    post_attn_norm: Any  # [D] (sandwich_norm)
    q: Any  # [N*H, D]
    k: Any  # [K*H, D]
    v: Any  # [K*H, D]
    o: Any  # [D, N*H]
    q_b: Any
    k_b: Any
    v_b: Any
    o_b: Any
    mlp_norm: Any
    mlp_norm_b: Any
    gate: Any  # [F, D] (glu only)
    up: Any  # [F, D]   (opt fc1)
    down: Any  # [D, F] (opt fc2)
    up_b: Any
    down_b: Any
    post_mlp_norm: Any  # [D] (sandwich_norm)


@_pytree
@dataclasses.dataclass
class Params:
    embed: Any  # [V, E]
    pos_embed: Any  # [P, D] (opt)
    proj_in: Any  # [D, E] (opt)
    proj_out: Any  # [E, D] (opt)
    layers: Any  # list[Layer]; or one Layer of [L, ...] arrays (`stack_layers`)
    final_norm: Any
    final_norm_b: Any
    lm_head: Any  # [V, E], None when tied


def param_specs(cfg: Config) -> Params:
    """The Spec of every parameter (None where the family has no such array)."""
    D, E, F, H = cfg.hidden, cfg.E, cfg.intermediate, cfg.head_dim
    NH, KH = cfg.n_heads * H, cfg.n_kv_heads * H
    ln = cfg.norm == "layernorm"
    one = "zeros" if cfg.norm == "rms1p" else "ones"

    def norm():
        return Spec((D,), ("embed",), one), (Spec((D,), ("embed",), "zeros") if ln else None)

    def bias(n, axis, on):
        return Spec((n,), (axis,), "zeros") if on else None

    def opt_norm(n, on, axis):
        return Spec((n,), (axis,), one) if on else None

    layers = []
    for _ in range(cfg.n_layers):
        an, anb = norm()
        mn, mnb = norm()
        layers.append(Layer(
            attn_norm=an, attn_norm_b=anb,
            q_norm=opt_norm(H, cfg.qk_norm, None), k_norm=opt_norm(H, cfg.qk_norm, None),
            post_attn_norm=opt_norm(D, cfg.sandwich_norm, "embed"),
            q=Spec((NH, D), ("q_heads", "embed")),
            k=Spec((KH, D), ("kv_heads", "embed")),
            v=Spec((KH, D), ("kv_heads", "embed")),
            o=Spec((D, NH), ("embed", "q_heads")),
            q_b=bias(NH, "q_heads", cfg.qkv_bias), k_b=bias(KH, "kv_heads", cfg.qkv_bias),
            v_b=bias(KH, "kv_heads", cfg.qkv_bias), o_b=bias(D, "embed", cfg.o_bias),
            mlp_norm=mn, mlp_norm_b=mnb,
            gate=Spec((F, D), ("mlp", "embed")) if cfg.glu else None,
            up=Spec((F, D), ("mlp", "embed")),
            down=Spec((D, F), ("embed", "mlp")),
            up_b=bias(F, "mlp", cfg.mlp_bias), down_b=bias(D, "embed", cfg.mlp_bias),
            post_mlp_norm=opt_norm(D, cfg.sandwich_norm, "embed"),
        ))
    fn, fnb = norm() if cfg.final_norm else (None, None)
    proj = cfg.embed_dim is not None and cfg.embed_dim != D
    return Params(
        embed=Spec((cfg.vocab_size, E), ("vocab", "embed")),
        pos_embed=Spec((cfg.max_pos + cfg.pos_offset, D), (None, "embed")) if cfg.rope_theta is None else None,
        proj_in=Spec((D, E), ("embed", None)) if proj else None,
        proj_out=Spec((E, D), (None, "embed")) if proj else None,
        layers=layers,
        final_norm=fn, final_norm_b=fnb,
        lm_head=None if cfg.tied else Spec((cfg.vocab_size, E), ("vocab", "embed")),
    )


def stack_layers(params: Params) -> Params:
    """The same parameters with the layers as one Layer of [L, ...] arrays, the form `apply` scans over (the
    train step's); jit it to place the copy."""
    if isinstance(params.layers, Layer):
        return params
    return dataclasses.replace(params, layers=jax.tree.map(lambda *xs: jnp.stack(xs), *params.layers))


def unstack_layers(params: Params) -> Params:
    """Per-layer parameters (a list of Layer, the form the KV cache, loading and export use) from stacked ones."""
    if not isinstance(params.layers, Layer):
        return params
    n = jax.tree.leaves(params.layers)[0].shape[0]
    return dataclasses.replace(params, layers=[jax.tree.map(lambda a, i=i: a[i], params.layers) for i in range(n)])


def stack_specs(specs: Params) -> Params:
    """The Specs of `stack_layers(params)`: each layer array gains a leading 'layers' axis."""
    if isinstance(specs.layers, Layer):
        return specs
    one = specs.layers[0]
    return dataclasses.replace(specs, layers=jax.tree.map(
        lambda s: Spec((len(specs.layers),) + s.shape, ("layers",) + s.axes, s.init), one, is_leaf=is_spec))


def is_spec(x) -> bool:
    return isinstance(x, Spec)


def init_params(cfg: Config, key: Array, std: float = 0.02) -> Params:
    """Random parameters (normal(std) weights, ones/zeros norms and biases), in cfg.dtype."""
    specs = param_specs(cfg)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    keys = jax.random.split(key, len(leaves))

    def make(s: Spec, k):
        if s.init == "zeros":
            return jnp.zeros(s.shape, cfg.jdtype)
        if s.init == "ones":
            return jnp.ones(s.shape, cfg.jdtype)
        return (std * jax.random.normal(k, s.shape, jnp.float32)).astype(cfg.jdtype)

    return jax.tree.unflatten(treedef, [make(s, k) for s, k in zip(leaves, keys)])


def num_params(params: Params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


# --------------------------------------------------------------------------------------- sharding
@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)."""

    vocab: Any = "tensor"
    embed: Any = "fsdp"
    q_heads: Any = "tensor"
    kv_heads: Any = "tensor"
    mlp: Any = "tensor"
    batch: Any = ("data", "fsdp")
    layers: Any = None  # the leading axis of stacked layers (`stack_layers`)


def logical_to_pspec(axes, shape, mesh, rules: ShardingRules) -> jax.sharding.PartitionSpec:
    """PartitionSpec for one array; an axis whose size the mesh axes do not divide stays replicated."""
    out = []
    for name, n in zip(axes, shape):
        m = getattr(rules, name) if name else None
        if m is not None:
            names = m if isinstance(m, tuple) else (m,)
            names = tuple(a for a in names if a in mesh.shape)
            size = math.prod(mesh.shape[a] for a in names)
            m = (names if len(names) > 1 else names[0]) if names and n % size == 0 else None
        out.append(m)
    return jax.sharding.PartitionSpec(*out)


def param_shardings(cfg: Config, mesh, rules: ShardingRules = ShardingRules(), stacked: bool = False) -> Params:
    """A NamedSharding for every parameter (same tree as Params; as `stack_layers` makes it when stacked)."""
    specs = stack_specs(param_specs(cfg)) if stacked else param_specs(cfg)
    return jax.tree.map(
        lambda s: jax.sharding.NamedSharding(mesh, logical_to_pspec(s.axes, s.shape, mesh, rules)), specs,
        is_leaf=is_spec)


# ------------------------------------------------------------------------------------------ layers
def _norm(cfg: Config, x, w, b):
    """Norm statistics in fp32; result cast back to the compute dtype."""
    x32 = x.astype(jnp.float32)
    if cfg.norm == "layernorm":
        mu = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mu).mean(-1, keepdims=True)
        y = (x32 - mu) * jax.lax.rsqrt(var + cfg.norm_eps) * w.astype(jnp.float32) + b.astype(jnp.float32)
        return y.astype(x.dtype)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + cfg.norm_eps)
    if cfg.norm == "rms1p":  # gemma: scale by (1 + w) in fp32
        return (y * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
    return w * y.astype(x.dtype)  # llama: cast, then scale


def _act(cfg: Config, x):
    if cfg.act == "silu":
        return jax.nn.silu(x)
    if cfg.act == "relu":
        return jax.nn.relu(x)
    return jax.nn.gelu(x, approximate=cfg.act == "gelu_tanh")


@_pytree
@dataclasses.dataclass
class InOut:
    """A linear weight stored transposed, [in, out] (see `inference_layout`)."""

    w: Any


def _linear(x, w, b=None):
    """x[..., in] @ w[out, in].T (+ b); w may be an InOut ([in, out]).
    As one 2-D matmul over the flattened leading dims (a free reshape): XLA:CPU then computes the
    weight gradient x[n, in]^T @ dy[n, out] with no transposed copy of either operand (with two
    contracting dims it transposes one; measured: an MLP's train step 25% slower)."""
    x_NxI = x.reshape(-1, x.shape[-1])
    if isinstance(w, InOut):
        y_NxO = jnp.einsum("ni,io->no", x_NxI, w.w)
    else:
        y_NxO = jnp.einsum("ni,oi->no", x_NxI, w)
    y = y_NxO.reshape(*x.shape[:-1], y_NxO.shape[-1])
    return y if b is None else y + b


_LINEAR_FIELDS = ("q", "k", "v", "o", "gate", "up", "down")
_to_in_out = jax.jit(lambda w: InOut(w.T))


def inference_layout(params: Params) -> Params:
    """The same model with every matmul weight (and the LM head, also when tied) as InOut [in, out].
    On XLA:CPU a small-batch matmul x[M, in] @ w[in, out] runs about 20% faster than against the
    HF [out, in] layout (the weight panels need no transposing pack), which is what decoding is made
    of. A transient copy of the weights (the embedding stays shared); apply/logits accept either."""
    def conv(w):
        return None if w is None else (w if isinstance(w, InOut) else _to_in_out(w))

    layers = [dataclasses.replace(lp, **{f: conv(getattr(lp, f)) for f in _LINEAR_FIELDS}) for lp in params.layers]
    head = params.lm_head if params.lm_head is not None else params.embed
    return dataclasses.replace(params, layers=layers, proj_in=conv(params.proj_in),
                               proj_out=conv(params.proj_out), lm_head=conv(head))


def inv_freq(cfg: Config, i: int | None = None) -> np.ndarray:
    """RoPE inverse frequencies (fp32) for rope types default, linear and llama3; for layer i's
    own base when it is a sliding-window layer and cfg has a local RoPE (gemma3)."""
    H = cfg.head_dim
    if i is not None and cfg.local_rope_theta is not None and cfg.window(i) is not None:
        f = 1.0 / (cfg.local_rope_theta ** (np.arange(0, H, 2, dtype=np.float64) / H))
        return (f / cfg.local_rope_factor if cfg.local_rope_type == "linear" else f).astype(np.float32)
    f = 1.0 / (cfg.rope_theta ** (np.arange(0, H, 2, dtype=np.float64) / H))
    if cfg.rope_type == "linear":
        f = f / cfg.rope_factor
    elif cfg.rope_type == "llama3":
        lo = cfg.rope_original_max_pos / cfg.rope_low_freq_factor
        hi = cfg.rope_original_max_pos / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / f
        smooth = (cfg.rope_original_max_pos / wavelen - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        mid = (1 - smooth) * f / cfg.rope_factor + smooth * f
        f = np.where(wavelen > lo, f / cfg.rope_factor, np.where(wavelen < hi, f, mid))
    return f.astype(np.float32)


def rope(x_BxTxNxH, pos_BxT, freqs_h):
    """HF rotate-half RoPE with inverse frequencies freqs_h [H/2] (`inv_freq`); angles in fp32."""
    ang_BxTxh = pos_BxT.astype(jnp.float32)[..., None] * jnp.asarray(freqs_h)
    ang = jnp.concatenate([ang_BxTxh, ang_BxTxh], -1)[:, :, None, :]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    x = x_BxTxNxH.astype(jnp.float32)
    h = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., h:], x[..., :h]], -1)
    return (x * cos + rot * sin).astype(x_BxTxNxH.dtype)


@_pytree
@dataclasses.dataclass
class Cache:
    """KV cache: per-layer keys/values in slots [0, S); `pos_BxS` is -1 for empty or padded slots;
    the next call writes its T tokens at slots [end, end + T). A call with T > 1 (a prefill chunk)
    attends to slots [0, end + T) only: prefills fill a cache from slot 0 up (only single-token decode
    steps may run a ring over all S slots).

    Layouts: keys [B, K, H, S], values [B, K, S, H] (kv heads before slots, keys transposed): per (row,
    kv head) the scores are q[G*T, H] @ k[H, S] and the output p[G*T, S] @ v[S, H], two plain matmuls
    that read the cache in place (no per-step transpose or copy of the cache); a step's write is one
    in-place dynamic_update_slice per array."""

    k: list  # per layer [B, K, H, S]
    v: list  # per layer [B, K, S, H]
    pos_BxS: Array
    end: Array  # int32 scalar


def init_cache(cfg: Config, batch: int, size: int, dtype=None) -> Cache:
    dt = jnp.dtype(dtype or cfg.dtype)
    kshape = (batch, cfg.n_kv_heads, cfg.head_dim, size)
    vshape = (batch, cfg.n_kv_heads, size, cfg.head_dim)
    return Cache(
        k=[jnp.zeros(kshape, dt) for _ in range(cfg.n_layers)],
        v=[jnp.zeros(vshape, dt) for _ in range(cfg.n_layers)],
        pos_BxS=jnp.full((batch, size), -1, jnp.int32),
        end=jnp.zeros((), jnp.int32),
    )


def cache_row_bytes(cfg: Config, size: int, dtype=None, kv_heads: int | None = None) -> int:
    """Bytes of one row of `init_cache(cfg, batch, size, dtype)`: keys and values of every layer (`kv_heads`
    of them: the heads one device holds), and its slot positions."""
    K = cfg.n_kv_heads if kv_heads is None else kv_heads
    return 2 * cfg.n_layers * K * cfg.head_dim * size * jnp.dtype(dtype or cfg.dtype).itemsize + 4 * size


@dataclasses.dataclass(frozen=True)
class LayerConsts:
    """What tells one layer from another besides its weights: its sliding window (None: full attention; an
    int, or a traced int32 inside the layer scan) and its RoPE inverse frequencies [H/2] (None without RoPE)."""

    window: Any
    freqs: Any


def layer_consts(cfg: Config, i: int) -> LayerConsts:
    return LayerConsts(cfg.window(i), inv_freq(cfg, i) if cfg.rope_theta is not None else None)


def _mask(lc: LayerConsts, qpos, kpos):
    """True where a query at qpos may see a key at kpos (broadcasting)."""
    ok = (kpos >= 0) & (kpos <= qpos)
    if lc.window is not None:
        ok &= qpos - kpos < lc.window
    return ok


def _softcap(x, cap):
    return x if cap is None else cap * jnp.tanh(x / cap)


def _masked_softmax(s, ok, dtype):
    """Softmax over the last axis of fp32 scores where `ok` (masked entries get exactly 0), cast to dtype."""
    return jax.nn.softmax(jnp.where(ok, s, jnp.finfo(jnp.float32).min), axis=-1).astype(dtype)


QUERY_BLOCK = 64


def _causal_attention(cfg: Config, lc: LayerConsts, q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, pos_BxT):
    """Attention of a whole sequence to itself (no cache), in blocks of QUERY_BLOCK queries: block
    [a, e) sees keys [0, e) only (positions rise along the row, so later keys are masked anyway):
    the upper triangle is never computed, and each block's [B, K, G*c, e] scores fit the cache.
    Heads are grouped as [B, K, G*c, H] x [B, K, e, H]: every matmul reads its operands in place.
    Queries, keys and values are split into blocks (not sliced), so their gradients are
    concatenations and sums of blocks, not sums of zero-padded copies. Measured on XLA:CPU, one
    layer's forward + backward at 2 x 512 tokens: 3x faster than one [B, K, G, T, S] einsum.
    Returns o_BxKxGxTxH. Rows with no visible key (padding) are junk."""
    B, T, N, H = q_BxTxNxH.shape
    K = k_BxSxKxH.shape[2]
    G = N // K
    cuts = list(range(QUERY_BLOCK, T, QUERY_BLOCK))
    qs = jnp.split(q_BxTxNxH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4), cuts, axis=3)
    ks = jnp.split(k_BxSxKxH.transpose(0, 2, 1, 3), cuts, axis=2)
    vs = jnp.split(v_BxSxKxH.transpose(0, 2, 1, 3), cuts, axis=2)
    ps = jnp.split(pos_BxT, cuts, axis=1)
    seqs = jnp.split(jnp.cumsum(pos_BxT == 0, axis=1, dtype=jnp.int32), cuts, axis=1)  # packed rows
    outs = []
    for j, q_BxKxGxCxH in enumerate(qs):
        c = q_BxKxGxCxH.shape[3]
        k_BxKxExH = jnp.concatenate(ks[:j + 1], axis=2)
        v_BxKxExH = jnp.concatenate(vs[:j + 1], axis=2)
        kpos_BxE = jnp.concatenate(ps[:j + 1], axis=1)
        s = jnp.einsum("bkqh,bksh->bkqs", q_BxKxGxCxH.reshape(B, K, G * c, H), k_BxKxExH,
                       preferred_element_type=jnp.float32) * cfg.attn_scale
        s = _softcap(s, cfg.attn_softcap)
        qpos = jnp.broadcast_to(ps[j][:, None], (B, G, c)).reshape(B, 1, G * c, 1)
        ok = _mask(lc, qpos, kpos_BxE[:, None, None, :])
        qseq = jnp.broadcast_to(seqs[j][:, None], (B, G, c)).reshape(B, 1, G * c, 1)
        ok &= qseq == jnp.concatenate(seqs[:j + 1], axis=1)[:, None, None, :]
        p = _masked_softmax(s, ok, q_BxTxNxH.dtype)
        o = jnp.einsum("bkqs,bksh->bkqh", p, v_BxKxExH)
        outs.append(o.reshape(B, K, G, c, H))
    return jnp.concatenate(outs, axis=3)


KEY_BLOCK = 128


def _prefix_attention(cfg: Config, lc: LayerConsts, q_BxKxQxH, k_BxKxHxS, v_BxKxSxH, qpos, kpos_BxS, filled):
    """A prefill chunk's attention to cache slots [0, filled) only (`filled` is traced), in blocks of
    KEY_BLOCK keys under a lax.fori_loop with a running softmax (max, sum and output rescaled per block):
    the chunk computes no scores against the empty rest of the cache, so a chunked prefill does about half
    the attention work of attending to every slot, with one compiled body. Returns o_BxKxQxH; rows with no
    visible key (padding) get zeros."""
    B, K, Q, H = q_BxKxQxH.shape
    S = k_BxKxHxS.shape[3]
    Cb = min(KEY_BLOCK, S)
    q = q_BxKxQxH

    def body(b, carry):
        m_BxKxQ, l_BxKxQ, acc_BxKxQxH = carry
        start = jnp.minimum(b * Cb, S - Cb)  # the last block may overlap the one before it: masked below
        k_BxKxHxC = jax.lax.dynamic_slice_in_dim(k_BxKxHxS, start, Cb, axis=3).astype(q.dtype)
        v_BxKxCxH = jax.lax.dynamic_slice_in_dim(v_BxKxSxH, start, Cb, axis=2).astype(q.dtype)
        kpos_BxC = jax.lax.dynamic_slice_in_dim(kpos_BxS, start, Cb, axis=1)
        s = jnp.einsum("bkqh,bkhc->bkqc", q, k_BxKxHxC, preferred_element_type=jnp.float32) * cfg.attn_scale
        s = _softcap(s, cfg.attn_softcap)
        ok = _mask(lc, qpos, kpos_BxC[:, None, None, :]) & (start + jnp.arange(Cb) >= b * Cb)
        s = jnp.where(ok, s, jnp.finfo(jnp.float32).min)
        m_new = jnp.maximum(m_BxKxQ, s.max(-1))
        p = jnp.where(ok, jnp.exp(s - m_new[..., None]), 0.0)
        scale = jnp.exp(m_BxKxQ - m_new)
        pv = jnp.einsum("bkqc,bkch->bkqh", p.astype(q.dtype), v_BxKxCxH, preferred_element_type=jnp.float32)
        return m_new, l_BxKxQ * scale + p.sum(-1), acc_BxKxQxH * scale[..., None] + pv

    init = (jnp.full((B, K, Q), jnp.finfo(jnp.float32).min), jnp.zeros((B, K, Q), jnp.float32),
            jnp.zeros((B, K, Q, H), jnp.float32))
    _, l_BxKxQ, acc = jax.lax.fori_loop(0, (filled + Cb - 1) // Cb, body, init)
    return (acc / jnp.maximum(l_BxKxQ, jnp.finfo(jnp.float32).tiny)[..., None]).astype(q.dtype)


def attention(cfg: Config, lc: LayerConsts, lp: Layer, x_BxTxD, pos_BxT, kv=None):
    """Self-attention of one layer (`lc`: its window and RoPE frequencies). `kv` = (k_BxKxHxS, v_BxKxSxH,
    pos_BxS, end) to use a cache; returns (out_BxTxD, (k, v)) where (k, v) are the updated cache arrays (or this
    block's keys)."""
    B, T, _ = x_BxTxD.shape
    N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    G = N // K
    q = _linear(x_BxTxD, lp.q, lp.q_b).reshape(B, T, N, H)
    k = _linear(x_BxTxD, lp.k, lp.k_b).reshape(B, T, K, H)
    v = _linear(x_BxTxD, lp.v, lp.v_b).reshape(B, T, K, H)
    if cfg.qk_norm:
        q, k = _norm(cfg, q, lp.q_norm, None), _norm(cfg, k, lp.k_norm, None)
    if cfg.rope_theta is not None:
        q, k = rope(q, pos_BxT, lc.freqs), rope(k, pos_BxT, lc.freqs)
    if kv is None:
        o_BxKxGxTxH = _causal_attention(cfg, lc, q, k, v, pos_BxT)
        out = _linear(o_BxKxGxTxH.transpose(0, 3, 1, 2, 4).reshape(B, T, N * H), lp.o, lp.o_b)
        return out, (k, v)
    ck, cv, kpos_BxS, end = kv
    # new keys/values into the cache (the transposes touch only the T new tokens)
    k_BxKxHxS = jax.lax.dynamic_update_slice(ck, k.transpose(0, 2, 3, 1).astype(ck.dtype), (0, 0, 0, end))
    v_BxKxSxH = jax.lax.dynamic_update_slice(cv, v.transpose(0, 2, 1, 3).astype(cv.dtype), (0, 0, end, 0))
    # queries as [B, K, G*T, H]: per (row, kv head) one [G*T, H] x [S, H]^T matmul
    q_BxKxGTxH = q.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
    qpos = jnp.broadcast_to(pos_BxT[:, None, :], (B, G, T)).reshape(B, 1, G * T, 1)
    if T > 1:
        o = _prefix_attention(cfg, lc, q_BxKxGTxH, k_BxKxHxS, v_BxKxSxH, qpos, kpos_BxS, end + T)
    else:
        s = jnp.einsum("bkqh,bkhs->bkqs", q_BxKxGTxH, k_BxKxHxS.astype(q.dtype),
                       preferred_element_type=jnp.float32) * cfg.attn_scale
        s = _softcap(s, cfg.attn_softcap)
        ok = _mask(lc, qpos, kpos_BxS[:, None, None, :])
        p = _masked_softmax(s, ok, q.dtype)
        o = jnp.einsum("bkqs,bksh->bkqh", p, v_BxKxSxH.astype(q.dtype))  # [B, K, G*T, H]
    o_BxTxNH = o.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N * H)
    return _linear(o_BxTxNH, lp.o, lp.o_b), (k_BxKxHxS, v_BxKxSxH)


def mlp(cfg: Config, lp: Layer, x_BxTxD):
    if cfg.glu:
        h_BxTxF = _act(cfg, _linear(x_BxTxD, lp.gate)) * _linear(x_BxTxD, lp.up)
    else:
        h_BxTxF = _act(cfg, _linear(x_BxTxD, lp.up, lp.up_b))
    return _linear(h_BxTxF, lp.down, lp.down_b)


def block(cfg: Config, lc: LayerConsts, lp: Layer, x_BxTxD, pos_BxT, kv=None):
    """One decoder layer (pre-norm, with gemma2/3's extra norms on the attention and MLP outputs when
    cfg.sandwich_norm, or OPT's post-norm when cfg.pre_norm is False)."""
    if cfg.pre_norm:
        a, kv_out = attention(cfg, lc, lp, _norm(cfg, x_BxTxD, lp.attn_norm, lp.attn_norm_b), pos_BxT, kv)
        if cfg.sandwich_norm:
            a = _norm(cfg, a, lp.post_attn_norm, None)
        x = x_BxTxD + a
        m = mlp(cfg, lp, _norm(cfg, x, lp.mlp_norm, lp.mlp_norm_b))
        if cfg.sandwich_norm:
            m = _norm(cfg, m, lp.post_mlp_norm, None)
        return x + m, kv_out
    a, kv_out = attention(cfg, lc, lp, x_BxTxD, pos_BxT, kv)
    x = _norm(cfg, x_BxTxD + a, lp.attn_norm, lp.attn_norm_b)
    x = _norm(cfg, x + mlp(cfg, lp, x), lp.mlp_norm, lp.mlp_norm_b)
    return x, kv_out


# ----------------------------------------------------------------------------------------- forward
def positions(valid_BxT) -> Array:
    """Per-row positions of a left- (or right-) padded batch: 0, 1, ... over valid tokens, -1 at padding."""
    valid = jnp.asarray(valid_BxT).astype(jnp.int32)
    return jnp.where(valid > 0, jnp.cumsum(valid, axis=-1) - 1, -1).astype(jnp.int32)


def embed(params: Params, cfg: Config, tokens_BxT, pos_BxT):
    x = params.embed[tokens_BxT].astype(cfg.jdtype)
    if params.proj_in is not None:
        x = _linear(x, params.proj_in)
    if cfg.emb_scale:
        x = x * jnp.asarray(math.sqrt(cfg.hidden), cfg.jdtype)
    if params.pos_embed is not None:
        x = x + params.pos_embed[pos_BxT + cfg.pos_offset].astype(cfg.jdtype)
    return x


NO_WINDOW = 2**30  # a traced window that masks nothing (full attention inside the layer scan)


def _scan_consts(cfg: Config):
    """(xs, consts): per-layer windows / RoPE frequencies as scan inputs where layers differ (else None), and
    consts(w, f) -> the LayerConsts of one scan step (a value shared by all layers stays a constant)."""
    lcs = [layer_consts(cfg, i) for i in range(cfg.n_layers)]
    freqs = None if lcs[0].freqs is None else np.stack([lc.freqs for lc in lcs])
    win_L = None if len({lc.window for lc in lcs}) == 1 else jnp.asarray(
        [NO_WINDOW if lc.window is None else lc.window for lc in lcs], jnp.int32)
    freqs_L = None if freqs is None or (freqs == freqs[0]).all() else jnp.asarray(freqs)
    win0, freqs0 = lcs[0].window, lcs[0].freqs
    return (win_L, freqs_L), lambda w, f: LayerConsts(win0 if w is None else w, freqs0 if f is None else f)


def _scan_blocks(cfg: Config, layers: Layer, x_BxTxD, pos_BxT, remat: bool, unroll: bool = False):
    """The decoder layers of stacked parameters as one lax.scan over L (no cache): XLA compiles one layer's
    forward and backward instead of L copies, and with remat the backward recomputes one layer at a time from
    its input, the only activation kept per layer. A window or RoPE base that differs between layers enters
    the scan as a traced per-layer value; one shared by all stays a constant. unroll: the scan fully unrolled
    (XLA:CPU with several devices: its collectives inside a loop body can deadlock)."""
    (win_L, freqs_L), consts = _scan_consts(cfg)

    def body(x, xs):
        lp, w, f = xs
        return block(cfg, consts(w, f), lp, x, pos_BxT)[0], None

    x_BxTxD, _ = jax.lax.scan(jax.checkpoint(body) if remat else body, x_BxTxD, (layers, win_L, freqs_L),
                              unroll=unroll)
    return x_BxTxD


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _scan_into(cfg: Config, unroll: bool, layers: Layer, into: Layer, x_BxTxD, pos_BxT):
    """`_scan_blocks` with remat whose gradient for `layers` is `into` + the true gradient, added in the backward
    scan one layer at a time (`into`: a running gradient sum of the layers' shape, e.g. the trainer's donated
    accumulator): no separate gradient of all layers exists. The gradient for `into` is zero."""
    return _scan_blocks(cfg, layers, x_BxTxD, pos_BxT, False, unroll)


def _scan_into_fwd(cfg, unroll, layers, into, x_BxTxD, pos_BxT):
    (win_L, freqs_L), consts = _scan_consts(cfg)

    def body(x, xs):
        lp, w, f = xs
        return block(cfg, consts(w, f), lp, x, pos_BxT)[0], x

    y, xin_LxBxTxD = jax.lax.scan(body, x_BxTxD, (layers, win_L, freqs_L), unroll=unroll)
    return y, (layers, into, xin_LxBxTxD, pos_BxT)


def _scan_into_bwd(cfg, unroll, res, dy_BxTxD):
    layers, into, xin_LxBxTxD, pos_BxT = res
    (win_L, freqs_L), consts = _scan_consts(cfg)

    def body(carry, xs):
        dx, acc = carry
        lp, w, f, xin, i = xs
        _, vjp = jax.vjp(lambda lp, x: block(cfg, consts(w, f), lp, x, pos_BxT)[0], lp, xin)
        dlp, dxin = vjp(dx)
        acc = jax.tree.map(lambda a, d: jax.lax.dynamic_update_index_in_dim(
            a, jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False) + d, i, 0), acc, dlp)
        return (dxin, acc), None

    (dx, acc), _ = jax.lax.scan(body, (dy_BxTxD, into), (layers, win_L, freqs_L, xin_LxBxTxD,
                                                         jnp.arange(cfg.n_layers)), reverse=True, unroll=unroll)
    return acc, jax.tree.map(jnp.zeros_like, into), dx, None


_scan_into.defvjp(_scan_into_fwd, _scan_into_bwd)


def apply(params: Params, cfg: Config, tokens_BxT, pos_BxT, cache: Cache | None = None,
          remat: bool = False, grad_into: Layer | None = None, unroll: bool = False):
    """Final (normed, projected) hidden states h_BxTxE, and the updated cache if one was given.
    grad_into (stacked layers, remat): a gradient sum the layers' gradient is added into (`_scan_into`);
    unroll: the layer scan of stacked layers fully unrolled (`_scan_blocks`)."""
    x = embed(params, cfg, tokens_BxT, pos_BxT)
    if cache is not None:
        kpos_BxS = jax.lax.dynamic_update_slice(cache.pos_BxS, pos_BxT.astype(jnp.int32), (0, cache.end))
    ks, vs = [], []
    if isinstance(params.layers, Layer):  # stacked ([L, ...] arrays): one layer's code under lax.scan
        if cache is not None:
            raise ValueError("a KV cache runs per-layer parameters (model.unstack_layers)")
        x = _scan_blocks(cfg, params.layers, x, pos_BxT, remat, unroll) if grad_into is None else \
            _scan_into(cfg, unroll, params.layers, grad_into, x, pos_BxT)
    for i, lp in enumerate([] if isinstance(params.layers, Layer) else params.layers):
        kv = None if cache is None else (cache.k[i], cache.v[i], kpos_BxS, cache.end)
        f = jax.checkpoint(block, static_argnums=(0, 1)) if remat else block
        x, (k, v) = f(cfg, layer_consts(cfg, i), lp, x, pos_BxT, kv)
        ks.append(k)
        vs.append(v)
    if params.final_norm is not None:
        x = _norm(cfg, x, params.final_norm, params.final_norm_b)
    if params.proj_out is not None:
        x = _linear(x, params.proj_out)
    if cache is None:
        return x, None
    return x, Cache(k=ks, v=vs, pos_BxS=kpos_BxS, end=cache.end + tokens_BxT.shape[1])


def logits(params: Params, cfg: Config, h_BxTxE):
    """Vocabulary logits in fp32 (soft-capped when cfg.final_softcap)."""
    w = params.embed if params.lm_head is None else params.lm_head
    if isinstance(w, InOut):
        lg = jnp.einsum("...e,ev->...v", h_BxTxE, w.w.astype(h_BxTxE.dtype), preferred_element_type=jnp.float32)
    else:
        lg = jnp.einsum("...e,ve->...v", h_BxTxE, w.astype(h_BxTxE.dtype), preferred_element_type=jnp.float32)
    return _softcap(lg, cfg.final_softcap)


def forward(params: Params, cfg: Config, tokens_BxT, pos_BxT):
    """Full-sequence logits_BxTxV (fp32) of a padded batch."""
    return logits(params, cfg, apply(params, cfg, tokens_BxT, pos_BxT)[0])
