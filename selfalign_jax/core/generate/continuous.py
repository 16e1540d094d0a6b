"""Continuous batching: a fixed number of slots (batch_size rows) and one cache of S = Tp_max + Tn slots (the
longest prompt's and the largest limit's buckets). Whenever rows end (EOS, limit, stop string) the decode loop
returns (it exits as soon as one more row is done while prompts are pending), their results are taken, and the
next pending prompts (longest first) are prefilled into those rows (`steps.insert`: R rows at a time, R a power
of two and at most `sizing.insert_rows`, a quarter of the batch) and decoding goes on until the queue is empty.

The cache is a ring: every row writes its next token at the slot `end` (mod S), and a new prompt's keys go to the
Tp slots before `end`, i.e. the static layout rotated; attention is by position, so each row computes what it
would alone (the rotation only reorders a sum). Since the queue is longest first, the cache shrinks as it goes:
once the buckets of the running rows' prompts and of the longest pending one fit half of Tp (from Tp >=
SHRINK_FROM on), every row keeps the last S' = Tp' + Tn slots of its ring (`steps.shrink`) and the decode attends
over S' slots, not S. Compiles: one decode, one insertion per (R, prompt bucket), and those again per cache size a
call shrinks to (at most log2(Tp_max / 256) sizes). A row's t-th token uses fold_in(row key, t) as in static
batching, so the output for a key does not depend on the slot.
"""

from __future__ import annotations

import collections

import jax
import numpy as np

from selfalign_jax.core.buckets import pow2
from selfalign_jax.core.generate.cache import host, new_tokens_bucket, prompt_bucket, to_rows
from selfalign_jax.core.generate.prompts import Job
from selfalign_jax.core.generate.sizing import batch_rows, insert_rows
from selfalign_jax.core.generate.steps import decode, empty, insert, shrink, timed

SHRINK_FROM = 512  # the cache shrinks from prompt buckets this long up (below: not worth a compile)


def run(job: Job, order, B: int, done) -> None:
    """Continuous batching over B slots: whenever rows end (EOS, limit, stop string), the next pending prompts
    are prefilled into their slots (`insert`) and the decode goes on, until the queue is empty."""
    ids = job.ids
    lim = np.minimum(job.limit[order], job.cfg.max_pos - np.array([len(ids[i]) for i in order]))
    Tp_max = prompt_bucket(max(len(ids[i]) for i in order) - 1)
    Tn = new_tokens_bucket(int(lim.max()))
    mult = job.rows_multiple
    B = min(B, batch_rows(len(order), B, mult))
    cap = insert_rows(B, mult)
    st = empty(jax.random.key(0), cfg=job.cfg, B=B, S=Tp_max + Tn, P=Tp_max + 1, Tn=Tn, place=job.place)
    pending = collections.deque(order)
    slot: dict[int, int] = {}  # row -> prompt index
    stopped = np.ones((B,), bool)
    Tp = Tp_max
    while True:
        # the queue is longest first: once the running rows' prompts and the pending ones fit half the prompt
        # slots, decode over a cache half as long (or less); a row's keys are its prompt tokens (the rest of
        # its insert's padded slots hold none) and its new tokens
        lens = [len(ids[i]) for i in slot.values()] + ([len(ids[pending[0]])] if pending else [])
        need = prompt_bucket(max(lens, default=1) - 1)
        if (pending or slot) and Tp >= SHRINK_FROM and need <= Tp // 2:
            Tp = need
            st = shrink(st, S=Tp + Tn, P=Tp + 1, place=job.place)
        free = [r for r in range(B) if r not in slot]
        while pending and free:  # at most `cap` prompts an insertion: its own cache and prefill stay small
            take = [pending.popleft() for _ in range(min(len(free), len(pending), cap))]
            R = min(B, -(-pow2(len(take)) // mult) * mult)
            rows, free = free[:len(take)], free[len(take):]
            slots = to_rows(np.array(rows + [B] * (R - len(take)), np.int32), job.place)
            st = timed("prefill", lambda: insert(job.params, st, *with_slots(job.rows(take, R), slots), cfg=job.cfg,
                                                   place=job.place, penalize_prompt=job.gen.penalize_prompt))
            for r, i in zip(rows, take):
                slot[r] = i
                stopped[r] = False
        if not slot:
            break
        until = int(host(st.step)) + job.every if job.stop else np.iinfo(np.int32).max
        want = 1 if pending else B + 1
        st = timed("decode", lambda: decode(job.params, st, np.int32(until), to_rows(stopped, job.place),
                                             np.int32(want), **job.kw()))
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


def with_slots(rows, slots):
    tokens, lens, keys, limit, temp, topk, topp, pen = rows
    return tokens, lens, slots, keys, limit, temp, topk, topp, pen
