"""Measurements behind the real demo's settings (configs/README.md, "The real demo").

    python scripts/real_variants.py retrieval
        how often the K = 4 seeds nearest to an evaluation prompt (the demo's 60 + 40 subset) are helpful
        ones, for the default 80 seeds and for the balanced 96, with the `hashing` and `lm` embedders
        (`lm` = the last layer, `lm@0.5` = the middle layer: REAL's lm_layers)
    python scripts/real_variants.py full RUN_DIR OUT_DIR [--seed 0] [--cache-dir DIR] [--baselines ...]
        a finished default real run re-judged on every evaluation prompt (154 harmful + 100 benign) with
        every baseline: OUT_DIR gets the run's generated data and models (hard links) but none of its
        evaluations, then the demo runs there with --full-eval and the baselines (default all; one round is
        trained anew)
    python scripts/real_variants.py balanced RUN_DIR [--seed 0] [--baselines sft]
        the real demo with balanced seeds: 48 refusal seeds (category round-robin) + the 16 risky-sounding
        helpful + the 32 ordinary helpful seeds (assets/safety/ordinary_seeds.jsonl) = 96; REAL otherwise,
        SFT micro-batch 8 x 8 (the same effective batch as REAL's 16 x 4, half the activation memory)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np

from selfalign_jax import embed, fileio, isara, real_demo, retrieval, rundir
from selfalign_jax.evaluate.refusal import RefusalScorer


def balanced_seeds() -> list[dict]:
    seeds, helpful, _ = real_demo.load_assets()
    ordinary = fileio.read_jsonl(real_demo.ASSETS / "ordinary_seeds.jsonl")
    refusals = real_demo.eval_subset([dict(r, label="harmful") for r in seeds], 48, 0)
    return [dict(r, helpful=False) for r in refusals] + [dict(r, helpful=True) for r in helpful + ordinary]


def helpful_neighbours(k: int = 4) -> None:
    seeds, helpful, evals = real_demo.load_assets()
    evals = real_demo.eval_subset(evals, *real_demo.SUBSET)
    default = [dict(r, helpful=False) for r in seeds] + [dict(r, helpful=True) for r in helpful]
    pools = {"80 (64 refusal + 16 helpful)": default, "96 balanced (48 + 16 + 32)": balanced_seeds()}
    model = real_demo.ensure_model()
    for name in ("hashing", "lm", "lm@0.5"):
        kind, _, frac = name.partition("@")
        emb = embed.get_embedder(kind, model if kind == "lm" else None, lm_layers=float(frac or 1))
        q = emb.embed([r["question"] for r in evals])
        for label, pool in pools.items():
            # the index the answer step queries (exact search at this pool size)
            nearest = retrieval.PoolIndex.build(emb.embed([r["question"] for r in pool])).query(q, k)
            helpful_mask = np.array([r["helpful"] for r in pool])
            for lab in ("harmful", "benign"):
                rows = np.array([r["label"] == lab for r in evals])
                print(f"{name:8s} {label:30s} {lab:8s}: helpful share of the {k} nearest seeds "
                      f"{helpful_mask[nearest[rows]].mean():.3f} (base rate {helpful_mask.mean():.3f})")


EVALS = ("pretrained", "metrics.jsonl", "report.md", "report.png", "demo.json", "baselines/icl-knn",
         "baselines/icl-random", "baselines/one-round")


def full(run_dir: str, out_dir: str, seed: int, cache_dir: str | None, baselines: list[str]) -> None:
    src, dst = Path(run_dir), Path(out_dir)
    if dst.exists():
        raise SystemExit(f"{dst}: exists")
    shutil.copytree(src, dst, copy_function=os.link)
    for rel in EVALS:
        p = dst / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    for p in [*dst.glob("iter_*/eval.jsonl"), *dst.glob("iter_*/metrics.json"), dst / "baselines/sft/eval.jsonl",
              dst / "baselines/sft/metrics.json"]:
        p.unlink(missing_ok=True)
    conf = json.loads((dst / "config.json").read_text())
    # (an atomic replace: the source run's hard-linked config.json keeps its content)
    fileio.write_json(dst / "config.json", {**conf, "eval": None})  # the full set is another evaluation set
    out, _ = real_demo.run_real(dst, seed=seed, full_eval=True, cache_dir=cache_dir, baselines=tuple(baselines))
    print(json.dumps(out))


def balanced(run_dir: str, seed: int, baselines: list[str]) -> None:
    cfg = real_demo.REAL
    sft = dataclasses.replace(cfg.sft, batch_size=8, grad_accum=8)
    cfg = dataclasses.replace(cfg, sft=sft, iterations=2, seed=seed)
    rows = [{"question": r["question"], "answer": r["answer"]} for r in balanced_seeds()]
    _, _, evals = real_demo.load_assets()
    evals = real_demo.eval_subset(evals, *real_demo.SUBSET)
    model = real_demo.ensure_model()
    isara.log(f"balanced seeds: {len(rows)}")
    out = rundir.run(model, rows, run_dir, cfg, evals, RefusalScorer(), argv_note={"demo": "real-balanced"})
    for kind in baselines:
        out = rundir.baseline(kind, model, rows, run_dir, cfg, evals, RefusalScorer(), note={"demo": "real-balanced"})
    print(json.dumps(real_demo.summary(out, 0, run_dir, None)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("retrieval")
    f = sub.add_parser("full")
    f.add_argument("run_dir")
    f.add_argument("out_dir")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--cache-dir", default=None)
    f.add_argument("--baselines", nargs="*", default=[*real_demo.BASELINES, *real_demo.ALL_BASELINES])
    b = sub.add_parser("balanced")
    b.add_argument("run_dir")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--baselines", nargs="*", default=["sft"])
    a = ap.parse_args()
    if a.cmd == "retrieval":
        helpful_neighbours()
    elif a.cmd == "full":
        full(a.run_dir, a.out_dir, a.seed, a.cache_dir, a.baselines)
    else:
        balanced(a.run_dir, a.seed, a.baselines)


if __name__ == "__main__":
    main()
