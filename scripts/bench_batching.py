"""What uniformly random SFT batches cost against length-grouped and packed ones (issue 16 item 6).

An ISARA-like SFT set: 64 "seeds" of N(180, 50) tokens and 300 "generated" pairs of N(110, 30) tokens
(clipped to [24, 512]; the answer is the last 40%), effective batch 32 (--rows 32 x --accum 1; packing fills
fewer micro-batches, so it needs --accum > 1, e.g. --rows 8 --accum 4), 64-token length buckets,
a small random Llama (default 2 layers, hidden 128, vocab 8000, fp32; --layers / --hidden / --vocab).
Modes: random (uniformly random rows per step, one example per row: the authors' sampler), grouped
(`plan_epoch(..., group_lengths=True)`) and packed (the random steps, several whole examples per row:
`make_batch(..., pack=True)`, TrainConfig.packing, the same gradient). One epoch per mode, after an
untimed epoch per mode that compiles every batch shape; the modes alternate for --rounds rounds. Reported
per mode: median and spread of the epoch time, padded share of the input positions, and seeds per step.
--model DIR --pairs FILE...: a real HF model (fp32) and real pairs (its chat template) instead, effective
batch 64 as 4 x 16 (the real demo's SFT). Timings are from whatever machine runs it (the development
machine has 2 shared cores, so expect noise).

    python scripts/bench_batching.py [--rounds 3]
    python scripts/bench_batching.py --model ~/.cache/selfalign-jax/smollm2-135m-instruct-q4_1 \
        --pairs runs/demo-real/seeds.jsonl runs/demo-real/iter_1/kept.jsonl --rounds 2 --modes random packed

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

from selfalign_jax.core import batching, checkpoint, fileio, train  # noqa: E402
from selfalign_jax.core import model as M  # noqa: E402
from selfalign_jax.core.template import Template  # noqa: E402


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


def real_data(model_dir, files) -> tuple[batching.Encoded, np.ndarray]:
    tok = checkpoint.load_tokenizer(model_dir)
    rows = [[(r["question"], r["answer"]) for r in fileio.read_jsonl(f)] for f in files]
    enc = batching.encode_pairs([p for rs in rows for p in rs], tok, Template("chat", tok), max_length=256)
    return enc, np.arange(len(enc)) < len(rows[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--model", default=None)
    ap.add_argument("--pairs", nargs="*", default=[])
    ap.add_argument("--modes", nargs="*", default=["random", "grouped", "packed"])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--accum", type=int, default=1)
    a = ap.parse_args()
    if a.model:
        cfg, params = checkpoint.load(a.model, dtype="float32")
        enc, is_seed = real_data(a.model, a.pairs)
        rows, accum, max_len = 16, 4, 256
    else:
        cfg = M.Config(family="llama", vocab_size=a.vocab, hidden=a.hidden, n_layers=a.layers,
                       n_heads=a.hidden // 64, n_kv_heads=max(1, a.hidden // 128), head_dim=64,
                       intermediate=int(a.hidden * 2.75), max_pos=1024, dtype="float32")
        params = M.init_params(cfg, jax.random.key(0))
        enc, is_seed = data(vocab=a.vocab)
        rows, accum, max_len = a.rows, a.accum, 512
    tc = train.TrainConfig(lr=2e-5, batch_size=rows, grad_accum=accum, max_length=max_len, warmup_ratio=0.0)
    trainer = train.Trainer(cfg, tc, total_steps=10_000)
    state, frozen = trainer.init_state(params)
    res = {m: {"times": []} for m in a.modes}
    for r in range(a.rounds + 1):
        for mode in a.modes:
            plan = batching.plan_epoch(enc.lengths, rows * accum, seed=1, epoch=r, group_lengths=mode == "grouped")
            batches = [batching.make_batch(enc, b, accum, trainer.micro_rows, max_len, 64, pack=mode == "packed")
                       for b in plan]
            t0 = time.perf_counter()
            for b in batches:
                state, m = trainer.step(state, frozen, b)
            jax.block_until_ready(m["loss"])
            dt = time.perf_counter() - t0
            if r == 0:  # compiles every shape
                pos = np.concatenate([b["pos"].ravel() for b in batches])
                res[mode]["padded_share"] = round(float((pos < 0).mean()), 4)
                res[mode]["seeds_per_step"] = [int(is_seed[b].sum()) for b in plan]
                res[mode]["shapes"] = sorted({tuple(int(d) for d in b["tokens"].shape) for b in batches})
                continue
            res[mode]["times"].append(round(dt, 3))
            print(f"round {r} {mode:8s} epoch {dt:.2f}s", flush=True)
    for mode, v in res.items():
        t = np.array(v["times"])
        v["median_s"], v["spread_s"] = round(float(np.median(t)), 3), round(float(t.max() - t.min()), 3)
        print(f"{mode:8s} epoch median {v['median_s']:.2f}s (spread {v['spread_s']:.2f}s), padded share "
              f"{v['padded_share']:.1%}, lengths {v['shapes']}, seeds per step {v['seeds_per_step']}")
    ratios = {f"random/{m}": round(res["random"]["median_s"] / res[m]["median_s"], 3)
              for m in a.modes if m != "random" and "random" in res}
    for k, v in ratios.items():
        print(f"{k} epoch time: {v:.2f}")
    print(json.dumps({**res, **ratios}))


if __name__ == "__main__":
    main()
