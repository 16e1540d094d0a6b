"""Retrieval quality of the offline embedders (issue 16 item 14): how well each finds topical neighbours.

Labelled set: TruthfulQA's 817 questions in 38 categories (../shared/data/TruthfulQA.csv). For every
question, its 8 nearest other questions by cosine (exact search) are looked up;
  precision@8      share of those neighbours in the question's own category (leave-one-out), beside
                   `chance`, the expected share for 8 random other questions;
  agreement@8      share of the exact top-8 that the Annoy index (forced, with its calibrated search_k)
                   also returns: what approximate search loses on top of the embedder (ISARA pools below
                   2048 items use exact search, so there it is 1 by construction).
Also the embedding time (seconds for all questions; a shared 2-core machine, so indicative only).

    python scripts/bench_embedders.py [--lm MODEL_DIR] [--encoder ENCODER_DIR] [--csv PATH]

hashing always runs; lm needs a decoder model directory (e.g. SmolLM2-135M converted from GGUF with
`selfalign convert`), encoder a BERT-family sentence-encoder directory (e.g. all-MiniLM-L6-v2).
Last line: JSON with every figure.
"""

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfalign_jax.core import embed
from selfalign_jax.app import retrieval  # noqa: E402

K = 8


def load(path: Path) -> tuple[list[str], np.ndarray]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    qs = [r["Question"] for r in rows]
    cats = sorted({r["Category"] for r in rows})
    return qs, np.array([cats.index(r["Category"]) for r in rows])


def neighbours_exact(x: np.ndarray, k: int) -> np.ndarray:
    ids, _ = retrieval.exact_topk(x, x, k + 1)
    return np.array([[j for j in row if j != i][:k] for i, row in enumerate(ids)])


def measure(name: str, emb, qs: list[str], cat: np.ndarray) -> dict:
    t0 = time.perf_counter()
    x = retrieval.normalize(np.asarray(emb.embed(qs), np.float32))
    secs = time.perf_counter() - t0
    nb = neighbours_exact(x, K)
    prec = float((cat[nb] == cat[:, None]).mean())
    per_q = (cat[nb] == cat[:, None]).mean(1)
    idx = retrieval.PoolIndex.build(x, exact_below=0, seed=0)
    got = idx.query(x, K + 1)
    ann = [[j for j in row if j != i and j >= 0][:K] for i, row in enumerate(got)]
    agree = float(np.mean([len(set(a) & set(e)) / K for a, e in zip(ann, nb.tolist())]))
    return {"embedder": name, "precision_at_8": round(prec, 4),
            "precision_ci95": round(1.96 * float(per_q.std()) / np.sqrt(len(qs)), 4),
            "agreement_at_8": round(agree, 4), "search_k": int(idx.search_k), "embed_s": round(secs, 2),
            "dim": int(x.shape[1])}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--csv", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/TruthfulQA.csv")
    ap.add_argument("--lm", type=Path, default=None)
    ap.add_argument("--encoder", type=Path, default=None)
    a = ap.parse_args()
    if not a.csv.is_file():
        sys.exit(f"no labelled set at {a.csv}")
    qs, cat = load(a.csv)
    counts = np.bincount(cat)
    chance = float(((counts * (counts - 1)).sum()) / (len(qs) * (len(qs) - 1)))
    print(f"{len(qs)} questions, {len(counts)} categories; chance precision@8 = {chance:.4f}")
    todo = [("hashing", embed.get_embedder("hashing"))]
    if a.lm:
        todo.append(("lm", embed.get_embedder("lm", model=a.lm)))
    if a.encoder:
        todo.append(("encoder", embed.get_embedder("encoder", model=a.encoder)))
    out = []
    for name, emb in todo:
        r = measure(name, emb, qs, cat)
        out.append(r)
        print(f"{name:8s} precision@8 {r['precision_at_8']:.3f} ±{r['precision_ci95']:.3f}  "
              f"agreement@8 (Annoy vs exact) {r['agreement_at_8']:.3f}  dim {r['dim']}  embed {r['embed_s']:.1f}s",
              flush=True)
    print(json.dumps({"n": len(qs), "categories": len(counts), "chance": round(chance, 4), "results": out}))


if __name__ == "__main__":
    main()
