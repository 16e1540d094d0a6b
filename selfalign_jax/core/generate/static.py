"""Static batching: prompts (longest first) in batches of at most `batch_size` rows, each prefilled into a KV
cache of its own padded lengths and decoded until its last row ends. A cache is donated to the prefill and
reused by the next batch of the same shape."""

from __future__ import annotations

import numpy as np

from selfalign_jax.core.generate.cache import host, init_cache, new_tokens_bucket, to_rows
from selfalign_jax.core.generate.prompts import Job, Result
from selfalign_jax.core.generate.sizing import batch_rows
from selfalign_jax.core.generate.steps import decode, prefill, timed


def run(job: Job, order, batch_size: int, done) -> None:
    """Every prompt of `order` in batches of `batch_size` rows; done(i, Result) as each batch ends."""
    spare: dict = {}
    for b0 in range(0, len(order), batch_size):
        idx = order[b0:b0 + batch_size]
        for i, r in zip(idx, _run_batch(job, idx, batch_rows(len(idx), batch_size, job.rows_multiple), spare)):
            done(i, r)


def _run_batch(job: Job, idx, B, spare) -> list[Result]:
    """Static batching: prompts idx in one batch of B rows, decoded until the last row ends."""
    nb = len(idx)
    tokens, lens, keys, limit, temp, topk, topp, pen = job.rows(idx, B)
    Tp = tokens.shape[1] - 1
    Tn = new_tokens_bucket(int(host(limit).max()))
    cache = spare.pop((B, Tp + Tn), None)
    spare.clear()
    if cache is None:
        cache = init_cache(cfg=job.cfg, B=B, S=Tp + Tn, place=job.place)
    st = timed("prefill", lambda: prefill(job.params, cache, tokens, lens, keys, limit, temp, topk, topp, pen,
                                            cfg=job.cfg, place=job.place,
                                            penalize_prompt=job.gen.penalize_prompt))
    stopped = np.zeros((B,), bool)
    while True:
        until = min(int(host(st.step)) + job.every, Tn) if job.stop else Tn
        st = timed("decode", lambda: decode(job.params, st, np.int32(until), to_rows(stopped, job.place), **job.kw()))
        out, length, done, step = host((st.out, st.length, st.done, st.step))
        if job.stop:
            job.check_stops({r: i for r, i in enumerate(idx) if not done[r]}, out, length, stopped)
        if (done | stopped)[:nb].all() or step >= Tn:
            break
    spare[(B, Tp + Tn)] = st.cache
    logp = host(st.logp)
    return [job.result(i, out[r, :length[r]].tolist(), logp[r, :length[r]].tolist()) for r, i in enumerate(idx)]
