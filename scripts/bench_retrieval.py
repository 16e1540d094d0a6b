"""Annoy vs exact numpy search on clustered vectors shaped like sentence embeddings.

Data: `clusters` topics of log-normal sizes; a topic is a random unit centre plus a shared offset (real
embeddings are anisotropic: random pairs have cosine ~0.05-0.1); items vary inside a rank-16 subspace
of the topic, plus isotropic noise. Queries are new points near random items (half the item spread).
Reports build time (add + build + search_k calibration), recall@k against exact search, and queries/s
of both, each timed as the best of `repeats` runs on all cores. Last line: a JSON object.

    python scripts/bench_retrieval.py [--n 100000] [--dim 384] [--queries 1000] [--k 8]
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from selfalign_jax.app.retrieval import N_TREES, PoolIndex, exact_topk  # noqa: E402


def clustered(n, d, clusters, n_queries, spread=0.6, rank=16, noise=0.25, offset=0.3, qscale=0.5, seed=0):
    """(items_NxD, queries_QxD, query_origin_Q): unit vectors in Gaussian topic clusters."""
    rng = np.random.default_rng(seed)
    common = rng.standard_normal(d).astype(np.float32)
    common /= np.linalg.norm(common)
    cen = rng.standard_normal((clusters, d)).astype(np.float32)
    cen = cen / np.linalg.norm(cen, axis=1, keepdims=True) + offset * common
    sizes = rng.lognormal(0.0, 0.7, clusters)
    lab = np.sort(rng.choice(clusters, n, p=sizes / sizes.sum()))
    origin = rng.choice(n, n_queries, replace=False)
    x = np.empty((n, d), np.float32)
    q = np.empty((n_queries, d), np.float32)
    bounds = np.searchsorted(lab, np.arange(clusters + 1))

    def wiggle(m, basis, s):
        low = rng.standard_normal((m, rank)).astype(np.float32) @ basis
        return s * low + s * noise * rng.standard_normal((m, d)).astype(np.float32) / np.sqrt(d)

    for j in range(clusters):
        a, b = bounds[j], bounds[j + 1]
        basis = rng.standard_normal((rank, d)).astype(np.float32)
        basis /= np.linalg.norm(basis, axis=1, keepdims=True) * np.sqrt(rank)
        x[a:b] = cen[j] + wiggle(b - a, basis, spread)
        sel = np.nonzero((origin >= a) & (origin < b))[0]
        if len(sel):
            q[sel] = x[origin[sel]] + wiggle(len(sel), basis, qscale * spread)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    perm = rng.permutation(n)  # real pools are not stored topic by topic
    return x[perm], q, np.argsort(perm)[origin]


def best_time(fn, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--n-trees", type=int, default=N_TREES)
    ap.add_argument("--spread", type=float, default=0.6, help="item spread inside a topic")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    t = time.perf_counter()
    x, q, origin = clustered(a.n, a.dim, a.clusters, a.queries, spread=a.spread, seed=a.seed)
    print(f"data: {a.n} x {a.dim} in {a.clusters} clusters, {a.queries} queries ({time.perf_counter() - t:.1f}s)")
    rnd = np.random.default_rng(1).choice(a.n, 2000, replace=False)
    print(f"  cosine of random pairs {float((x[rnd[:1000]] * x[rnd[1000:]]).sum(1).mean()):.3f}; "
          f"query vs its origin item {float(np.median((q * x[origin]).sum(1))):.3f}")

    t_exact, (truth, sims) = best_time(lambda: exact_topk(x, q, a.k), a.repeats)
    print(f"  median cosine of the 1st / {a.k}th / {a.k + 1}th true neighbour: {np.median(sims[:, 0]):.3f} / "
          f"{np.median(sims[:, -1]):.3f} / {float(np.median(exact_topk(x, q, a.k + 1)[1][:, -1])):.3f}")
    print(f"exact numpy (batched matmul + top-k): {t_exact:.3f}s, {a.queries / t_exact:.0f} queries/s")

    t = time.perf_counter()
    idx = PoolIndex.build(x, exact_below=0, n_trees=a.n_trees, calib_k=a.k, seed=a.seed)
    build_s = time.perf_counter() - t
    c = idx.calib
    print(f"annoy build: {build_s:.1f}s ({a.n_trees} trees: {c['build_s']:.1f}s, search_k calibration "
          f"{c['calib_s']:.1f}s -> search_k {idx.search_k}, probe recall {c['recall']:.3f})")

    t_ann, got = best_time(lambda: idx.query(q, a.k), a.repeats)
    recall = float(np.mean([len(set(g) & set(t)) / a.k for g, t in zip(got, truth)]))
    speedup = t_exact / t_ann
    print(f"annoy query: {t_ann:.3f}s, {a.queries / t_ann:.0f} queries/s, recall@{a.k} {recall:.4f}, "
          f"speedup x{speedup:.1f}")
    ok = recall >= 0.95 and speedup >= 20
    print(json.dumps({
        "n": a.n, "dim": a.dim, "clusters": a.clusters, "queries": a.queries, "k": a.k, "n_trees": a.n_trees,
        "search_k": idx.search_k, "build_s": round(build_s, 2), "calib_s": c["calib_s"],
        "exact_qps": round(a.queries / t_exact, 1), "annoy_qps": round(a.queries / t_ann, 1),
        "recall": round(recall, 4), "speedup": round(speedup, 1), "cpus": os.cpu_count(), "ok": ok}))


if __name__ == "__main__":
    main()
