"""The sampler's jitted steps over one batch's loop state: the prefill, the decode loop, and continuous batching's
slot insertion and cache shrinking.

    State: B rows, prompts left-padded to P = Tp + 1 columns, Tn new-token slots, S cache slots.
    prefill: all prompt tokens but the last into the (donated, reused) cache; the last one is the first decode
        step's input, so the LM head and the token choice are compiled once, in the decode.
    decode: one lax.while_loop of single-token steps (model, logits, processors, choice, in-place cache update)
        with per-row done flags; exits when every row is done, `until` steps were taken, or `want` more rows
        are done (continuous batching: slots to refill). The state is donated.
    insert / shrink / empty: continuous batching (continuous.py).
    TRACES counts how often each jitted step was traced (= compiled); PROFILE, when set to a Counter, gathers
    the blocking seconds of each phase (`timed`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp

from selfalign_jax.core import mesh as MS
from selfalign_jax.core import model as M
from selfalign_jax.core.generate.cache import Placement, constrain_cache, prefill_cache
from selfalign_jax.core.generate.choose import draw, ngram_ban, repetition_penalty

TRACES: collections.Counter = collections.Counter()  # function name -> times traced (compiled)
PROFILE: collections.Counter | None = None  # set to a Counter: seconds spent in prefill / decode (blocking)


@functools.partial(jax.tree_util.register_dataclass, data_fields=[
    "cache", "hist", "out", "logp", "last", "pos", "seen", "length", "done", "step", "keys", "limit",
    "temperature", "top_k", "top_p", "penalty"], meta_fields=[])
@dataclasses.dataclass
class State:
    """Loop state of one batch: B rows, prompts left-padded to P = Tp + 1 columns (the first Tp go through the
    prefill, the last one is the first decode step's input), Tn new-token slots, S = Tp + Tn cache slots."""

    cache: M.Cache
    hist: jax.Array  # [B, P+Tn] int32 prompt + generated ids, -1 at padding (n-gram ban)
    out: jax.Array  # [B, Tn] int32 generated ids (pad after the row is done)
    logp: jax.Array  # [B, Tn] f32 log-prob of each generated id (unprocessed distribution)
    last: jax.Array  # [B] int32 last token (the next step's input)
    pos: jax.Array  # [B] int32 its position
    seen: jax.Array  # [B, V] bool ids present in prompt + generated (repetition penalty)
    length: jax.Array  # [B] int32 tokens generated
    done: jax.Array  # [B] bool
    step: jax.Array  # () int32 next slot of `out`
    keys: jax.Array  # [B] per-row PRNG keys
    limit: jax.Array  # [B] int32 max tokens this row may generate (0: padding row)
    temperature: jax.Array  # [B] f32
    top_k: jax.Array  # [B] int32
    top_p: jax.Array  # [B] f32
    penalty: jax.Array  # [B] f32



def constrain(st: State, pl: Placement | None) -> State:
    """Every [B, ...] field over data x fsdp, the cache as `constrain_cache`, the step replicated."""
    if pl is None:
        return st
    rows = pl.spec(MS.BATCH)
    fields = {f.name: jax.lax.with_sharding_constraint(getattr(st, f.name), rows)
              for f in dataclasses.fields(State) if f.name not in ("cache", "step")}
    return State(cache=constrain_cache(st.cache, pl), step=jax.lax.with_sharding_constraint(st.step, pl.spec()),
                 **fields)


def select(st: State, logits_BxV, *, ngram: int, eos: tuple[int, ...], pad: int) -> State:
    """Choose each live row's next token from its logits and advance the state by one step. A row's t-th
    token goes to column t of out/logp and P + t of hist (t = st.length: rows may be at different tokens)."""
    B, V = logits_BxV.shape
    Tn = st.out.shape[1]
    raw = logits_BxV.astype(jnp.float32)
    P = st.hist.shape[1] - Tn
    t_B = st.length
    x = repetition_penalty(raw, st.seen, st.penalty)
    if ngram > 0:
        start = P - jnp.sum(st.hist[:, :P] >= 0, axis=1)  # first real token (left padding is -1)
        x = jnp.where(ngram_ban(st.hist, start, P + t_B, ngram, V), -jnp.inf, x)
    # argmax as max + first index of the max: XLA:CPU's variadic (value, index) reduce is ~4x slower
    iota = jax.lax.broadcasted_iota(jnp.int32, (B, V), 1)
    greedy = jnp.min(jnp.where(x == x.max(-1, keepdims=True), iota, V), axis=-1)
    greedy = jnp.where(greedy < V, greedy, 0)  # all NaN
    sampled = jax.lax.cond(jnp.any(st.temperature > 0),
                           lambda: draw(x, st.keys, t_B, st.temperature, st.top_k, st.top_p), lambda: greedy)
    live = ~st.done
    tok = jnp.where(live & (st.temperature > 0), sampled, greedy)
    lse = jax.nn.logsumexp(raw, axis=-1)
    lp = jnp.take_along_axis(raw, tok[:, None], axis=1)[:, 0] - lse
    tok = jnp.where(live, tok, pad)
    rows = jnp.arange(B)
    col = jnp.where(live, t_B, Tn)  # Tn: dropped (done rows write nothing)
    length = st.length + live
    hit_eos = jnp.isin(tok, jnp.asarray(eos, jnp.int32)) if eos else jnp.zeros((B,), bool)
    return dataclasses.replace(
        st,
        hist=st.hist.at[rows, P + col].set(tok, mode="drop"),
        out=st.out.at[rows, col].set(tok, mode="drop"),
        logp=st.logp.at[rows, col].set(lp, mode="drop"),
        last=tok,
        pos=jnp.where(live, st.pos + 1, st.pos),
        seen=st.seen.at[rows, jnp.where(live, tok, V)].set(True, mode="drop"),
        length=length,
        done=st.done | (live & (hit_eos | (length >= st.limit))),
        step=st.step + 1,
    )



def fresh_rows(tokens_BxP, lens_B, Tn: int, V: int, pad: int, penalize_prompt: bool = True):
    """The per-row state of new prompts (left-padded to P columns): hist, seen, last, pos, valid, positions.
    penalize_prompt=False: the prompt is left out of hist and seen, so the repetition penalty and the n-gram
    ban see the generated tokens only."""
    B, P = tokens_BxP.shape
    valid = jnp.arange(P)[None, :] >= (P - lens_B)[:, None]
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], (B, P))
    seen_ok = valid if penalize_prompt else jnp.zeros_like(valid)
    return dict(
        hist=jnp.concatenate([jnp.where(seen_ok, tokens_BxP, -1), jnp.full((B, Tn), -1, jnp.int32)], axis=1),
        out=jnp.full((B, Tn), pad, jnp.int32),
        logp=jnp.zeros((B, Tn), jnp.float32),
        last=tokens_BxP[:, -1],
        pos=lens_B - 1,
        seen=jnp.zeros((B, V), bool).at[rows, jnp.where(seen_ok, tokens_BxP, V)].set(True, mode="drop"),
        length=jnp.zeros((B,), jnp.int32),
    ), valid


