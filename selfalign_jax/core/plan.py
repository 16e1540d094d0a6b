"""Memory plan: bytes per device of a fine-tuning step and of generation, before anything compiles.

Pure arithmetic on a `model.Config` and mesh axis sizes ({'data', 'fsdp', 'tensor'} as
`mesh.parse_mesh` returns them); nothing is allocated and no device is needed.

Exact figures (checked against materialised arrays in tests/test_plan.py):
  * parameters: every `model.param_specs` array, each dimension divided by the mesh axes that
    `model.logical_to_pspec` shards it over (replicated otherwise), at the stored dtype:
    fp32 masters for full fine-tuning (the trainer keeps fp32 masters whatever the compute dtype),
    the frozen base in the compute dtype under LoRA, the generation dtype for sampling;
  * LoRA adapters (`lora.lora_specs`, fp32, sharded the same way);
  * AdamW state: mu and nu in fp32 with the sharding of the trainable arrays (optax keeps the moments
    in the parameters' dtype, which is fp32 for masters and adapters) + at most two int32 step
    counters (OPT_SCALARS);
  * KV cache (`model.init_cache`): per layer keys [B, K, H, S] and values [B, K, S, H] in the cache
    dtype, plus the int32 positions [B, S] and the int32 end; per device the batch is split over
    data x fsdp and the kv heads over tensor when they divide.

Estimates (documented, not exact; what the jitted step keeps alive, read from train.py / model.py):
  * gradients: one fp32 copy of the trainable arrays, two with gradient accumulation (the running sum
    and the micro-batch's gradient), less the layers' share of the second where the backward scan adds
    each layer's gradient into the sum itself (full fp32 fine-tune with remat, `model._scan_into`);
  * compute copy: with a bf16 compute dtype and full fine-tuning, the bf16 cast of the fp32
    masters; under FSDP one layer gathered whole (x2 for the prefetch of the next);
  * LoRA merge: the merged weights W + s*B@A of every adapted projection, in the compute dtype, for
    all layers (the forward uses them and the backward needs them again);
  * activations, per layer and per token of a micro-batch row, kept for the backward pass without
    remat: the block input and the residual after attention (2D), the two norm outputs (2D) and, in
    bf16, their fp32 upcasts (2D x 4 bytes), q/k/v after RoPE (NH + 2KH), the attention output
    (NH), score-sized fp32 arrays of the blocked causal attention (N x ~T/2 per token each, plus
    the probabilities' compute-dtype cast in bf16), and the MLP's gate/up/act/product (4F, 2F without
    GLU). SCORE_COPIES = 5 such arrays, not just the probabilities, is what XLA:CPU keeps: its
    memory_analysis of the fp32 train step (llama, D=512, 8/4 heads, F=1536, V=8192; 2 and 4 layers)
    gives temporaries of 211 / 334 MiB at 4 x 256 tokens and 851 / 1571 MiB at 8 x 512, against
    268 / 418 and 824 / 1512 MiB predicted (gradients + activations + loss). The train step runs the layers
    as one `lax.scan` (`model.stack_layers`); with remat the backward recomputes one layer at a time from its
    input, so only each block's input (D) is kept per layer, plus one layer's full set while it is
    recomputed (XLA:CPU's memory_analysis of the real demo's 4 x 256 step on SmolLM2's shape: temporaries
    3.17 GiB without remat, 0.88 GiB with it, the micro-batch's 0.5 GiB gradient included).
    Head and MLP widths are divided by tensor when they divide; rows by data x fsdp.
    With remat only each block's input (D) is kept per layer, plus one layer's full set while
    it is recomputed;
  * fused loss (`train.fused_xent`): the final hidden states and their sorted copy (2E, compute
    dtype), the fp32 dh (E), the [E, V] transposed LM head (compute dtype) and its fp32 gradient
    carry, and one chunk of ~loss_chunk positions of fp32 logits (x3: logits, exp, dlogits);
    no [B, T, V] logits exist;
  * generation: the cache holds the sampler's padded lengths (`sizing.cache_lengths`); working memory
    per row is `sizing.work_bytes` (the one formula sizing.auto_batch_size uses too): the prefill's
    fp32 scores of one key block and MLP activations of one chunk of prompt tokens, or the decode
    step's fp32 logits (10 x V x 4), whichever is larger.
  * continuous batching's insertion (`generate/steps.insert`): the new rows' prompts are prefilled into a
    cache of their own (rows x Tp slots) before they are placed into the batch's; an insertion takes at most
    `sizing.insert_rows` prompts (a quarter of the batch), and that many rows' cache is counted (XLA:CPU's
    memory_analysis of insert on SmolLM2's shape, 32 rows, Tp 384: 0.80 GiB of temporaries beside the 0.70
    GiB cache, against 0.53 + 0.48 predicted).
A run fits when the total is under `HEADROOM` x hbm (XLA's scratch, fragmentation, the runtime).

On a CPU the device memory is the process's: `host_rss` adds what the process holds besides the step, the
imported runtime (HOST_RUNTIME: Python, JAX, the tokenizer libraries; 0.22-0.26 GiB measured), the heap XLA:CPU's
compile of the executable takes (HOST_COMPILE, calibrated: compiling the insert on SmolLM2's shape alone peaks at
0.70 GiB RSS, 0.48 GiB over the runtime; the SFT step's compile leaves 0.75 GiB that malloc_trim returns) and one
more copy of the parameters in the compute dtype (SFT: the caller's model, kept while the trainer's fp32 masters
train; generation: the transient [in, out] copy `generate.sampler.prepare` makes on a CPU). Measured on the real
demo's settings (SmolLM2-135M, fp32, micro-batches of 4 x 256 tokens with remat, the `selfalign` command's malloc
tunables, core/hostmem.py; its iteration-1 SFT alone with the export, on the 2-core machine): 3.53 GiB peak RSS
(at the export) against 3.99 predicted; the demo's iteration-1 question / answer stages (32 rows, prompts <= 351
tokens) 2.94 / 3.42 GiB peak (the answer stage's includes the LM embedder's pass) against 2.98 / 3.06 predicted.
"""

