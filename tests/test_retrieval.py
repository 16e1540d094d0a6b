"""Per-pool-set nearest-neighbour search: exact top-k, Annoy recall, save / mmap load, the index command."""

import json

import numpy as np
import pytest

from selfalign_jax.app import data as D
from selfalign_jax.core import fileio
from selfalign_jax.commands import index as cmd
from selfalign_jax.core.errors import UserError
from selfalign_jax.app.retrieval import PoolIndex, Retriever, exact_topk


def clustered(n, d, clusters, seed=0, spread=0.5):
    """Unit vectors in Gaussian clusters, shuffled; queries are new points near random items."""
    rng = np.random.default_rng(seed)
    cen = rng.standard_normal((clusters, d)).astype(np.float32)
    cen /= np.linalg.norm(cen, axis=1, keepdims=True)
    lab = rng.integers(0, clusters, n)
    x = cen[lab] + spread * rng.standard_normal((n, d)).astype(np.float32) / np.sqrt(d)
    noise = rng.standard_normal((200, d)).astype(np.float32) / np.sqrt(d)
    q = x[rng.choice(n, 200, replace=False)] + 0.5 * spread * noise
    return x / np.linalg.norm(x, axis=1, keepdims=True), q / np.linalg.norm(q, axis=1, keepdims=True)


def recall(got, truth):
    k = truth.shape[1]
    return float(np.mean([len(set(g) & set(t)) / k for g, t in zip(got, truth)]))


def test_exact_topk_matches_argsort():
    rng = np.random.default_rng(0)
    x, q = rng.standard_normal((500, 16)).astype(np.float32), rng.standard_normal((37, 16)).astype(np.float32)
    ids, sims = exact_topk(x, q, 5, chunk_bytes=4 * 500 * 7)  # several query chunks
    want = np.argsort(-(q @ x.T), axis=1)[:, :5]
    assert np.array_equal(ids, want)
    assert np.allclose(sims, np.take_along_axis(q @ x.T, want, axis=1))
    ids, sims = exact_topk(x[:3], q, 5)  # fewer items than k: padded
    assert (ids[:, 3:] == -1).all() and np.isneginf(sims[:, 3:]).all() and set(ids[0, :3]) == {0, 1, 2}


def test_annoy_recall_and_mmap_roundtrip(tmp_path):
    x, q = clustered(6000, 64, 60)
    truth, _ = exact_topk(x, q, 8)
    idx = PoolIndex.build(x, ids=np.arange(6000) + 10_000)  # above exact_below: Annoy
    assert idx.kind == "annoy" and idx.search_k >= 66 and idx.calib["recall"] >= 0.95
    got = idx.query(q, 8)
    assert recall(got - 10_000, truth) >= 0.95
    idx.save(tmp_path, "D1")
    meta = json.loads((tmp_path / "D1.json").read_text())
    assert (meta["dim"], meta["count"], meta["metric"], meta["kind"]) == (64, 6000, "angular", "annoy")
    assert sorted(meta["ids"]) == list(range(10_000, 16_000)) and meta["search_k"] == idx.search_k
    again = PoolIndex.load(tmp_path, "D1")
    assert np.array_equal(again.query(q, 8), got)
    # annoy's default search_k (n_trees * k) is much worse: the calibration matters
    low = idx.search(q, 8, search_k=8)[0]
    assert recall(low - 10_000, truth) < recall(got - 10_000, truth)


def test_exact_set_roundtrip_and_errors(tmp_path):
    x, q = clustered(300, 32, 5, seed=1)
    idx = PoolIndex.build(x)
    assert idx.kind == "exact"
    ids, sims = idx.search(q, 4)
    assert np.array_equal(ids, exact_topk(x, q, 4)[0]) and (np.diff(sims, axis=1) <= 1e-6).all()
    idx.save(tmp_path, "seeds")
    again = PoolIndex.load(tmp_path, "seeds")
    assert isinstance(again.vectors, np.memmap) and np.array_equal(again.query(q, 4), ids)
    with pytest.raises(UserError, match="dim 16, the index has 32"):
        idx.query(np.ones((2, 16), np.float32), 3)
    with pytest.raises(UserError, match="must match"):
        idx.save(tmp_path, "bad/name")
    with pytest.raises(UserError, match="no such index sidecar"):
        PoolIndex.load(tmp_path, "nope")


def test_retriever_k_per_set(tmp_path):
    x, q = clustered(3000, 32, 30, seed=2)
    r = Retriever.build({"D0": x[:50], "D1": x[50:], "D2": x[:3]}, ids={"D1": np.arange(50, 3000)},
                        meta={"embedder": "test"})
    r.save(tmp_path)
    r = Retriever.load(tmp_path)
    assert r.meta == {"embedder": "test"} and r.sets["D1"].kind == "annoy" and r.sets["D0"].kind == "exact"
    out = r.query(q[:5], {"D0": 6, "D1": 1, "D2": 5})
    assert out["D0"].shape == (5, 6) and out["D0"].max() < 50 and out["D1"].min() >= 50
    assert (out["D2"][:, 3:] == -1).all()
    full = exact_topk(x, q[:5], 1)[0][:, 0]
    assert np.mean(out["D1"][:, 0] == full) >= 0.8  # mostly the global best lives in D1
    assert set(r.query(q[:2], 2)) == {"D0", "D1", "D2"}
    with pytest.raises(UserError, match="no pool set 'D9'"):
        r.query(q[:2], {"D9": 1})


def test_index_command(tmp_path, capsys):
    rows = [D.Sample(f"How do I cook dish number {i} with rice?", "", iteration=i % 2) for i in range(30)]
    rows += [D.Sample("What is the capital of France?", "Paris.", iteration=0)]
    fileio.write_jsonl(tmp_path / "pool.jsonl", rows)
    cmd.main(data=tmp_path / "pool.jsonl", out=tmp_path / "idx", embedder="hashing", group_by="iteration",
             dim=256)
    assert "iteration-0: 16 items (exact)" in capsys.readouterr().out
    r = Retriever.load(tmp_path / "idx")
    assert r.meta["embedder"] == "hashing" and r.meta["dim"] == 256
    from selfalign_jax.core.embed import get_embedder

    v = get_embedder("hashing", dim=256).embed(["capital of France?", "cook dish number 7 with rice"])
    got = r.query(v, 1)
    assert got["iteration-0"][0, 0] == 30 and got["iteration-1"][1, 0] == 7
    with pytest.raises(UserError, match="needs --model"):
        cmd.main(data=tmp_path / "pool.jsonl", out=tmp_path / "idx2", embedder="encoder")
