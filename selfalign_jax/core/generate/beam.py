"""Beam search and beam-sample with transformers' `generate(num_beams=...)` semantics, jitted.

Entry: sampler.generate with gen.num_beams > 1 (gen.do_sample: beam-sample) calls run(job, order, batch_size,
done); a prompt's Result is its best-scoring finished hypothesis (token_ids, logprobs under the unprocessed
distribution, text cut before the first stop string).

Semantics (transformers v5 `_beam_search`, per prompt, beams as rows of the batch)
    Each step: log_softmax of the logits -> repetition penalty, no-repeat-ngram (on the log-probs, over the
    prompt + the beam's tokens) -> exponential_decay_length_penalty (start, factor): after `start` generated
    tokens the EOS log-prob s becomes s + |s| (factor^(t - start) - 1) -> with do_sample: temperature, top-k,
    top-p (keeping at least max(2, 1 + #EOS) tokens) -> plus the beam's running score. K = max(2, 1 + #EOS) x
    num_beams candidates over all beams x vocabulary: the top K, or with do_sample K drawn without replacement
    from softmax(scores) (Gumbel top-k: the order of the draws is kept, as torch.multinomial's). A candidate
    ending in EOS, or at the length limit, among the first num_beams becomes a finished hypothesis with score
    sum / (generated length)^length_penalty; the num_beams best unfinished candidates go on. A prompt stops when
    every candidate hits the limit, or early_stopping=True and num_beams hypotheses are finished, or (False /
    "never") transformers' heuristic says no running beam can beat the worst kept hypothesis. The returned
    sequence is the best finished hypothesis. (transformers 4.31, the authors' version, multiplied the EOS
    score in the decay penalty, i.e. pushed EOS down, and counted the prompt in the length normaliser; we follow
    the current semantics.)
    Stop strings are applied after the search (the text is cut before the first one), as the authors cut at
    the template marker; use them for the cut, not to end beams early.

Determinism: prompt i draws step t's Gumbel noise from fold_in(fold_in(key, i), t): the output for a key does
not depend on the batch size or on the other prompts.

How it runs: prompts sorted by length, batches of n prompts x num_beams rows; one jitted function prefills the
n prompts, repeats each cache row num_beams times, and runs a lax.while_loop of steps (model, scores, candidate
selection, cache rows gathered within each prompt's beams, on the device) until every prompt is done. On a mesh
the prompts go over data x fsdp (each prompt's beams on one shard, so the reordering is local).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from selfalign_jax.core import mesh as MS
from selfalign_jax.core import model as M
from selfalign_jax.core.generate.cache import Placement, constrain_cache, host, new_tokens_bucket, prefill_cache
from selfalign_jax.core.generate.choose import keep_mask, ngram_ban, repetition_penalty
from selfalign_jax.core.generate.prompts import Job
from selfalign_jax.core.generate.sizing import batch_rows
from selfalign_jax.core.generate.steps import TRACES, fresh_rows

NEG = -1.0e9  # transformers' "impossible" score


@functools.partial(jax.tree_util.register_dataclass, data_fields=[
    "cache", "hist", "seen", "out", "logp", "last", "pos", "score", "fin_out", "fin_logp", "fin_len", "fin_score",
    "fin_done", "open", "active", "t"], meta_fields=[])
@dataclasses.dataclass
class BeamState:
    """n prompts x nb beams; rows (cache, hist, ...) are prompt-major: row p * nb + j is beam j of prompt p."""

    cache: M.Cache
    hist: jax.Array  # [n*nb, P+Tn] prompt + the running beam's ids, -1 at padding
    seen: jax.Array  # [n*nb, V] bool
    out: jax.Array  # [n*nb, Tn] the running beam's ids
    logp: jax.Array  # [n*nb, Tn] their unprocessed log-probs
    last: jax.Array  # [n*nb] next input token
    pos: jax.Array  # [n*nb] its position
    score: jax.Array  # [n, nb] running beam scores
    fin_out: jax.Array  # [n, nb, Tn] finished hypotheses, best first
    fin_logp: jax.Array  # [n, nb, Tn]
    fin_len: jax.Array  # [n, nb]
    fin_score: jax.Array  # [n, nb]
    fin_done: jax.Array  # [n, nb] bool (transformers' is_sent_finished)
    open: jax.Array  # [n] bool: a running beam may still beat the worst hypothesis (the early-stop heuristic)
    active: jax.Array  # [n] bool: still searching
    t: jax.Array  # () int32 tokens generated so far


def _gather(x, idx):
    """x[n, nb_or_K, ...] gathered along axis 1 by idx[n, m]."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _constrain(st: BeamState, pl: Placement | None) -> BeamState:
    if pl is None:
        return st
    rows = pl.spec(MS.BATCH)
    wsc = jax.lax.with_sharding_constraint
    return BeamState(cache=constrain_cache(st.cache, pl), t=wsc(st.t, pl.spec()),
                     **{f.name: wsc(getattr(st, f.name), rows) for f in dataclasses.fields(BeamState)
                        if f.name not in ("cache", "t")})


def _min_keep(eos) -> int:
    return max(2, 1 + len(eos))