from __future__ import annotations

import dataclasses
import math
import types

import jax

from selfalign_jax.core import lora as L
from selfalign_jax.core import model as M
from selfalign_jax.core.generate import sizing

HEADROOM = 0.9  # share of the HBM a plan may use
GIB = 1 << 30
OPT_SCALARS = 8  # optax's int32 counters: scale_by_adam's (+ the lr schedule's where optax holds it)
QUERY_BLOCK = M.QUERY_BLOCK
MAX_SEARCH = 1 << 14  # largest batch the fit search tries
RULES = M.ShardingRules()  # the trainer's default placement
SCORE_COPIES = 5  # fp32 score-sized arrays kept per attention block (calibrated on XLA:CPU, see module doc)
HOST_RUNTIME = 1 << 28  # 0.25 GiB: the RSS of a process that imported the package and JAX (module doc)
HOST_COMPILE = 1 << 29  # 0.5 GiB: XLA:CPU's compile of the step's executable (module doc)


# ------------------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """One SFT micro-batch: `batch_size` rows (global, over all devices) of `max_length` tokens."""

    batch_size: int = 8
    max_length: int = 512
    dtype: str = "bfloat16"  # compute dtype; masters and Adam moments stay fp32
    lora_rank: int = 0
    lora_targets: tuple[str, ...] = L.TARGETS
    remat: bool = False
    grad_accum: int = 1
    loss_chunk: int = 512


@dataclasses.dataclass(frozen=True)
class GenSettings:
    """A generation batch: prompts up to `prompt_len` tokens + `max_new_tokens`, cache in `dtype`."""

    batch_size: int = 32
    prompt_len: int = 2000
    max_new_tokens: int = 200
    dtype: str = "bfloat16"  # parameters and KV cache


def _isz(dtype) -> int:
    return jax.numpy.dtype(dtype).itemsize


def full_mesh(sizes: dict | None) -> dict[str, int]:
    sizes = dict(sizes or {})
    return {a: int(sizes.get(a, 1)) for a in ("data", "fsdp", "tensor")}


def n_devices(mesh: dict) -> int:
    return math.prod(full_mesh(mesh).values())


