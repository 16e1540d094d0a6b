"""Batched text generation with a KV cache: one jitted prefill, then one jitted `lax.while_loop` decode.

API
    generate(params, cfg, tokenizer, prompts, *, max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0,
             repetition_penalty=1.0, no_repeat_ngram=0, stop=MARKERS, seed=0, key=None, batch_size=None,
             memory_budget=None, chat_template=False, truncate="left", ignore_eos=False,
             stop_check_every=8, progress=False, in_out_weights=None, mesh=None, continuous=False) -> list[Result]
        prompts: strings (tokenized as the tokenizer does by default, so with BOS if it adds one; no chat
        template unless chat_template=True) or lists of token ids (used as given).
        temperature / top_k / top_p / repetition_penalty: a scalar or one value per prompt; they are traced
        arrays, so changing them never recompiles. temperature 0 = greedy (argmax); top_k 0 = off;
        top_p 1 = off; repetition_penalty 1 = off; no_repeat_ngram 0 = off (static: one compile per size).
        stop: stop strings (default: the ISARA template markers `template.MARKERS`; () for none); one at
        index 0 of the completion does not stop (the authors' post-processing rule).
        EOS ids: cfg.eos_ids plus tokenizer.eos_token_id (ignore_eos=True: generate max_new_tokens always).
        max_new_tokens: a scalar or one limit per prompt.
        mesh: a ('data', 'fsdp', 'tensor') Mesh (mesh.make_mesh, the same --mesh as training) or None (one
        device). Parameters are placed by the model's sharding rules (`sharding_rules`: tensor parallel over whole
        query / KV heads and the MLP, heads replicated when the tensor axis does not divide their count, embed
        over fsdp); batch rows over data x fsdp (batch sizes are rounded up to a multiple of data x fsdp; the
        default batch size is per data x fsdp shard); the KV cache rows likewise, its KV heads over tensor when
        the parameters' are. Results are gathered for the host. Single-process (one host) meshes.
        continuous: continuous batching (see below) instead of static batches; greedy output is identical.
    Result(text, token_ids, logprobs, finish_reason, prompt_tokens, truncated)
        text: the completion (text after the prompt, special tokens removed, cut before the first stop
        string, not stripped); token_ids: the generated ids, through the EOS or the token that completed the
        stop string; logprobs[i]: log p(token_ids[i]) under the model's *unprocessed* next-token
        distribution (temperature 1, no penalty or truncation); finish_reason: "eos", "stop", "length"
        (max_new_tokens) or "context" (the context length cfg.max_pos was reached); prompt_tokens: after
        truncation; truncated: prompt tokens dropped from the left.
    auto_batch_size(cfg, prompt_len, max_new_tokens, budget_bytes=None) -> int
    sample_logits / warp_logits / repetition_penalty / ngram_ban: the token-choice pieces on their own.
    TRACES: Counter of how often each jitted function was traced (= compiled); tests count compiles with it.
    Beam search and beam-sample (the paper's decoding): selfalign_jax/core/beam.py.

Semantics (those of transformers' logits processors, applied in this order)
    repetition penalty (RepetitionPenaltyLogitsProcessor: a logit of a token present in prompt + generated
    ids is divided by the penalty if positive, multiplied if negative) -> no-repeat-ngram
    (NoRepeatNGramLogitsProcessor: ban each token that would complete an n-gram already present in prompt +
    generated ids) -> temperature -> top-k (keep logits >= the k-th largest) -> top-p (keep a token when the
    probability mass ranked above it is < top_p; the top token always) -> sample. Top-k / top-p are exact
    thresholds found without sorting (see _keep); tied logits are kept or dropped together.
    Padding never counts as a seen token or as part of an n-gram (unlike transformers on a padded batch):
    each row behaves as if it were generated alone.

Determinism
    Row i (the i-th prompt) draws its t-th token with uniform(fold_in(fold_in(key, i), t)) and an inverse
    CDF: the output for a given key does not depend on the batch size, on the batch a prompt lands in, or on
    the other prompts (up to float rounding differences between batch shapes).

How it runs
    Prompts are sorted by length (longest first) and cut into batches (`batch_size`, or the largest power of
    two whose KV cache and working memory fit `memory_budget`); each batch is left-padded to a prompt-length
    bucket (all prompt tokens but the last: powers of two from 16 to 256, then multiples of 128), the batch
    to a power of two (at most batch_size) and max_new_tokens to a power of two, so the number of compiles
    stays small. The prefill (chunks of 256 tokens under a lax.scan, the remainder first: bounded working
    memory; each chunk attends only to the cache slots filled so far, in key blocks, see
    model._prefix_attention) writes a preallocated KV cache that is donated and reused by the next batch of
    the same shape;
    it has no LM head or token choice: the decode's first step feeds each row's last prompt token, so the
    sampling code is compiled once. The decode is one jitted lax.while_loop of single-token steps (model,
    logits, processors, choice, in-place cache update) with per-row done flags (EOS, max_new_tokens, context
    length) that exits when every row is done. Results come back in input order. On CPU the weights are
    used through a transient [in, out] copy (model.inference_layout: ~20% faster small-batch matmuls).

Continuous batching (continuous=True)
    A fixed number of slots (batch_size rows) and one cache of S = Tp_max + Tn slots (the longest prompt's and
    the largest limit's buckets). Whenever rows end (EOS, limit, stop string) the decode loop returns (it exits
    as soon as one more row is done while prompts are pending), their results are taken, and the next pending
    prompts (longest first) are prefilled into those rows (`_insert`: R rows at a time, R a power of two) and
    decoding goes on until the queue is empty. The cache is a ring: every row writes its next token at the slot
    `end` (mod S), and a new prompt's keys go to the Tp slots before `end`, i.e. the static layout rotated;
    attention is by position, so each row computes what it would alone (the rotation only reorders a sum).
    Since the queue is longest first, the cache shrinks as it goes: once the buckets of the running rows' prompts
    and of the longest pending one fit half of Tp (from Tp >= SHRINK_FROM = 512 on), every row keeps the last
    S' = Tp' + Tn slots of its ring (`_shrink`) and the decode attends over S' slots, not S.
    Compiles: one decode, one insertion per (R, prompt bucket), and those again per cache size a call shrinks
    to (at most log2(Tp_max / 256) sizes); inserting never recompiles. A row's t-th token uses
    fold_in(row key, t) as in static batching, so the output for a key does not depend on the slot.

Stop strings
    Token-level matching inside the loop cannot be exact for every tokenizer (a marker may span several
    tokens or be part of one), so stop strings are checked on the host, exactly, on decoded text: the loop
    runs `stop_check_every` steps at a time (the state stays on the device, donated), the host decodes each
    live row's completion and marks rows whose text contains a stop string as done; the next call skips them.
    A stopped row is trimmed to the shortest token prefix whose text contains a stop string, and the text is
    cut before the first stop string in it. Rows thus stop at most `stop_check_every - 1` steps late; the
    batch ends when its last row ends. Without stop strings the whole decode is a single call.
    The completion text is decoded after the prompt's last 8 tokens (so a first word gets its leading space
    as in context) and that prefix's text removed.

Prompts longer than the context: truncate="left" keeps the last cfg.max_pos - 1 tokens (and the tokenizer's
BOS, if the prompt started with it), so at least one token can be generated; truncate="error" raises.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np

from selfalign_jax.core import mesh as MS
from selfalign_jax.core import model as M
from selfalign_jax.core.buckets import pow2
from selfalign_jax.core.errors import UserError
from selfalign_jax.core.template import MARKERS, find_cut

TRACES: collections.Counter = collections.Counter()  # function name -> times traced (compiled)
PROFILE: collections.Counter | None = None  # set to a Counter: seconds spent in prefill / decode (blocking)
PREFILL_CHUNK = 256  # prompt tokens per prefill step (bounds the working memory)
SHRINK_FROM = 512  # continuous batching shrinks its cache from prompt buckets this long up (below: not worth a compile)
PROMPT_TAIL = 8  # prompt tokens decoded with the completion so its first word decodes as in context


@dataclasses.dataclass
class Result:
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # eos | stop | length | context
    prompt_tokens: int
    truncated: int = 0  # prompt tokens dropped from the left


# ------------------------------------------------------------------------------------------- buckets
def prompt_bucket(n: int) -> int:
    """Padded prompt length: powers of two from 16 to 256, then multiples of 128."""
    return max(16, pow2(n)) if n <= 256 else -(-n // 128) * 128


def new_tokens_bucket(n: int) -> int:
    return max(16, pow2(n))


def _chunks(Tp: int) -> tuple[int, int]:
    """(first, C): a prefill of Tp tokens runs a first chunk of `first` tokens (0: none), then chunks of C."""
    C = min(Tp, PREFILL_CHUNK)
    return Tp % C, C


# --------------------------------------------------------------------------------------------- state
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


# ------------------------------------------------------------------------------------ token choice
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


def _keep(z_BxV, top_k_B, top_p_B):
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


def _draw(x_BxV, keys_B, step, temperature_B, top_k_B, top_p_B):
    """One draw per row from softmax(x / T) after top-k and top-p, by inverse CDF with one uniform per row
    (u = uniform(fold_in(row key, step)), step a scalar or one per row: the index of the token the row draws).
    Rows with temperature 0 get an arbitrary id (callers use argmax)."""
    B, V = x_BxV.shape
    z = x_BxV / jnp.where(temperature_B > 0, temperature_B, 1.0)[:, None]
    step_B = jnp.broadcast_to(jnp.asarray(step, jnp.int32), (B,))
    u_B = jax.vmap(lambda k, s: jax.random.uniform(jax.random.fold_in(k, s)))(keys_B, step_B)
    warp = (temperature_B > 0) & (((top_k_B > 0) & (top_k_B < V)) | (top_p_B < 1))
    keep = jax.lax.cond(jnp.any(warp), lambda: _keep(z, top_k_B, top_p_B), lambda: jnp.ones((B, V), bool))
    p = jnp.where(keep, jnp.exp(z - z.max(-1, keepdims=True)), 0.0)
    return _inverse_cdf(p, u_B)


@jax.jit
def sample_logits(logits_BxV, keys_B, step, temperature_B, top_k_B, top_p_B):
    """The sampler's draw for given (already penalised) logits; temperature 0 rows get the argmax. For tests
    and for callers with their own logits."""
    x = logits_BxV.astype(jnp.float32)
    tok = _draw(x, keys_B, step, temperature_B, top_k_B, top_p_B)
    return jnp.where(temperature_B > 0, tok, jnp.argmax(x, axis=-1).astype(jnp.int32))


@jax.jit
def warp_logits(logits_BxV, temperature_B, top_k_B, top_p_B):
    """Logits / temperature with -inf where top-k / top-p remove a token (transformers' Temperature ->
    TopK -> TopP warpers); for tests."""
    z = logits_BxV.astype(jnp.float32) / jnp.where(temperature_B > 0, temperature_B, 1.0)[:, None]
    return jnp.where(_keep(z, top_k_B, top_p_B), z, -jnp.inf)


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


def _select(st: State, logits_BxV, *, ngram: int, eos: tuple[int, ...], pad: int) -> State:
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
                           lambda: _draw(x, st.keys, t_B, st.temperature, st.top_k, st.top_p), lambda: greedy)
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


# ------------------------------------------------------------------------------------------- mesh
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


def _constrain_cache(cache: M.Cache, pl: Placement | None) -> M.Cache:
    if pl is None:
        return cache
    kv = pl.spec(MS.BATCH, pl.kv)
    wsc = jax.lax.with_sharding_constraint
    return M.Cache(k=[wsc(x, kv) for x in cache.k], v=[wsc(x, kv) for x in cache.v],
                   pos_BxS=wsc(cache.pos_BxS, pl.spec(MS.BATCH)), end=wsc(cache.end, pl.spec()))


def _constrain(st: State, pl: Placement | None) -> State:
    """Every [B, ...] field over data x fsdp, the cache as `_constrain_cache`, the step replicated."""
    if pl is None:
        return st
    rows = pl.spec(MS.BATCH)
    fields = {f.name: jax.lax.with_sharding_constraint(getattr(st, f.name), rows)
              for f in dataclasses.fields(State) if f.name not in ("cache", "step")}
    return State(cache=_constrain_cache(st.cache, pl), step=jax.lax.with_sharding_constraint(st.step, pl.spec()),
                 **fields)


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


def _put(x, pl: Placement | None):
    """A host array with a leading batch dim onto the mesh rows (as is without a mesh)."""
    return x if pl is None else MS.put(np.asarray(x), pl.spec(MS.BATCH))


# ------------------------------------------------------------------------------------ jitted parts
def _prefill_cache(params, cfg: M.Config, tokens_BxT, pos_BxT, cache: M.Cache) -> M.Cache:
    """Tokens into the cache in chunks of PREFILL_CHUNK (a lax.scan; the remainder first): bounded working
    memory, and each chunk attends to the slots filled so far only."""
    B, T = tokens_BxT.shape
    first, C = _chunks(T)
    if first:
        cache = M.apply(params, cfg, tokens_BxT[:, :first], pos_BxT[:, :first], cache)[1]
        tokens_BxT, pos_BxT, T = tokens_BxT[:, first:], pos_BxT[:, first:], T - first
    if C == T:
        return M.apply(params, cfg, tokens_BxT, pos_BxT, cache)[1]

    def body(cache, xs):
        return M.apply(params, cfg, xs[0], xs[1], cache)[1], None

    split = lambda a: a.reshape(B, T // C, C).transpose(1, 0, 2)  # noqa: E731
    return jax.lax.scan(body, cache, (split(tokens_BxT), split(pos_BxT)))[0]


def _fresh_rows(tokens_BxP, lens_B, Tn: int, V: int, pad: int, penalize_prompt: bool = True):
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
def _prefill(params, cache: M.Cache, tokens_BxP, lens_B, keys_B, limit_B, temperature_B, top_k_B, top_p_B,
             penalty_B, *, cfg: M.Config, place: Placement | None = None, penalize_prompt: bool = True) -> State:
    """All prompt tokens but the last into the (reused, donated) cache, in chunks; the last one is the first
    decode step's input, so the token choice (and the LM head) is compiled only once, in the decode."""
    TRACES["prefill"] += 1
    B, P = tokens_BxP.shape
    Tp = P - 1
    S = cache.pos_BxS.shape[1]
    fresh, valid = _fresh_rows(tokens_BxP, lens_B, S - Tp, cfg.vocab_size, cfg.pad_id or 0, penalize_prompt)
    cache = M.Cache(k=cache.k, v=cache.v, pos_BxS=jnp.full((B, S), -1, jnp.int32), end=jnp.zeros((), jnp.int32))
    cache = _prefill_cache(params, cfg, tokens_BxP[:, :Tp], M.positions(valid)[:, :Tp], _constrain_cache(cache, place))
    return _constrain(State(cache=cache, done=limit_B <= 0, step=jnp.zeros((), jnp.int32), keys=keys_B,
                            limit=limit_B, temperature=temperature_B, top_k=top_k_B, top_p=top_p_B, penalty=penalty_B,
                            **fresh), place)


