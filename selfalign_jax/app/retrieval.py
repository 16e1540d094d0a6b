"""Nearest-neighbour search within each pool set: one Annoy index (angular) per set, exact below a size.

ISARA answers a new question from the k most similar demonstrations *within each pool set* (D_0 seeds,
D_1, ...). Vectors are L2-normalised, so angular distance ranks like cosine similarity.

API:
    exact_topk(db_NxD, q_QxD, k) -> (ids_Qxk int64, sims_Qxk float32)   # batched matmul + top-k
    PoolIndex.build(vectors_NxD, ids=None, exact_below=2048, n_trees=64, search_k=None,
                    target_recall=0.95, calib_k=8, seed=0) -> PoolIndex
    PoolIndex.save(dir, name); PoolIndex.load(dir, name)     # .ann / .npy memory-mapped on load
    PoolIndex.search(vecs_QxD, k) -> (ids_Qxk, sims_Qxk);  PoolIndex.query(vecs_QxD, k) -> ids_Qxk
    Retriever.build({set: vectors}, ids=None, **kw); .save(dir, meta=None); Retriever.load(dir)
    Retriever.query(vecs_QxD, k: int | {set: k}) -> {set: ids_Qxk}
Ids are the caller's (default 0..N-1); rows are padded with -1 when a set has fewer than k items.

Defaults, and why:
    exact_below=2048: below this, brute force (one matmul) is as fast as Annoy and always exact.
    n_trees=64: against 32 trees it lifts recall@8 at the same search_k at no query cost; more trees cost
        build time and memory (figures: scripts/bench_retrieval.py).
    Items are added in a random-projection-tree order (similar items adjacent in the .ann file), so a
        leaf's candidates are read from nearby memory: faster queries and builds (scripts/bench_retrieval.py).
    search_k: Annoy's default (n_trees * k) visits only one or two leaves (a leaf holds up to dim + 2
        items), far too few for recall. We calibrate it at build: 200 probe queries, each an item moved
        in a random direction by its distance to its nearest neighbour, answered exactly; search_k
        doubles from one leaf until recall@calib_k >= target_recall. It is stored in the sidecar and scales
        with k at query time.
Files per set NAME in the directory: NAME.ann (or NAME.npy for exact sets) and NAME.json
(dim, count, metric, kind, n_trees, search_k, calibration, ids); retrieval.json lists the sets.
"""

from __future__ import annotations

import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from annoy import AnnoyIndex

from selfalign_jax.core import fileio
from selfalign_jax.core.errors import UserError

