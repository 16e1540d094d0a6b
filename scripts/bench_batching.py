"""What uniformly random SFT batches cost against length-grouped ones (issue 16 item 6).

An ISARA-like SFT set: 64 "seeds" of N(180, 50) tokens and 300 "generated" pairs of N(110, 30) tokens
(clipped to [24, 512]; the answer is the last 40%), effective batch 32 (32 x 1), 64-token length buckets,
a small random Llama (default 2 layers, hidden 128, vocab 8000, fp32; --layers / --hidden / --vocab).
One epoch (12 steps) per mode (`plan_epoch(..., group_lengths=False|True)`), after an untimed epoch per
mode that compiles every batch shape; the modes alternate for --rounds rounds. Reported per mode: median
and spread of the epoch time, padded share of the input positions, and seeds per step. Timings are from
whatever machine runs it (the development machine has 2 shared cores, so expect noise).

    python scripts/bench_batching.py [--rounds 3]

Last line: JSON with the figures.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfalign_jax import batching, train  # noqa: E402
from selfalign_jax import model as M  # noqa: E402


def data(seed=0, vocab=8000) -> tuple[batching.Encoded, np.ndarray]:
    rng = np.random.default_rng(seed)
    lens = np.concatenate([rng.normal(180, 50, 64), rng.normal(110, 30, 300)]).clip(24, 512).astype(int)
    ids, masks = [], []
    for n in lens:
        ids.append(rng.integers(3, vocab, n + 1).astype(np.int32))
        m = np.zeros(n + 1, bool)
        m[int(0.6 * n):] = True
        masks.append(m)
    return batching.Encoded(ids, masks, pad_id=0), np.arange(len(lens)) < 64


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=8000)
    a = ap.parse_args()
    cfg = M.Config(family="llama", vocab_size=a.vocab, hidden=a.hidden, n_layers=a.layers, n_heads=a.hidden // 64,
                   n_kv_heads=max(1, a.hidden // 128), head_dim=64, intermediate=int(a.hidden * 2.75), max_pos=1024,
                   dtype="float32")
    params = M.init_params(cfg, jax.random.key(0))
    enc, is_seed = data(vocab=a.vocab)
    tc = train.TrainConfig(lr=2e-5, batch_size=32, grad_accum=1, max_length=512, warmup_ratio=0.0)
    trainer = train.Trainer(cfg, tc, total_steps=10_000)
    state, frozen = trainer.init_state(params)
    res = {m: {"times": []} for m in ("random", "grouped")}
    for r in range(a.rounds + 1):
        for mode, group in (("random", False), ("grouped", True)):
            plan = batching.plan_epoch(enc.lengths, 32, seed=1, epoch=r, group_lengths=group)
            batches = [batching.make_batch(enc, b, 1, trainer.micro_rows, 512, 64) for b in plan]
            t0 = time.perf_counter()
            for b in batches:
                state, m = trainer.step(state, frozen, b)
            jax.block_until_ready(m["loss"])
            dt = time.perf_counter() - t0
            if r == 0:  # compiles every shape
                pos = np.concatenate([b["pos"].ravel() for b in batches])
                res[mode]["padded_share"] = round(float((pos < 0).mean()), 4)
                res[mode]["seeds_per_step"] = [int(is_seed[b].sum()) for b in plan]
                res[mode]["shapes"] = sorted({int(b["tokens"].shape[-1]) for b in batches})
                continue
            res[mode]["times"].append(round(dt, 3))
            print(f"round {r} {mode:8s} epoch {dt:.2f}s", flush=True)
    for mode, v in res.items():
        t = np.array(v["times"])
        v["median_s"], v["spread_s"] = round(float(np.median(t)), 3), round(float(t.max() - t.min()), 3)
        print(f"{mode:8s} epoch median {v['median_s']:.2f}s (spread {v['spread_s']:.2f}s), padded share "
              f"{v['padded_share']:.1%}, lengths {v['shapes']}, seeds per step {v['seeds_per_step']}")
    ratio = res["random"]["median_s"] / res["grouped"]["median_s"]
    print(f"random / grouped epoch time: {ratio:.2f}")
    print(json.dumps({**res, "ratio": round(ratio, 3)}))


if __name__ == "__main__":
    main()