@functools.partial(jax.jit, static_argnames=("cfg", "B", "S", "P", "Tn", "place"))
def _empty(key, *, cfg: M.Config, B: int, S: int, P: int, Tn: int, place: Placement | None) -> State:
    """A continuous-batching state with every slot free (done, limit 0) and an empty cache of S slots."""
    TRACES["empty"] += 1
    fresh, _ = _fresh_rows(jnp.zeros((B, P), jnp.int32), jnp.zeros((B,), jnp.int32), Tn, cfg.vocab_size,
                           cfg.pad_id or 0)
    zf, zi = jnp.zeros((B,), jnp.float32), jnp.zeros((B,), jnp.int32)
    return _constrain(State(cache=M.init_cache(cfg, B, S), done=jnp.ones((B,), bool), step=jnp.zeros((), jnp.int32),
                            keys=jax.random.split(key, B), limit=zi, temperature=zf, top_k=zi, top_p=zf + 1,
                            penalty=zf + 1, **fresh), place)


@functools.partial(jax.jit, static_argnames=("cfg", "place", "penalize_prompt"), donate_argnames=("st",))
def _insert(params, st: State, tokens_RxP, lens_R, slots_R, keys_R, limit_R, temperature_R, top_k_R, top_p_R,
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
    fresh, valid = _fresh_rows(tokens_RxP, lens_R, Tn, cfg.vocab_size, cfg.pad_id or 0, penalize_prompt)
    fresh["hist"] = jnp.concatenate([jnp.full((R, Pm - Pr), -1, jnp.int32), fresh["hist"]], axis=1)
    dt = st.cache.k[0].dtype
    new = _prefill_cache(params, cfg, tokens_RxP[:, :Tp], M.positions(valid)[:, :Tp], M.init_cache(cfg, R, Tp, dt))
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
    return _constrain(dataclasses.replace(st, cache=cache, **upd), place)


@functools.partial(jax.jit, static_argnames=("S", "P", "place"))
def _shrink(st: State, *, S: int, P: int, place: Placement | None = None) -> State:
    """Continuous batching: the same rows in a cache of S slots and prompts of P columns (both smaller). Each row
    keeps the last S slots of the ring before `end` (the next write then goes to slot 0), which hold all its keys
    when every running row's prompt tokens + limit fit in S; hist keeps its last P prompt columns."""
    TRACES["shrink"] += 1
    S0 = st.cache.pos_BxS.shape[1]
    idx = (st.cache.end - S + jnp.arange(S)) % S0
    cache = M.Cache(k=[jnp.take(k, idx, axis=3) for k in st.cache.k], v=[jnp.take(v, idx, axis=2) for v in st.cache.v],
                    pos_BxS=jnp.take(st.cache.pos_BxS, idx, axis=1), end=jnp.zeros((), jnp.int32))
    hist = st.hist[:, st.hist.shape[1] - st.out.shape[1] - P:]
    return _constrain(dataclasses.replace(st, cache=cache, hist=hist), place)


@functools.partial(jax.jit, static_argnames=("cfg", "ngram", "eos", "pad", "place"), donate_argnames=("st",))
def _decode(params, st: State, until, stop_B, want=None, *, cfg: M.Config, ngram: int, eos: tuple[int, ...],
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
        st = _select(dataclasses.replace(st, cache=cache), logits, ngram=ngram, eos=eos, pad=pad)
        return _constrain(st, place)

    return jax.lax.while_loop(cond, body, _constrain(st, place))


@jax.jit
def _row_keys(key, idx_B):
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(idx_B)


# ------------------------------------------------------------------------------------------ memory
def auto_batch_size(cfg: M.Config, prompt_len: int, max_new_tokens: int, budget_bytes: int | None = None,
                    max_batch: int | None = None, cache_dtype=None) -> int:
    """Largest power of two whose KV cache plus prefill/decode working memory fits the budget.
    budget_bytes: default = 85% of the free accelerator memory, or 4 GiB on CPU."""
    dev = jax.devices()[0]
    if budget_bytes is None:
        stats = dev.memory_stats() if dev.platform != "cpu" else None
        if stats and "bytes_limit" in stats:
            budget_bytes = int(0.85 * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)))
        else:
            budget_bytes = 4 << 30
    if max_batch is None:
        max_batch = 64 if dev.platform == "cpu" else 256
    Tp, Tn = cache_lengths(prompt_len, max_new_tokens)
    per_row = (M.cache_row_bytes(cfg, Tp + Tn, cache_dtype)
               + work_bytes(cfg, Tp, Tn, cfg.n_heads, cfg.intermediate, jnp.dtype(cfg.dtype).itemsize))
    b = max(1, budget_bytes // per_row)
    return int(max(1, min(max_batch, 1 << (int(b).bit_length() - 1))))


def cache_lengths(prompt_len: int, max_new_tokens: int) -> tuple[int, int]:
    """(prompt slots Tp, new-token slots Tn) of a batch's cache: the prompt but its last token, bucketed."""
    return prompt_bucket(max(1, prompt_len - 1)), new_tokens_bucket(max_new_tokens)


def work_bytes(cfg: M.Config, Tp: int, Tn: int, heads: int, inter: int, itemsize: int) -> int:
    """Working memory of one row besides its KV cache (`heads` / `inter`: the query heads and MLP width one
    device holds): the loop state, plus the prefill's (one chunk of tokens: the fp32 scores of one key block,
    the running output and the MLP activations) or the decode step's (fp32 logits and scores), the larger."""
    S, C = Tp + Tn, _chunks(Tp)[1]
    state = S * 8 + Tn * 8 + cfg.vocab_size
    keys = min(S, M.KEY_BLOCK)
    prefill = C * (3 * heads * keys * 4 + 2 * heads * cfg.head_dim * 4
                   + (3 * inter + 8 * cfg.hidden + 3 * heads * cfg.head_dim) * itemsize)
    decode = 10 * cfg.vocab_size * 4 + 3 * heads * S * 4
    return state + max(prefill, decode)


# -------------------------------------------------------------------------------------------- host
def _per_prompt(name, v, n, dtype):
    a = np.asarray(v, dtype)
    if a.ndim == 0:
        return np.full((n,), a, dtype)
    if a.shape != (n,):
        raise UserError(f"{name}: expected a scalar or {n} values (one per prompt), got shape {a.shape}")
    return a


def _tokenize(tokenizer, prompts, chat_template: bool) -> list[list[int]]:
    if all(isinstance(p, str) for p in prompts):
        texts = list(prompts)
        if chat_template:
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                   add_generation_prompt=True) for p in texts]
            return [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        return [list(x) for x in tokenizer(texts)["input_ids"]] if texts else []
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            raise UserError("prompts: give all strings or all token-id lists, not a mix")
        out.append([int(t) for t in p])
    return out


def _completion(tokenizer, tail: list[int], gen: list[int]) -> str:
    """Text of `gen` after the prompt (decoded after the prompt's last tokens), special tokens removed."""
    full = tokenizer.decode(tail + gen, skip_special_tokens=True)
    head = tokenizer.decode(tail, skip_special_tokens=True)
    return full[len(head):] if full.startswith(head) else tokenizer.decode(gen, skip_special_tokens=True)


def _find_stop(text: str, stop: Sequence[str]) -> int:
    """The first stop point (`template.find_cut`: a stop string at index 0 does not stop, as the authors'
    post-processing does not cut there)."""
    return find_cut(text, stop)


def _finish(tokenizer, tail, toks, logp, prompt_tokens, limit, eos, stop) -> Result:
    """A row's Result from its generated ids: cut at the first stop string (shortest token prefix whose text holds
    one), finish reason."""
    n_tok = len(toks)
    text = _completion(tokenizer, tail, toks)
    if stop and _find_stop(text, stop) >= 0:
        lo, hi = 1, n_tok  # shortest prefix whose text holds a stop string
        while lo < hi:
            mid = (lo + hi) // 2
            if _find_stop(_completion(tokenizer, tail, toks[:mid]), stop) >= 0:
                hi = mid
            else:
                lo = mid + 1
        toks = toks[:lo]
        text = _completion(tokenizer, tail, toks)
        return Result(text[:_find_stop(text, stop)], toks, list(logp[:lo]), "stop", prompt_tokens)
    if toks and toks[-1] in eos:
        reason = "eos"
    elif n_tok >= limit:
        reason = "length"
    else:
        reason = "context"
    return Result(text, toks, list(logp), reason, prompt_tokens)


@dataclasses.dataclass
class _Job:
    """What every batch of one generate call shares."""

    params: M.Params
    cfg: M.Config
    tokenizer: object
    ids: list  # token ids per prompt (after truncation)
    key: jax.Array
    temp: np.ndarray
    topk: np.ndarray
    topp: np.ndarray
    pen: np.ndarray
    limit: np.ndarray  # per prompt: max_new_tokens asked
    ngram: int
    eos: tuple
    pad: int
    stop: tuple
    every: int
    place: Placement | None
    penalize_prompt: bool = True  # False: penalties over the generated tokens only

    def kw(self):
        return dict(cfg=self.cfg, ngram=self.ngram, eos=self.eos, pad=self.pad, place=self.place)

    def rows(self, idx, R):
        """Per-row inputs of prompts idx padded to R rows: tokens [R, Tp+1] (left-padded), lens, limits, keys,
        sampling parameters (padding rows: limit 0)."""
        n = len(idx)
        lens = np.array([len(self.ids[i]) for i in idx] + [1] * (R - n), np.int32)
        Tp = prompt_bucket(int(lens.max()) - 1)  # the prefill takes all prompt tokens but the last
        tokens = np.full((R, Tp + 1), self.pad, np.int32)
        for r, i in enumerate(idx):
            tokens[r, Tp + 1 - lens[r]:] = self.ids[i]
        limit = np.zeros((R,), np.int32)
        limit[:n] = np.minimum(self.limit[idx], self.cfg.max_pos - lens[:n])

        def padded(a, fill):
            return np.concatenate([a[idx], np.full((R - n,), fill, a.dtype)])

        keys = _row_keys(self.key, np.array(list(idx) + [0] * (R - n), np.uint32))
        pl = self.place
        return (_put(tokens, pl), _put(lens, pl), keys, _put(limit, pl), _put(padded(self.temp, 0), pl),
                _put(padded(self.topk, 0), pl), _put(padded(self.topp, 1), pl), _put(padded(self.pen, 1), pl))

    def result(self, i, toks, logp) -> Result:
        t = self.ids[i]
        return _finish(self.tokenizer, t[-PROMPT_TAIL:], toks, logp, len(t), int(self.limit[i]), self.eos, self.stop)

    def check_stops(self, idx_of_row, out, length, stopped):
        """Mark rows whose completion so far holds a stop string (host side, exact)."""
        for r, i in idx_of_row.items():
            if not stopped[r] and length[r] > 0 and _find_stop(_completion(
                    self.tokenizer, self.ids[i][-PROMPT_TAIL:], out[r, :length[r]].tolist()), self.stop) >= 0:
                stopped[r] = True


def _timed(phase: str, fn):
    """fn(); with PROFILE set, waits for its result and adds the seconds to PROFILE[phase]."""
    if PROFILE is None:
        return fn()
    t = time.perf_counter()
    out = jax.block_until_ready(fn())
    PROFILE[phase] += time.perf_counter() - t
    return out


def _batch_rows(n: int, cap: int, mult: int) -> int:
    """Rows of a batch for n prompts: a power of two (at most cap), a multiple of the mesh's row count."""
    B = pow2(n) if pow2(n) <= cap else cap
    return -(-B // mult) * mult


def generate(params: M.Params, cfg: M.Config, tokenizer, prompts: Sequence[str] | Sequence[Sequence[int]], *,
             max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
             no_repeat_ngram: int = 0, stop: Sequence[str] = MARKERS, seed: int = 0, key=None,
             batch_size: int | None = None, memory_budget: int | None = None, chat_template: bool = False,
             truncate: str = "left", ignore_eos: bool = False, stop_check_every: int = 8,
             progress: bool = False, in_out_weights: bool | None = None, mesh=None,
             continuous: bool = False, penalize_prompt: bool = True) -> list[Result]:
    """Generate a completion for every prompt; results in input order (see the module docstring).
    penalize_prompt=False: the repetition penalty and the n-gram ban see the generated tokens only
    (transformers' `generate`, the default, applies both to prompt + generated ids)."""
    n = len(prompts)
    if no_repeat_ngram < 0 or stop_check_every < 1:
        raise UserError("no_repeat_ngram must be >= 0, stop_check_every >= 1")
    if truncate not in ("left", "error"):
        raise UserError(f"truncate: expected 'left' or 'error', got {truncate!r}")
    limit = _per_prompt("max_new_tokens", max_new_tokens, n, np.int64)
    if (limit < 0).any():
        raise UserError("max_new_tokens must be >= 0")
    temp = _per_prompt("temperature", temperature, n, np.float32)
    topk = _per_prompt("top_k", top_k, n, np.int32)
    topp = _per_prompt("top_p", top_p, n, np.float32)
    pen = _per_prompt("repetition_penalty", repetition_penalty, n, np.float32)
    if (temp < 0).any() or not np.isfinite(temp).all():
        raise UserError("temperature must be >= 0 (0 = greedy)")
    if (topk < 0).any():
        raise UserError("top_k must be >= 0 (0 = off)")
    if ((topp <= 0) | (topp > 1)).any():
        raise UserError("top_p must be in (0, 1] (1 = off)")
    if (pen <= 0).any():
        raise UserError("repetition_penalty must be > 0 (1 = off)")
    stop = tuple(s for s in (stop or ()) if s)
    if key is None:
        key = jax.random.key(seed)
    ids, truncated = tokenize_prompts(tokenizer, prompts, cfg, chat_template, truncate)
    if n == 0:
        return []
    results: list[Result | None] = [None] * n
    for i in range(n):
        if limit[i] == 0:
            results[i] = Result("", [], [], "length", len(ids[i]), truncated[i])
    todo = [i for i in range(n) if limit[i] > 0]
    if not todo:
        return results
    params, place = prepare(params, cfg, mesh, in_out_weights)
    job = _Job(params, cfg, tokenizer, ids, key, temp, topk, topp, pen, limit, int(no_repeat_ngram),
               eos_ids(cfg, tokenizer, ignore_eos), int(cfg.pad_id if cfg.pad_id is not None else 0), stop,
               stop_check_every, place, bool(penalize_prompt))
    order = sorted(todo, key=lambda i: -len(ids[i]))
    if batch_size is None:
        batch_size = auto_batch_size(cfg, len(ids[order[0]]), int(limit.max()), memory_budget)
        if place is not None:
            batch_size *= place.rows
    mult = 1 if place is None else place.rows
    batch_size = -(-max(1, int(batch_size)) // mult) * mult
    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc="generate", unit="prompt", disable=not progress, leave=False)

    def done(i, r):
        r.truncated = truncated[i]
        results[i] = r
        bar.update(1)

    if continuous:
        _run_continuous(job, order, batch_size, done)
    else:
        spare: dict = {}
        for b0 in range(0, len(order), batch_size):
            rows = order[b0:b0 + batch_size]
            for i, r in zip(rows, _run_batch(job, rows, _batch_rows(len(rows), batch_size, mult), spare)):
                done(i, r)
    bar.close()
    return results


def tokenize_prompts(tokenizer, prompts, cfg: M.Config, chat_template: bool = False, truncate: str = "left"):
    """(token ids per prompt, tokens dropped from the left per prompt): see the module docstring."""
    ids = _tokenize(tokenizer, prompts, chat_template)
    bos = getattr(tokenizer, "bos_token_id", None)
    ctx = cfg.max_pos
    truncated = [0] * len(ids)
    for i, t in enumerate(ids):
        name = f"prompt {i + 1}"  # 1-based: `selfalign generate` names the file and line
        if not t:
            raise UserError(f"{name}: the prompt has no tokens (empty prompt and the tokenizer adds no BOS)")
        if len(t) > ctx - 1:
            if truncate == "error":
                raise UserError(f"{name}: the prompt has {len(t)} tokens; the context length is {ctx}")
            keep_bos = bos is not None and t[0] == bos
            cut = len(t) - (ctx - 1)
            ids[i] = ([bos] + t[1 + cut:]) if keep_bos else t[cut:]
            truncated[i] = cut
    return ids, truncated


def eos_ids(cfg: M.Config, tokenizer, ignore_eos: bool = False) -> tuple[int, ...]:
    """cfg.eos_ids plus the tokenizer's EOS id, sorted (() with ignore_eos)."""
    eos = set(cfg.eos_ids)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        eos.add(int(tokenizer.eos_token_id))
    return () if ignore_eos else tuple(sorted(eos))


def prepare(params: M.Params, cfg: M.Config, mesh, in_out_weights: bool | None):
    """(params placed on the mesh and in the inference layout, Placement or None)."""
    place = placement(cfg, mesh)
    if place is not None:
        params = place_params(params, cfg, mesh)
    if in_out_weights is None:  # CPU: decode matmuls are ~20% faster on [in, out] weights (a transient copy)
        in_out_weights = jax.default_backend() == "cpu" and M.num_params(params) * 4 <= (8 << 30)
    if in_out_weights:
        params = M.inference_layout(params)
    return params, place


def _run_batch(job: _Job, idx, B, spare) -> list[Result]:
    """Static batching: prompts idx in one batch of B rows, decoded until the last row ends."""
    nb = len(idx)
    tokens, lens, keys, limit, temp, topk, topp, pen = job.rows(idx, B)
    Tp = tokens.shape[1] - 1
    Tn = new_tokens_bucket(int(host(limit).max()))
    cache = spare.pop((B, Tp + Tn), None)
    spare.clear()
    if cache is None:
        cache = _init_cache(cfg=job.cfg, B=B, S=Tp + Tn, place=job.place)
    st = _timed("prefill", lambda: _prefill(job.params, cache, tokens, lens, keys, limit, temp, topk, topp, pen,
                                             cfg=job.cfg, place=job.place,
                                             penalize_prompt=job.penalize_prompt))
    stopped = np.zeros((B,), bool)
    while True:
        until = min(int(host(st.step)) + job.every, Tn) if job.stop else Tn
        st = _timed("decode", lambda: _decode(job.params, st, np.int32(until), _put(stopped, job.place), **job.kw()))
        out, length, done, step = host((st.out, st.length, st.done, st.step))
        if job.stop:
            job.check_stops({r: i for r, i in enumerate(idx) if not done[r]}, out, length, stopped)
        if (done | stopped)[:nb].all() or step >= Tn:
            break
    spare[(B, Tp + Tn)] = st.cache
    logp = host(st.logp)
    return [job.result(i, out[r, :length[r]].tolist(), logp[r, :length[r]].tolist()) for r, i in enumerate(idx)]


@functools.partial(jax.jit, static_argnames=("cfg", "B", "S", "place"))
def _init_cache(*, cfg: M.Config, B: int, S: int, place: Placement | None) -> M.Cache:
    return _constrain_cache(M.init_cache(cfg, B, S), place)


def _run_continuous(job: _Job, order, B, done) -> None:
    """Continuous batching over B slots: whenever rows end (EOS, limit, stop string), the next pending prompts
    are prefilled into their slots (`_insert`) and the decode goes on, until the queue is empty."""
    ids = job.ids
    lim = np.minimum(job.limit[order], job.cfg.max_pos - np.array([len(ids[i]) for i in order]))
    Tp_max = prompt_bucket(max(len(ids[i]) for i in order) - 1)
    Tn = new_tokens_bucket(int(lim.max()))
    B = min(B, _batch_rows(len(order), B, 1 if job.place is None else job.place.rows))
    st = _empty(jax.random.key(0), cfg=job.cfg, B=B, S=Tp_max + Tn, P=Tp_max + 1, Tn=Tn, place=job.place)
    pending = collections.deque(order)
    slot: dict[int, int] = {}  # row -> prompt index
    stopped = np.ones((B,), bool)
    mult = 1 if job.place is None else job.place.rows
    Tp = Tp_max
    while True:
        # the queue is longest first: once the running rows' prompts and the pending ones fit half the prompt
        # slots, decode over a cache half as long (or less); a row's keys are its prompt tokens (the rest of
        # its insert's padded slots hold none) and its new tokens
        lens = [len(ids[i]) for i in slot.values()] + ([len(ids[pending[0]])] if pending else [])
        need = prompt_bucket(max(lens, default=1) - 1)
        if (pending or slot) and Tp >= SHRINK_FROM and need <= Tp // 2:
            Tp = need
            st = _shrink(st, S=Tp + Tn, P=Tp + 1, place=job.place)
        free = [r for r in range(B) if r not in slot]
        if pending and free:
            take = [pending.popleft() for _ in range(min(len(free), len(pending)))]
            R = min(B, -(-pow2(len(take)) // mult) * mult)
            rows = free[:len(take)]
            slots = _put(np.array(rows + [B] * (R - len(take)), np.int32), job.place)
            st = _timed("prefill", lambda: _insert(job.params, st, *_with_slots(job.rows(take, R), slots), cfg=job.cfg,
                                                   place=job.place, penalize_prompt=job.penalize_prompt))
            for r, i in zip(rows, take):
                slot[r] = i
                stopped[r] = False
        if not slot:
            break
        until = int(host(st.step)) + job.every if job.stop else np.iinfo(np.int32).max
        want = 1 if pending else B + 1
        st = _timed("decode", lambda: _decode(job.params, st, np.int32(until), _put(stopped, job.place), np.int32(want),
                                              **job.kw()))
        out, length, fin = host((st.out, st.length, st.done))
        if job.stop:
            job.check_stops({r: i for r, i in slot.items() if not fin[r]}, out, length, stopped)
        ended = [r for r in slot if fin[r] or stopped[r]]
        if ended:
            logp = host(st.logp)
            for r in ended:
                i = slot.pop(r)
                stopped[r] = True
                done(i, job.result(i, out[r, :length[r]].tolist(), logp[r, :length[r]].tolist()))


def _with_slots(rows, slots):
    tokens, lens, keys, limit, temp, topk, topp, pen = rows
    return tokens, lens, slots, keys, limit, temp, topk, topp, pen