def _warp(x_RxV, temperature_R, top_k_R, top_p_R, keep_min: int):
    """transformers' Temperature -> TopK -> TopP warpers with min_tokens_to_keep = keep_min."""
    z = x_RxV / temperature_R[:, None]
    k = jnp.where(top_k_R > 0, jnp.maximum(top_k_R, keep_min), 0)
    keep = keep_mask(z, k, top_p_R)
    kth = jax.lax.top_k(z, keep_min)[0][:, -1:]
    keep |= (z >= kth) & (top_p_R < 1)[:, None]  # TopP's min_tokens_to_keep
    return jnp.where(keep, z, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("cfg", "nb", "Tn", "sample", "early", "ngram", "eos", "pad", "place",
                                             "penalize_prompt"))
def _search(params, tokens_nxP, lens_n, keys_n, limit_n, temperature_n, top_k_n, top_p_n, penalty_n, length_penalty,
            decay_start, decay_factor, *, cfg: M.Config, nb: int, Tn: int, sample: bool, early, ngram: int,
            eos: tuple[int, ...], pad: int, place: Placement | None,
            penalize_prompt: bool = True) -> BeamState:
    TRACES["beam"] += 1
    n, P = tokens_nxP.shape
    Tp, V, R = P - 1, cfg.vocab_size, n * nb
    K = _min_keep(eos) * nb
    fresh, valid = fresh_rows(tokens_nxP, lens_n, Tn, V, pad, penalize_prompt)
    cache = prefill_cache(params, cfg, tokens_nxP[:, :Tp], M.positions(valid)[:, :Tp],
                          constrain_cache(M.init_cache(cfg, n, Tp + Tn), place))
    rep = lambda x: jnp.repeat(x, nb, axis=0)  # noqa: E731
    cache = M.Cache(k=[rep(x) for x in cache.k], v=[rep(x) for x in cache.v], pos_BxS=rep(cache.pos_BxS),
                    end=cache.end)
    score0 = jnp.where(jnp.arange(nb) == 0, 0.0, NEG)[None, :].repeat(n, 0)
    st = BeamState(cache=cache, hist=rep(fresh["hist"]), seen=rep(fresh["seen"]), out=rep(fresh["out"]),
                   logp=rep(fresh["logp"]), last=rep(fresh["last"]), pos=rep(fresh["pos"]), score=score0,
                   fin_out=jnp.full((n, nb, Tn), pad, jnp.int32), fin_logp=jnp.zeros((n, nb, Tn), jnp.float32),
                   fin_len=jnp.zeros((n, nb), jnp.int32), fin_score=jnp.full((n, nb), NEG, jnp.float32),
                   fin_done=jnp.zeros((n, nb), bool), open=jnp.ones((n,), bool), active=limit_n > 0,
                   t=jnp.zeros((), jnp.int32))
    start = P - lens_n  # first real column of hist (per prompt)
    eos_a = jnp.asarray(eos, jnp.int32) if eos else None
    per_row = lambda x: jnp.repeat(x, nb, axis=0)  # noqa: E731
    top_mask = jnp.arange(K) < nb

    def body(st: BeamState) -> BeamState:
        t = st.t
        h, cache = M.apply(params, cfg, st.last[:, None], st.pos[:, None], st.cache)
        raw = jax.nn.log_softmax(M.logits(params, cfg, h[:, 0]).astype(jnp.float32), axis=-1)  # [R, V]
        x = repetition_penalty(raw, st.seen, per_row(penalty_n))
        if ngram > 0:
            x = jnp.where(ngram_ban(st.hist, per_row(start), P + t, ngram, V), -jnp.inf, x)
        if eos:
            e = x[:, eos_a]
            pen = jnp.abs(e) * (decay_factor ** (t - decay_start).astype(jnp.float32) - 1.0)
            e = jnp.where((t > decay_start) & jnp.isfinite(e), e + pen, e)
            x = x.at[:, eos_a].set(e)
        if sample:
            x = _warp(x, per_row(temperature_n), per_row(top_k_n), per_row(top_p_n), _min_keep(eos))
        acc = (x.reshape(n, nb, V) + st.score[:, :, None]).reshape(n, nb * V)
        if sample:
            g = jax.vmap(lambda k: jax.random.gumbel(jax.random.fold_in(k, t), (nb * V,)))(keys_n)
            idx = jax.lax.top_k(acc + g, K)[1]
            vals = jnp.take_along_axis(acc, idx, axis=1)
        else:
            vals, idx = jax.lax.top_k(acc, K)
        src, tok = idx // V, (idx % V).astype(jnp.int32)  # [n, K]
        hits = jnp.broadcast_to((t + 1 >= limit_n)[:, None], (n, K))
        if eos:
            hits = hits | jnp.isin(tok, eos_a)
        raw_lp = jnp.take_along_axis(raw.reshape(n, nb * V), idx, axis=1)  # unprocessed log-prob of each candidate
        # candidate sequences: the source beam's tokens with tok at column t
        out_n = st.out.reshape(n, nb, Tn)
        logp_n = st.logp.reshape(n, nb, Tn)
        col = jnp.arange(Tn) == t
        c_out = jnp.where(col, tok[:, :, None], _gather(out_n, src))
        c_logp = jnp.where(col, raw_lp[:, :, None], _gather(logp_n, src))
        # running beams: the nb best candidates that did not end
        run_lp = vals + hits * NEG
        nxt = jax.lax.top_k(run_lp, nb)[1]
        r_src, r_tok, r_score = _gather(src, nxt), _gather(tok, nxt), _gather(run_lp, nxt)
        # finished hypotheses
        full = jnp.all(st.fin_done, axis=1, keepdims=True) & (early is True)
        just = hits & top_mask[None, :]
        c_score = vals / ((t + 1).astype(jnp.float32) ** length_penalty)
        c_score = c_score + full * NEG + (~st.open)[:, None] * NEG + (~just) * NEG
        m_score = jnp.concatenate([st.fin_score, c_score], axis=1)
        keep = jax.lax.top_k(m_score, nb)[1]
        cat = lambda a, b: _gather(jnp.concatenate([a, b], axis=1), keep)  # noqa: E731
        fin = dict(fin_out=cat(st.fin_out, c_out), fin_logp=cat(st.fin_logp, c_logp),
                   fin_len=cat(st.fin_len, jnp.broadcast_to(t + 1, (n, K))), fin_score=_gather(m_score, keep),
                   fin_done=cat(st.fin_done, just))
        # reorder the rows (cache included) to the running beams' sources, then append their tokens
        def take(a):  # rows gathered within each prompt's beams (local to a shard on a mesh)
            return _gather(a.reshape((n, nb) + a.shape[1:]), r_src).reshape(a.shape)

        cache = M.Cache(k=[take(a) for a in cache.k], v=[take(a) for a in cache.v], pos_BxS=take(cache.pos_BxS),
                        end=cache.end)
        r_tok = r_tok.reshape(R)
        r_lp = jnp.take_along_axis(c_logp, nxt[:, :, None].repeat(Tn, 2), axis=1).reshape(R, Tn)
        new = dict(
            cache=cache,
            hist=take(st.hist).at[:, P + t].set(r_tok),
            seen=take(st.seen).at[jnp.arange(R), r_tok].set(True),
            out=take(st.out).at[:, t].set(r_tok), logp=r_lp, last=r_tok, pos=st.pos + 1, score=r_score, **fin)
        # the early-stop heuristic and the end of each prompt's search
        tl = (t + 1).astype(jnp.float32)
        best_len = jnp.where(length_penalty > 0, limit_n.astype(jnp.float32), tl) if early == "never" else tl
        best = r_score[:, 0] / best_len ** length_penalty
        worst = jnp.where(fin["fin_done"], jnp.min(fin["fin_score"], axis=1, keepdims=True), NEG)
        opened = st.open & jnp.any(best[:, None] > worst, axis=1)
        ended = ~opened | (jnp.all(fin["fin_done"], axis=1) & (early is True)) | jnp.all(hits, axis=1)
        act = st.active

        def pick(a, b):  # new values for active prompts, old ones for done prompts
            if a.shape[0] == n:
                return jnp.where(act.reshape((n,) + (1,) * (a.ndim - 1)), a, b)
            return jnp.where(per_row(act).reshape((R,) + (1,) * (a.ndim - 1)), a, b)

        upd = {k: pick(v, getattr(st, k)) for k, v in new.items() if k != "cache"}
        return _constrain(dataclasses.replace(st, cache=new["cache"], open=jnp.where(act, opened, st.open),
                                              active=act & ~ended, t=t + 1, **upd), place)

    return jax.lax.while_loop(lambda st: jnp.any(st.active) & (st.t < Tn), body, _constrain(st, place))