@functools.partial(jax.jit, static_argnames=("cfg", "place", "penalize_prompt"), donate_argnames=("cache",))
def prefill(params, cache: M.Cache, tokens_BxP, lens_B, keys_B, limit_B, temperature_B, top_k_B, top_p_B,
             penalty_B, *, cfg: M.Config, place: Placement | None = None, penalize_prompt: bool = True) -> State:
    """All prompt tokens but the last into the (reused, donated) cache, in chunks; the last one is the first
    decode step's input, so the token choice (and the LM head) is compiled only once, in the decode."""
    TRACES["prefill"] += 1
    B, P = tokens_BxP.shape
    Tp = P - 1
    S = cache.pos_BxS.shape[1]
    fresh, valid = fresh_rows(tokens_BxP, lens_B, S - Tp, cfg.vocab_size, cfg.pad_id or 0, penalize_prompt)
    cache = M.Cache(k=cache.k, v=cache.v, pos_BxS=jnp.full((B, S), -1, jnp.int32), end=jnp.zeros((), jnp.int32))
    cache = prefill_cache(params, cfg, tokens_BxP[:, :Tp], M.positions(valid)[:, :Tp], constrain_cache(cache, place))
    return constrain(State(cache=cache, done=limit_B <= 0, step=jnp.zeros((), jnp.int32), keys=keys_B,
                            limit=limit_B, temperature=temperature_B, top_k=top_k_B, top_p=top_p_B, penalty=penalty_B,
                            **fresh), place)


@functools.partial(jax.jit, static_argnames=("cfg", "B", "S", "P", "Tn", "place"))
def empty(key, *, cfg: M.Config, B: int, S: int, P: int, Tn: int, place: Placement | None) -> State:
    """A continuous-batching state with every slot free (done, limit 0) and an empty cache of S slots."""
    TRACES["empty"] += 1
    fresh, _ = fresh_rows(jnp.zeros((B, P), jnp.int32), jnp.zeros((B,), jnp.int32), Tn, cfg.vocab_size,
                           cfg.pad_id or 0)
    zf, zi = jnp.zeros((B,), jnp.float32), jnp.zeros((B,), jnp.int32)
    return constrain(State(cache=M.init_cache(cfg, B, S), done=jnp.ones((B,), bool), step=jnp.zeros((), jnp.int32),
                            keys=jax.random.split(key, B), limit=zi, temperature=zf, top_k=zi, top_p=zf + 1,
                            penalty=zf + 1, **fresh), place)


