"""`selfalign index`: embed the questions of a plain JSONL file and build one index per pool set."""

import re
import time
from pathlib import Path
from typing import Literal

import numpy as np

from selfalign_jax.app import data as dataset
from selfalign_jax.core import embed, fileio
from selfalign_jax.app import retrieval
from selfalign_jax.core.errors import UserError


def _set_name(field: str, value) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{field}-{value}")


def main(
    data: Path,
    out: Path,
    embedder: Literal["hashing", "encoder", "lm"] = "hashing",
    model: Path | None = None,
    group_by: Literal["none", "iteration", "source", "category"] = "none",
    exact_below: int = retrieval.EXACT_BELOW,
    n_trees: int = retrieval.N_TREES,
    batch_size: int = 32,
    max_len: int | None = None,
    dim: int = 1024,
) -> None:
    """Embed each question in DATA and save a nearest-neighbour index per pool set to OUT.

    Args:
        data: plain JSONL ({question, answer, ...}); answers may be empty.
        out: the index directory (retrieval.json, one .ann or .npy plus a .json sidecar per set).
        embedder: hashing (no model), encoder (a local BERT-family sentence encoder) or lm (the model).
        model: the local Hugging Face directory for the encoder or lm embedder.
        group_by: split rows into pool sets by this field (none: one set named "all").
        exact_below: sets with fewer items are searched exactly instead of with Annoy.
        n_trees: Annoy trees per set (search_k is calibrated at build for recall@8 >= 0.95).
        batch_size: texts per embedding batch.
        max_len: tokens kept per text (default: the embedder's own limit).
        dim: vector size of the hashing embedder.
    """
    fileio.check_output(out, inputs={"--data": data}, directory=True, overwrite=True)
    for flag, v in (("--batch-size", batch_size), ("--dim", dim), ("--n-trees", n_trees)):
        if v < 1:
            raise UserError(f"{flag} must be >= 1")
    rows = dataset.read_jsonl(data, require_answer=False)
    if not rows:
        raise UserError(f"{data}: no rows to index")
    emb = embed.get_embedder(embedder, model=model, batch_size=batch_size, max_len=max_len, dim=dim)
    t = time.perf_counter()
    vecs = emb.embed([s.question for s in rows])
    print(f"embedded {len(rows)} questions from {data} with {embedder} (dim {emb.dim}) "
          f"in {time.perf_counter() - t:.1f}s")
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(rows):
        name = "all" if group_by == "none" else _set_name(group_by, getattr(s, group_by))
        groups.setdefault(name, []).append(i)
    t = time.perf_counter()
    ret = retrieval.Retriever.build(
        {n: vecs[ix] for n, ix in groups.items()}, ids={n: np.asarray(ix) for n, ix in groups.items()},
        meta={"embedder": embedder, "model": str(model) if model else None, "dim": emb.dim,
              "data": str(data), "group_by": group_by, "ids": "row numbers (0-based) in data"},
        exact_below=exact_below, n_trees=n_trees)
    ret.save(out)
    print(f"built {len(groups)} pool set index(es) in {time.perf_counter() - t:.1f}s -> {out}")
    for n, idx in ret.sets.items():
        how = "exact" if idx.kind == "exact" else f"annoy, {idx.n_trees} trees, search_k {idx.search_k}"
        print(f"  {n}: {idx.count} items ({how})")