EXACT_BELOW = 2048
N_TREES = 64
TARGET_RECALL = 0.95
CALIB_K = 8
CALIB_PROBES = 200
MANIFEST = "retrieval.json"
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def normalize(x_NxD) -> np.ndarray:
    x = np.asarray(x_NxD, np.float32)
    if x.ndim != 2:
        raise UserError(f"expected a 2-D [n, dim] matrix of vectors, got shape {x.shape}")
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def exact_topk(db_NxD, q_QxD, k: int, chunk_bytes: int = 1 << 26) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by inner product (cosine on unit vectors), best first; -1 / -inf past the set's size."""
    db, q = np.asarray(db_NxD, np.float32), np.asarray(q_QxD, np.float32)
    N, Q = db.shape[0], q.shape[0]
    ids = np.full((Q, k), -1, np.int64)
    sims = np.full((Q, k), -np.inf, np.float32)
    kk = min(k, N)
    if kk == 0 or Q == 0:
        return ids, sims
    step = max(1, chunk_bytes // (4 * max(N, 1)))
    for a in range(0, Q, step):
        s_CxN = q[a:a + step] @ db.T
        top = np.argpartition(-s_CxN, kk - 1, axis=1)[:, :kk] if kk < N else np.broadcast_to(
            np.arange(N), (s_CxN.shape[0], N))
        ts = np.take_along_axis(s_CxN, top, axis=1)
        order = np.argsort(-ts, axis=1, kind="stable")
        ids[a:a + step, :kk] = np.take_along_axis(top, order, axis=1)
        sims[a:a + step, :kk] = np.take_along_axis(ts, order, axis=1)
    return ids, sims


def locality_order(x_NxD: np.ndarray, leaf: int = 256, seed: int = 0) -> np.ndarray:
    """A permutation putting similar rows next to each other: leaves of a random-projection tree."""
    rng = np.random.default_rng(seed)
    out, stack = [], [np.arange(len(x_NxD))]
    while stack:
        ids = stack.pop()
        if len(ids) <= leaf:
            out.append(ids)
            continue
        a, b = rng.choice(ids, 2, replace=False)
        p = x_NxD[ids] @ (x_NxD[a] - x_NxD[b])
        left = p <= np.median(p)
        if left.all() or not left.any():
            out.append(ids)
            continue
        stack += [ids[~left], ids[left]]
    return np.concatenate(out)


class PoolIndex:
    """k-nearest-neighbour search over one pool set (Annoy, or exact below `exact_below` items)."""

    def __init__(self, kind: str, dim: int, ids: np.ndarray, vectors=None, annoy=None,
                 n_trees: int = 0, search_k: int = 0, calib: dict | None = None):
        self.kind, self.dim, self.ids = kind, dim, np.asarray(ids, np.int64)
        self.vectors, self.annoy = vectors, annoy
        self.n_trees, self.search_k, self.calib = n_trees, search_k, calib or {}

    @property
    def count(self) -> int:
        return len(self.ids)

    # ------------------------------------------------------------------ build
    @classmethod
    def build(cls, vectors_NxD, ids=None, exact_below: int = EXACT_BELOW, n_trees: int = N_TREES,
              search_k: int | None = None, target_recall: float = TARGET_RECALL, calib_k: int = CALIB_K,
              seed: int = 0, n_jobs: int = -1) -> "PoolIndex":
        x = normalize(vectors_NxD)
        N, D = x.shape
        ids = np.arange(N, dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
        if ids.shape != (N,):
            raise UserError(f"got {len(ids)} ids for {N} vectors")
        if N < exact_below:
            return cls("exact", D, ids, vectors=x)
        t0 = time.perf_counter()
        order = locality_order(x, seed=seed)
        x, ids = x[order], ids[order]
        ann = AnnoyIndex(D, "angular")
        ann.set_seed(seed)
        for i in range(N):
            ann.add_item(i, x[i])
        ann.build(n_trees, n_jobs=n_jobs)
        idx = cls("annoy", D, ids, annoy=ann, n_trees=n_trees, search_k=search_k or 0)
        idx.calib = {"build_s": round(time.perf_counter() - t0, 3)}
        if search_k is None:
            idx._calibrate(x, calib_k, target_recall, seed)
        else:
            idx.calib.update(k=calib_k)
        return idx

    def _calibrate(self, x_NxD, k: int, target: float, seed: int) -> None:
        """Smallest search_k (doubling from one leaf) reaching `target` recall@k on probe queries."""
        t0 = time.perf_counter()
        N, D = x_NxD.shape
        rng = np.random.default_rng(seed)
        probe = rng.choice(N, min(CALIB_PROBES, N), replace=False)
        nn, sim = exact_topk(x_NxD, x_NxD[probe], 2)
        d_nn = np.sqrt(np.maximum(2 - 2 * sim[:, 1:], 1e-12))  # distance to the nearest other item
        g = rng.standard_normal((len(probe), D)).astype(np.float32)
        # a new query: as far from an item, in a random direction, as the item's nearest neighbour is
        q = normalize(x_NxD[probe] + d_nn * g / np.linalg.norm(g, axis=1, keepdims=True))
        truth, _ = exact_topk(x_NxD, q, k)
        sk = D + 2  # one leaf's capacity
        while True:
            got = self._annoy_search(q, k, sk)[0]
            rec = float(np.mean([len(set(g) & set(t)) / k for g, t in zip(got, truth)]))
            if rec >= target or sk >= N:
                break
            sk *= 2
        self.search_k = sk
        self.calib.update(k=k, target=target, probes=len(probe), recall=round(rec, 4),
                          calib_s=round(time.perf_counter() - t0, 3))

    # ------------------------------------------------------------------ search
    def _annoy_search(self, q_QxD, k: int, search_k: int):
        Q = len(q_QxD)
        ids = np.full((Q, k), -1, np.int64)
        dist = np.full((Q, k), np.inf, np.float32)
        rows = np.asarray(q_QxD, np.float32).tolist()  # Annoy converts a list far faster than numpy scalars

        def run(a, b):
            for r in range(a, b):
                got, d = self.annoy.get_nns_by_vector(rows[r], k, search_k=search_k, include_distances=True)
                ids[r, :len(got)] = got
                dist[r, :len(d)] = d

        workers = min(os.cpu_count() or 1, 8) if Q >= 256 else 1
        if workers == 1:
            run(0, Q)
        else:  # Annoy releases the GIL while searching
            step = -(-Q // (workers * 4))
            with ThreadPoolExecutor(workers) as ex:
                list(ex.map(lambda a: run(a, min(a + step, Q)), range(0, Q, step)))
        return ids, 1.0 - dist.astype(np.float32) ** 2 / 2  # angular distance sqrt(2 - 2 cos) -> cos

    def search(self, vecs_QxD, k: int, search_k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids_Qxk, cosine sims_Qxk), best first, in the caller's ids; -1 / -inf past the set's size."""
        q = normalize(vecs_QxD)
        if q.shape[1] != self.dim:
            raise UserError(f"query vectors have dim {q.shape[1]}, the index has {self.dim} "
                            f"(built with another embedder?)")
        if self.kind == "exact":
            pos, sims = exact_topk(self.vectors, q, k)
        else:
            if search_k is None:
                search_k = max(self.search_k, self.search_k * k // max(self.calib.get("k", k), 1))
            pos, sims = self._annoy_search(q, k, search_k)
            sims[pos < 0] = -np.inf
        return np.where(pos >= 0, self.ids[np.maximum(pos, 0)], -1), sims

    def query(self, vecs_QxD, k: int) -> np.ndarray:
        """ids_Qxk of the k nearest items (best first, -1 padded)."""
        return self.search(vecs_QxD, k)[0]

    # ------------------------------------------------------------------ disk
    def save(self, out_dir, name: str) -> None:
        if not _NAME.match(name):
            raise UserError(f"pool set name {name!r} must match {_NAME.pattern}")
        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        if self.kind == "exact":
            with fileio.atomic(d / f"{name}.npy") as t, open(t, "wb") as f:
                np.save(f, np.asarray(self.vectors))  # (a path not ending in .npy would get the suffix added)
        else:
            with fileio.atomic(d / f"{name}.ann") as t:
                self.annoy.save(str(t))
        meta = {"name": name, "kind": self.kind, "metric": "angular", "dim": self.dim, "count": self.count,
                "n_trees": self.n_trees, "search_k": self.search_k, "calibration": self.calib,
                "ids": self.ids.tolist()}
        fileio.write_text(d / f"{name}.json", json.dumps(meta))

    @classmethod
    def load(cls, in_dir, name: str) -> "PoolIndex":
        d = Path(in_dir)
        side = d / f"{name}.json"
        try:
            meta = json.loads(side.read_text())
            kind, dim, count, ids = meta["kind"], int(meta["dim"]), int(meta["count"]), meta["ids"]
        except FileNotFoundError:
            raise UserError(f"{side}: no such index sidecar") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise UserError(f"{side}: malformed index sidecar ({e})") from None
        if meta.get("metric") != "angular" or len(ids) != count:
            raise UserError(f"{side}: metric must be angular and ids must number count={count}")
        if kind == "exact":
            vec = np.load(d / f"{name}.npy", mmap_mode="r")
            if vec.shape != (count, dim):
                raise UserError(f"{d / f'{name}.npy'}: shape {vec.shape}, sidecar says ({count}, {dim})")
            return cls("exact", dim, ids, vectors=vec, calib=meta.get("calibration"))
        ann = AnnoyIndex(dim, "angular")
        path = d / f"{name}.ann"
        if not path.is_file():
            raise UserError(f"{path}: no such index file")
        ann.load(str(path))  # memory-mapped
        if ann.get_n_items() != count:
            raise UserError(f"{path}: {ann.get_n_items()} items, sidecar says {count}")
        return cls("annoy", dim, ids, annoy=ann, n_trees=meta.get("n_trees", 0),
                   search_k=int(meta["search_k"]), calib=meta.get("calibration"))


class Retriever:
    """One PoolIndex per pool set; a query returns the k nearest within each set."""

    def __init__(self, sets: dict[str, PoolIndex], meta: dict | None = None):
        self.sets, self.meta = dict(sets), dict(meta or {})

    @classmethod
    def build(cls, vectors: dict[str, np.ndarray], ids: dict[str, np.ndarray] | None = None,
              meta: dict | None = None, **kw) -> "Retriever":
        ids = ids or {}
        return cls({n: PoolIndex.build(v, ids.get(n), **kw) for n, v in vectors.items()}, meta)

    def save(self, out_dir) -> None:
        d = Path(out_dir)
        for name, idx in self.sets.items():
            idx.save(d, name)
        man = {**self.meta, "sets": list(self.sets)}
        fileio.write_text(d / MANIFEST, json.dumps(man, indent=1))

    @classmethod
    def load(cls, in_dir) -> "Retriever":
        d = Path(in_dir)
        try:
            man = json.loads((d / MANIFEST).read_text())
            names = man["sets"]
        except FileNotFoundError:
            raise UserError(f"{d / MANIFEST}: no such file (not an index directory?)") from None
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{d / MANIFEST}: malformed ({e})") from None
        meta = {k: v for k, v in man.items() if k != "sets"}
        return cls({n: PoolIndex.load(d, n) for n in names}, meta)

    def query(self, vecs_QxD, k) -> dict[str, np.ndarray]:
        """{set: ids_Qxk}; k is one int for all sets or {set: k} (sets not named are skipped)."""
        ks = k if isinstance(k, dict) else {n: k for n in self.sets}
        unknown = [n for n in ks if n not in self.sets]
        if unknown:
            raise UserError(f"no pool set {unknown[0]!r} (sets: {', '.join(self.sets)})")
        return {n: self.sets[n].query(vecs_QxD, kn) for n, kn in ks.items() if kn > 0}