@functools.partial(jax.jit, static_argnames=("cfg", "place", "penalize_prompt"), donate_argnames=("st",))
def insert(params, st: State, tokens_RxP, lens_R, slots_R, keys_R, limit_R, temperature_R, top_k_R, top_p_R,
            penalty_R, *, cfg: M.Config, place: Placement | None = None, penalize_prompt: bool = True) -> State:
    """Continuous batching: prefill R new prompts and put them in the slots `slots_R` (B = dropped) of a running
    batch. The cache is a ring over its S slots: every row writes its next token at slot `end` (mod S), so a new
    row's prompt goes to the Tp slots before `end` and its decode to the slots from `end` on (the static layout,
    rotated); Tp + its limit <= S keeps them apart. Rows attend by position, so the rotation changes nothing
    but the order of a sum."""
    TRACES["insert"] += 1
    R, Pr = tokens_RxP.shape
    Tp = Pr - 1
    B, S = st.cache.pos_BxS.shape
    Pm, Tn = st.hist.shape[1] - st.out.shape[1], st.out.shape[1]
    fresh, valid = fresh_rows(tokens_RxP, lens_R, Tn, cfg.vocab_size, cfg.pad_id or 0, penalize_prompt)
    fresh["hist"] = jnp.concatenate([jnp.full((R, Pm - Pr), -1, jnp.int32), fresh["hist"]], axis=1)
    dt = st.cache.k[0].dtype
    new = prefill_cache(params, cfg, tokens_RxP[:, :Tp], M.positions(valid)[:, :Tp], M.init_cache(cfg, R, Tp, dt))
    shift = (st.cache.end - Tp) % S

    def put(big, x, axis, fill):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, S - Tp)
        x = jnp.roll(jnp.pad(x, widths, constant_values=fill), shift, axis=axis)
        return big.at[slots_R].set(x.astype(big.dtype), mode="drop")

    cache = M.Cache(k=[put(b, x, 3, 0) for b, x in zip(st.cache.k, new.k)],
                    v=[put(b, x, 2, 0) for b, x in zip(st.cache.v, new.v)],
                    pos_BxS=put(st.cache.pos_BxS, new.pos_BxS, 1, -1), end=st.cache.end)
    rows = dict(fresh, done=limit_R <= 0, keys=keys_R, limit=limit_R, temperature=temperature_R, top_k=top_k_R,
                top_p=top_p_R, penalty=penalty_R)
    upd = {k: getattr(st, k).at[slots_R].set(v, mode="drop") for k, v in rows.items()}
    return constrain(dataclasses.replace(st, cache=cache, **upd), place)


@functools.partial(jax.jit, static_argnames=("S", "P", "place"))
def shrink(st: State, *, S: int, P: int, place: Placement | None = None) -> State:
    """Continuous batching: the same rows in a cache of S slots and prompts of P columns (both smaller). Each row
    keeps the last S slots of the ring before `end` (the next write then goes to slot 0), which hold all its keys
    when every running row's prompt tokens + limit fit in S; hist keeps its last P prompt columns."""
    TRACES["shrink"] += 1
    S0 = st.cache.pos_BxS.shape[1]
    idx = (st.cache.end - S + jnp.arange(S)) % S0
    cache = M.Cache(k=[jnp.take(k, idx, axis=3) for k in st.cache.k], v=[jnp.take(v, idx, axis=2) for v in st.cache.v],
                    pos_BxS=jnp.take(st.cache.pos_BxS, idx, axis=1), end=jnp.zeros((), jnp.int32))
    hist = st.hist[:, st.hist.shape[1] - st.out.shape[1] - P:]
    return constrain(dataclasses.replace(st, cache=cache, hist=hist), place)


@functools.partial(jax.jit, static_argnames=("cfg", "ngram", "eos", "pad", "place"), donate_argnames=("st",))
def decode(params, st: State, until, stop_B, want=None, *, cfg: M.Config, ngram: int, eos: tuple[int, ...],
            pad: int, place: Placement | None = None) -> State:
    """Single-token steps until every row is done, `until` steps were taken (st.step counts them) or `want` more
    rows are done than at the start (continuous batching: slots to refill); rows in stop_B end."""
    TRACES["decode"] += 1
    B = st.done.shape[0]
    S = st.cache.pos_BxS.shape[1]
    st = dataclasses.replace(st, done=st.done | stop_B)
    target = jnp.sum(st.done) + (B + 1 if want is None else want)

    def cond(st):
        return (st.step < until) & ~jnp.all(st.done) & (jnp.sum(st.done) < target)

    def body(st):
        h, cache = M.apply(params, cfg, st.last[:, None], st.pos[:, None], st.cache)
        cache = dataclasses.replace(cache, end=cache.end % S)  # a ring (continuous batching); static never wraps
        logits = M.logits(params, cfg, h[:, 0])
        st = select(dataclasses.replace(st, cache=cache), logits, ngram=ngram, eos=eos, pad=pad)
        return constrain(st, place)

    return jax.lax.while_loop(cond, body, constrain(st, place))


@jax.jit
def row_keys(key, idx_B):
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(idx_B)


def timed(phase: str, fn):
    """fn(); with PROFILE set, waits for its result and adds the seconds to PROFILE[phase]."""
    if PROFILE is None:
        return fn()
    t = time.perf_counter()
    out = jax.block_until_ready(fn())
    PROFILE[phase] += time.perf_counter() - t
    return out
