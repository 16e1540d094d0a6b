"""Length buckets: the one power-of-two rounding and the one padded, length-sorted batch runner
(used by the embedders and the scorers' forward passes; few distinct jit shapes)."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm


def pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n - 1).bit_length())


def run_padded(rows: Sequence[Sequence[int]], fn: Callable, batch_size: int = 32, pad_id: int = 0,
               masks: Sequence[Sequence[int]] | None = None, min_len: int = 16, max_len: int | None = None,
               desc: str | None = None) -> np.ndarray:
    """Sort rows by length, batch, right-pad B and T up to powers of two (T at least min_len, capped at
    max_len but never below the longest row), call fn(tokens_BxT int32, valid_BxT bool[, mask_BxT bool])
    -> [B, ...] and return the results [n, ...] in input order."""
    n = len(rows)
    order = sorted(range(n), key=lambda i: -len(rows[i]))
    chunks = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    out = None
    for idx in tqdm(chunks, desc=desc, leave=False, disable=desc is None or len(chunks) < 4):
        B = min(pow2(len(idx)), pow2(batch_size))
        longest = max(len(rows[i]) for i in idx)
        T = max(min_len, pow2(longest))
        T = max(longest, min(T, max_len)) if max_len else T
        tok = np.full((B, T), pad_id, np.int32)
        valid = np.zeros((B, T), bool)
        m = np.zeros((B, T), bool)
        for r, i in enumerate(idx):
            tok[r, :len(rows[i])] = rows[i]
            valid[r, :len(rows[i])] = True
            if masks is not None:
                m[r, :len(masks[i])] = np.asarray(masks[i], bool)
        res = np.asarray(fn(tok, valid, m) if masks is not None else fn(tok, valid))[:len(idx)]
        if out is None:
            out = np.zeros((n,) + res.shape[1:], res.dtype)
        out[idx] = res
    return out