def run(job: Job, order, batch_size: int, done) -> None:
    """Every prompt of `order` in batches of `batch_size` prompts x gen.num_beams rows; done(i, Result) per prompt."""
    gen = job.gen
    decay = gen.exponential_decay_length_penalty or (0, 1.0)
    for b0 in range(0, len(order), batch_size):
        idx = order[b0:b0 + batch_size]
        nP = batch_rows(len(idx), batch_size, job.rows_multiple)
        tokens, lens, keys, lim, t_, k_, p_, r_ = job.rows(idx, nP)
        Tn = new_tokens_bucket(int(np.asarray(lim).max()))
        st = _search(job.params, tokens, lens, keys, lim, t_, k_, p_, r_, np.float32(gen.length_penalty),
                     np.int32(decay[0]), np.float32(decay[1]), cfg=job.cfg, nb=int(gen.num_beams), Tn=Tn,
                     sample=bool(gen.do_sample), early=gen.early_stopping, ngram=int(gen.no_repeat_ngram),
                     eos=job.eos, pad=job.pad, place=job.place, penalize_prompt=bool(gen.penalize_prompt))
        out, logp, length = host((st.fin_out[:, 0], st.fin_logp[:, 0], st.fin_len[:, 0]))
        for r, i in enumerate(idx):
            done(i, job.result(i, out[r, :length[r]].tolist(), logp[r, :length[r]].tolist()))