def _fake_mesh(mesh: dict):
    """What model.logical_to_pspec reads of a Mesh (`.shape`), without devices."""
    return types.SimpleNamespace(shape=full_mesh(mesh))


def shard_shape(spec: M.Spec, mesh: dict, rules: M.ShardingRules = RULES) -> tuple[int, ...]:
    """The per-device shape of one array (as NamedSharding.shard_shape would give)."""
    sizes = full_mesh(mesh)
    ps = M.logical_to_pspec(spec.axes, spec.shape, _fake_mesh(mesh), rules)
    out = []
    for n, p in zip(spec.shape, tuple(ps) + (None,) * (len(spec.shape) - len(ps))):
        names = () if p is None else (p if isinstance(p, tuple) else (p,))
        out.append(n // math.prod(sizes[a] for a in names))
    return tuple(out)


def spec_bytes(specs, dtype, mesh: dict | None = None, rules: M.ShardingRules = RULES) -> int:
    """Bytes per device of a tree of Specs stored in `dtype` (mesh None: one device)."""
    isz = _isz(dtype)
    total = 0
    for s in jax.tree.leaves(specs, is_leaf=M.is_spec):
        shape = s.shape if mesh is None else shard_shape(s, mesh, rules)
        total += math.prod(shape) * isz
    return total


def _div(n: int, k: int) -> int:
    """k if it divides n, else 1 (an axis the mesh does not divide stays whole)."""
    return k if k > 1 and n % k == 0 else 1


# -------------------------------------------------------------------------------------- KV cache
def kv_bytes_per_seq(cfg: M.Config, seq_len: int, dtype=None, tensor: int = 1) -> int:
    """KV cache of one sequence of `seq_len` slots: keys + values of every layer, and its positions."""
    return M.cache_row_bytes(cfg, seq_len, dtype, cfg.n_kv_heads // _div(cfg.n_kv_heads, tensor))


def kv_bytes(cfg: M.Config, batch: int, seq_len: int, dtype=None, mesh: dict | None = None) -> int:
    """Bytes per device of `model.init_cache(cfg, batch, seq_len, dtype)`: rows over data x fsdp."""
    m = full_mesh(mesh)
    rows = -(-batch // (m["data"] * m["fsdp"]))
    return rows * kv_bytes_per_seq(cfg, seq_len, dtype, m["tensor"]) + 4


# -------------------------------------------------------------------------------------- training
def _act_per_token_layer(cfg: M.Config, T: int, dtype: str, tensor: int) -> int:
    """Bytes one decoder layer keeps for the backward pass, per token of one row (see module doc)."""
    b = _isz(dtype)
    D, H, F = cfg.hidden, cfg.head_dim, cfg.intermediate
    N = cfg.n_heads // _div(cfg.n_heads, tensor)
    K = cfg.n_kv_heads // _div(cfg.n_kv_heads, tensor)
    F = F // _div(F, tensor)
    up32 = 0 if b == 4 else 2 * D * 4
    keys = min(T, (T + QUERY_BLOCK) // 2)  # blocked causal attention: ~half the keys per query
    probs = N * keys * (SCORE_COPIES * 4 + (0 if b == 4 else b))
    mlp = (4 if cfg.glu else 2) * F
    return 4 * D * b + up32 + (2 * N * H + 2 * K * H + mlp) * b + probs


def _loss_bytes(cfg: M.Config, rows: int, T: int, dtype: str, chunk: int, mesh: dict) -> int:
    b = _isz(dtype)
    E, V = cfg.E, cfg.vocab_size
    m = full_mesh(mesh)
    head = M.Spec((V, E), ("vocab", "embed"))
    head_elems = math.prod(shard_shape(head, m))
    v_dev = V // _div(V, m["tensor"])
    c = max(1, min(T, (chunk or T * rows) // max(rows, 1)))
    return rows * T * E * (2 * b + 4) + head_elems * (b + 4) + 3 * rows * c * v_dev * 4


def train_bytes(cfg: M.Config, ts: TrainSettings, mesh: dict | None = None) -> dict[str, int]:
    """Bytes per device of one SFT step, by part (see the module doc for what is exact)."""
    m = full_mesh(mesh)
    cdt = ts.dtype
    rows = -(-ts.batch_size // (m["data"] * m["fsdp"]))
    T = ts.max_length
    specs = M.param_specs(cfg)
    out = {}
    if ts.lora_rank > 0:
        lspecs = L.lora_specs(cfg, ts.lora_rank, ts.lora_targets)
        trainable = spec_bytes(lspecs, "float32", m)
        out["params"] = spec_bytes(specs, cdt, m)  # frozen base in the compute dtype
        out["lora"] = trainable
        merged = [getattr(lp, t) for lp in specs.layers for t in ts.lora_targets if getattr(lp, t) is not None]
        work = spec_bytes(merged, cdt, m)
    else:
        trainable = spec_bytes(specs, "float32", m)
        out["params"] = trainable
        out["lora"] = 0
        work = 0 if _isz(cdt) == 4 else spec_bytes(specs, cdt, m)
        if m["fsdp"] > 1 and specs.layers:
            one = spec_bytes(specs.layers[0], cdt, {**m, "fsdp": 1})
            work += 2 * one
    out["optimizer"] = 2 * trainable + OPT_SCALARS
    out["gradients"] = trainable * (2 if ts.grad_accum > 1 else 1)
    if ts.grad_accum > 1 and ts.remat and ts.lora_rank == 0 and _isz(cdt) == 4:  # the backward scan adds the layers'
        out["gradients"] -= spec_bytes(specs.layers, "float32", m)              # gradient into the sum (_scan_into)
    out["work"] = work  # compute copy / gathered layers / LoRA-merged weights
    per_tok = _act_per_token_layer(cfg, T, cdt, m["tensor"])
    full = cfg.n_layers * rows * T * per_tok
    remat = cfg.n_layers * rows * T * cfg.hidden * _isz(cdt) + rows * T * per_tok
    out["activations_no_remat"] = full
    out["activations_remat"] = remat
    out["activations"] = remat if ts.remat else full
    out["loss"] = _loss_bytes(cfg, rows, T, cdt, ts.loss_chunk, m)
    out["total"] = sum(out[k] for k in ("params", "lora", "optimizer", "gradients", "work", "activations", "loss"))
    out["host_rss"] = out["total"] + HOST_RUNTIME + HOST_COMPILE + spec_bytes(specs, cdt, m)
    return out


# ------------------------------------------------------------------------------------ generation
def gen_bytes(cfg: M.Config, gs: GenSettings, mesh: dict | None = None) -> dict[str, int]:
    """Bytes per device of sampling a batch (parameters, KV cache, working memory)."""
    m = full_mesh(mesh)
    rows = -(-gs.batch_size // (m["data"] * m["fsdp"]))
    Tp, Tn = sizing.cache_lengths(gs.prompt_len, gs.max_new_tokens)
    S = Tp + Tn
    t = m["tensor"]
    N = cfg.n_heads // _div(cfg.n_heads, t)
    F = cfg.intermediate // _div(cfg.intermediate, t)
    out = {"params": spec_bytes(M.param_specs(cfg), gs.dtype, m),
           "kv_per_sequence": kv_bytes_per_seq(cfg, S, gs.dtype, t),
           "kv_cache": kv_bytes(cfg, gs.batch_size, S, gs.dtype, m),
           "work": rows * sizing.work_bytes(cfg, Tp, Tn, N, F, _isz(gs.dtype)),
           "insert": kv_bytes(cfg, sizing.insert_rows(gs.batch_size, m["data"] * m["fsdp"]), Tp, gs.dtype, m)}
    out["total"] = out["params"] + out["kv_cache"] + out["work"] + out["insert"]
    out["host_rss"] = out["total"] + HOST_RUNTIME + HOST_COMPILE + out["params"]
    return out


# ----------------------------------------------------------------------------------------- fitting
def usable(hbm_gib: float) -> int:
    return int(HEADROOM * hbm_gib * GIB)


def _largest(fits, step: int) -> int:
    """The largest multiple of `step` (<= MAX_SEARCH) for which fits(n) holds; 0 if not even `step`."""
    if not fits(step):
        return 0
    lo, hi = 1, 2
    while hi * step <= MAX_SEARCH and fits(hi * step):
        lo, hi = hi, hi * 2
    if hi * step > MAX_SEARCH:
        return lo * step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid * step) else (lo, mid)
    return lo * step


def max_train_batch(cfg: M.Config, ts: TrainSettings, mesh: dict, hbm_gib: float) -> int:
    m = full_mesh(mesh)
    budget = usable(hbm_gib)
    return _largest(lambda n: train_bytes(cfg, dataclasses.replace(ts, batch_size=n), m)["total"] <= budget,
                    m["data"] * m["fsdp"])


def max_gen_batch(cfg: M.Config, gs: GenSettings, mesh: dict, hbm_gib: float) -> int:
    m = full_mesh(mesh)
    budget = usable(hbm_gib)
    return _largest(lambda n: gen_bytes(cfg, dataclasses.replace(gs, batch_size=n), m)["total"] <= budget,
                    m["data"] * m["fsdp"])


def divisors(n: int, step: int = 1) -> list[int]:
    """The divisors of n that are multiples of `step`, largest first."""
    return [d for d in range(n, 0, -1) if n % d == 0 and d % step == 0]


def fit_train(cfg: M.Config, ts: TrainSettings, mesh: dict, budget_bytes: int, *, split: bool = True,
              max_rows: int | None = None, remat: bool = True) -> TrainSettings:
    """The settings a step runs with under `budget_bytes` per device: the largest micro-batch that fits, a
    divisor of ts.batch_size the mesh rows divide (at most `max_rows` when such a divisor exists; only
    ts.batch_size itself without `split`), with grad_accum raised so batch_size * grad_accum stays; remat (where
    `remat` allows it) only when no micro-batch fits without it. Nothing fits: the smallest micro-batch, with
    remat where allowed."""
    m = full_mesh(mesh)
    sizes = divisors(ts.batch_size, m["data"] * m["fsdp"]) or [ts.batch_size]
    if not split:
        sizes = [ts.batch_size]
    capped = [b for b in sizes if max_rows is None or b <= max_rows]
    sizes = capped or sizes[-1:]
    eff = ts.batch_size * ts.grad_accum
    cands = [dataclasses.replace(ts, batch_size=b, grad_accum=eff // b, remat=r)
             for r in sorted({ts.remat, remat or ts.remat}) for b in sizes]
    for c in cands:
        if train_bytes(cfg, c, m)["total"] <= budget_bytes:
            return c
    return cands[-1]


def suggest_mesh(cfg: M.Config, devices: int, hbm_gib: float, ts: TrainSettings | None = None,
                 gs: GenSettings | None = None) -> dict[str, dict[str, int]]:
    """Meshes for `devices` devices. Training: all on data when the replicated state (params,
    optimizer, gradients, one micro-batch) fits a device, else all on fsdp. Generation: data when
    the parameters and the cache fit a device, else tensor when the kv heads divide the device count
    (no gathers per step), else fsdp."""
    ts = ts or TrainSettings()
    gs = gs or GenSettings()
    budget = usable(hbm_gib)
    data = {"data": devices, "fsdp": 1, "tensor": 1}
    tr = data if train_bytes(cfg, ts, data)["total"] <= budget else {"data": 1, "fsdp": devices, "tensor": 1}
    if gen_bytes(cfg, gs, data)["total"] <= budget:
        ge = data
    elif cfg.n_kv_heads % devices == 0 and cfg.n_heads % devices == 0:
        ge = {"data": 1, "fsdp": 1, "tensor": devices}
    else:
        ge = {"data": 1, "fsdp": devices, "tensor": 1}
    return {"train": tr, "generate": ge}


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def _mesh_str(m: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in full_mesh(m).items() if v > 1) or "data=1"


def _parts(d: dict, keys) -> str:
    return ", ".join(f"{k} {d[k] / GIB:.2f}" for k in keys if d.get(k))


def _over(what: str, total: float, budget: float, hbm_gib: float, parts: str) -> str:
    return f"{what} does not fit: {_gib(total)} per device > {_gib(budget)} usable of {hbm_gib:g} GiB ({parts} GiB)"


def train_advice(cfg: M.Config, ts: TrainSettings, mesh: dict, hbm_gib: float, lora_rank: int = 16) -> str | None:
    """None when the step fits; else ONE line: what does not fit, and the smallest change that does
    (fewest changes first, LoRA last; among equals: mesh all-fsdp, remat, a smaller micro-batch)."""
    m = full_mesh(mesh)
    budget = usable(hbm_gib)
    have = train_bytes(cfg, ts, m)
    if have["total"] <= budget:
        return None
    n = n_devices(m)
    head = _over("training", have["total"], budget, hbm_gib,
                 _parts(have, ("params", "lora", "optimizer", "gradients", "work", "activations", "loss")))
    fsdp = {"data": 1, "fsdp": n, "tensor": 1}
    meshes = [False, True] if fsdp != m else [False]
    ranks = [False] if ts.lora_rank else [False, True]
    remats = [False] if ts.remat else [False, True]
    combos = [(lo, me, re, ba) for lo in ranks for me in meshes for re in remats for ba in (False, True)]
    # fewest changes first (LoRA last: it changes the method); ties: mesh < remat < batch
    combos.sort(key=lambda c: (c[0], sum(c), [not x for x in c[1:]]))
    for lo, me, re, ba in combos:
        if not (lo or me or re or ba):
            continue
        mm = fsdp if me else m
        t2 = dataclasses.replace(ts, lora_rank=lora_rank if lo else ts.lora_rank, remat=ts.remat or re)
        flags = ([f"--mesh {_mesh_str(mm)}"] if me else []) + (["--remat"] if re else []) + \
                ([f"--lora-rank {lora_rank}"] if lo else [])
        note = ""
        if ba:
            best = max_train_batch(cfg, dataclasses.replace(t2, grad_accum=max(2, ts.grad_accum)), mm, hbm_gib)
            if not best or best >= ts.batch_size:
                continue
            eff, step = ts.batch_size * ts.grad_accum, full_mesh(mm)["data"] * full_mesh(mm)["fsdp"]
            best = next((b for b in range(best, 0, -step) if eff % b == 0), best)  # the same effective batch
            acc = -(-eff // best)
            t2 = dataclasses.replace(t2, batch_size=best, grad_accum=acc)
            flags.append(f"--batch-size {best}")
            note = f"--grad-accum {acc} keeps the effective batch; "
        tot = train_bytes(cfg, t2, mm)["total"]
        if tot <= budget:
            return f"{head}; smallest change that fits: {' '.join(flags)} ({note}{_gib(tot)})"
    return f"{head}; nothing fits on {n} device(s) even with LoRA rank {lora_rank}, remat and batch 1: " \
           f"use more devices or a smaller model"


def gen_advice(cfg: M.Config, gs: GenSettings, mesh: dict, hbm_gib: float) -> str | None:
    """None when generation fits; else ONE line with the smallest change (mesh, then batch)."""
    m = full_mesh(mesh)
    budget = usable(hbm_gib)
    have = gen_bytes(cfg, gs, m)
    if have["total"] <= budget:
        return None
    n = n_devices(m)
    head = _over("generation", have["total"], budget, hbm_gib, f"params {have['params'] / GIB:.2f}, "
                 f"KV cache {have['kv_cache'] / GIB:.2f}, work {have['work'] / GIB:.2f}")
    cands = [m]
    for alt in ({"data": 1, "fsdp": 1, "tensor": n}, {"data": 1, "fsdp": n, "tensor": 1}):
        if alt != m and n > 1:
            cands.append(alt)
    for mm in cands[1:]:
        tot = gen_bytes(cfg, gs, mm)["total"]
        if tot <= budget:
            return f"{head}; smallest change that fits: --mesh {_mesh_str(mm)} ({_gib(tot)})"
    for mm in cands:
        best = max_gen_batch(cfg, gs, mm, hbm_gib)
        if best:
            flag = [] if mm is m else [f"--mesh {_mesh_str(mm)}"]
            return f"{head}; smallest change that fits: {' '.join(flag + [f'generation batch {best}'])}"
    return f"{head}; nothing fits on {n} device(s) even at batch 1: use more devices or a shorter context"


# ------------------------------------------------------------------------------------------ report
def plan(cfg: M.Config, mesh: dict, hbm_gib: float, ts: TrainSettings, gs: GenSettings) -> dict:
    """Everything `selfalign plan` prints, as a JSON-able dict."""
    m = full_mesh(mesh)
    tb, gb = train_bytes(cfg, ts, m), gen_bytes(cfg, gs, m)
    advice = [a for a in (train_advice(cfg, ts, m, hbm_gib), gen_advice(cfg, gs, m, hbm_gib)) if a]
    return {
        "model": {"family": cfg.family, "parameters": sum(math.prod(s.shape) for s in
                                                         jax.tree.leaves(M.param_specs(cfg), is_leaf=M.is_spec)),
                  "layers": cfg.n_layers, "hidden": cfg.hidden, "heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads,
                  "vocab": cfg.vocab_size},
        "mesh": m, "devices": n_devices(m), "hbm_gib": hbm_gib, "usable_bytes": usable(hbm_gib),
        "train_settings": dataclasses.asdict(ts), "gen_settings": dataclasses.asdict(gs),
        "train": tb, "generate": gb,
        "max_train_batch": max_train_batch(cfg, ts, m, hbm_gib),
        "max_gen_batch": max_gen_batch(cfg, gs, m, hbm_gib),
        "suggested_mesh": suggest_mesh(cfg, n_devices(m), hbm_gib, ts, gs),
        "fits": not advice, "advice": advice,
    }


def table(p: dict) -> str:
    """A readable table of `plan()`'s figures (GiB per device)."""
    def row(name, v):
        return f"  {name:<28}{v / GIB:>10.3f}"

    t, g = p["train"], p["generate"]
    ts, gs = p["train_settings"], p["gen_settings"]
    md = p["model"]
    kind = f"LoRA rank {ts['lora_rank']}" if ts["lora_rank"] else "full fine-tune"
    lines = [(f"model: {md['family']}, {md['parameters'] / 1e9:.3f} B parameters, {md['layers']} layers, "
              f"hidden {md['hidden']}, heads {md['heads']}/{md['kv_heads']}, vocab {md['vocab']}"),
             (f"mesh: {_mesh_str(p['mesh'])} ({p['devices']} device(s)); HBM {p['hbm_gib']:g} GiB per device, "
              f"{p['usable_bytes'] / GIB:.2f} GiB usable ({HEADROOM:.0%})"),
             (f"SFT step: micro-batch {ts['batch_size']} x {ts['max_length']} tokens, {ts['dtype']}, {kind}, "
              f"remat {'on' if ts['remat'] else 'off'}          GiB per device")]
    for k, name in (("params", "parameters"), ("lora", "LoRA adapters"), ("optimizer", "optimizer (AdamW fp32)"),
                    ("gradients", "gradients (fp32)"), ("work", "compute copy / merged"),
                    ("activations_no_remat", "activations, no remat"), ("activations_remat", "activations, remat"),
                    ("loss", "fused loss"), ("total", "total"), ("host_rss", "process RSS on a CPU")):
        lines.append(row(name, t[k]))
    lines.append(f"generation: batch {gs['batch_size']}, {gs['prompt_len']} + {gs['max_new_tokens']} tokens, "
                 f"{gs['dtype']}")
    for k, name in (("params", "parameters"), ("kv_per_sequence", "KV cache per sequence"),
                    ("kv_cache", "KV cache, batch"), ("work", "working memory"),
                    ("insert", "inserted rows' prompt cache"), ("total", "total"),
                    ("host_rss", "process RSS on a CPU")):
        lines.append(row(name, g[k]))
    sm = p["suggested_mesh"]
    lines.append(f"largest SFT micro-batch that fits: {p['max_train_batch']}; largest generation batch: "
                 f"{p['max_gen_batch']}")
    lines.append(f"suggested mesh for {p['devices']} device(s): train {_mesh_str(sm['train'])}, "
                 f"generate {_mesh_str(sm['generate'])}")
    lines += p["advice"] or ["fits"]
    return "\n".join(lines)
