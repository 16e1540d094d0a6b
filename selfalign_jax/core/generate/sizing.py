"""How many rows a generation batch takes: the largest power of two whose KV cache and working memory fit a
memory budget (`auto_batch_size`), from the padded cache lengths (`cache_lengths`) and a row's working memory
besides its cache (`work_bytes`, the formula the planner core/plan.py uses too); and how many prompts one
continuous-batching insertion prefills at a time (`insert_rows`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from selfalign_jax.core import model as M
from selfalign_jax.core.buckets import pow2
from selfalign_jax.core.generate.cache import chunks, new_tokens_bucket, prompt_bucket


def auto_batch_size(cfg: M.Config, prompt_len: int, max_new_tokens: int, budget_bytes: int | None = None,
                    max_batch: int | None = None, cache_dtype=None) -> int:
    """Largest power of two whose KV cache plus prefill/decode working memory fits the budget.
    budget_bytes: default = 85% of the free accelerator memory, or 4 GiB on CPU."""
    dev = jax.devices()[0]
    if budget_bytes is None:
        stats = dev.memory_stats() if dev.platform != "cpu" else None
        if stats and "bytes_limit" in stats:
            budget_bytes = int(0.85 * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)))
        else:
            budget_bytes = 4 << 30
    if max_batch is None:
        max_batch = 64 if dev.platform == "cpu" else 256
    Tp, Tn = cache_lengths(prompt_len, max_new_tokens)
    per_row = (M.cache_row_bytes(cfg, Tp + Tn, cache_dtype)
               + work_bytes(cfg, Tp, Tn, cfg.n_heads, cfg.intermediate, jnp.dtype(cfg.dtype).itemsize))
    b = max(1, budget_bytes // per_row)
    return int(max(1, min(max_batch, 1 << (int(b).bit_length() - 1))))


def cache_lengths(prompt_len: int, max_new_tokens: int) -> tuple[int, int]:
    """(prompt slots Tp, new-token slots Tn) of a batch's cache: the prompt but its last token, bucketed."""
    return prompt_bucket(max(1, prompt_len - 1)), new_tokens_bucket(max_new_tokens)


def work_bytes(cfg: M.Config, Tp: int, Tn: int, heads: int, inter: int, itemsize: int) -> int:
    """Working memory of one row besides its KV cache (`heads` / `inter`: the query heads and MLP width one
    device holds): the loop state, plus the prefill's (one chunk of tokens: the fp32 scores of one key block,
    the running output and the MLP activations) or the decode step's (fp32 logits and scores), the larger."""
    S, C = Tp + Tn, chunks(Tp)[1]
    state = S * 8 + Tn * 8 + cfg.vocab_size
    keys = min(S, M.KEY_BLOCK)
    prefill = C * (3 * heads * keys * 4 + 2 * heads * cfg.head_dim * 4
                   + (3 * inter + 8 * cfg.hidden + 3 * heads * cfg.head_dim) * itemsize)
    decode = 10 * cfg.vocab_size * 4 + 3 * heads * S * 4
    return state + max(prefill, decode)



def batch_rows(n: int, cap: int, mult: int) -> int:
    """Rows of a batch for n prompts: a power of two (at most cap), a multiple of the mesh's row count."""
    B = pow2(n) if pow2(n) <= cap else cap
    return -(-B // mult) * mult


INSERT_SPLIT = 4  # an insertion prefills at most a quarter of the batch's rows at a time


def insert_rows(B: int, mult: int) -> int:
    """Most prompts one continuous-batching insertion prefills (`generate/steps.insert`): B / INSERT_SPLIT, a
    multiple of the mesh's row count. The insertion's own cache (rows x prompt slots) and its prefill's
    activations scale with it; a batch's first fill runs as INSERT_SPLIT such insertions in a row."""
    return max(mult, B // INSERT_SPLIT // mult * mult)
