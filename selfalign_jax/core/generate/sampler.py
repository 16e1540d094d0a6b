"""Batched text generation with a KV cache: one entry point, `generate`, for a `GenConfig`.

API
    generate(params, cfg, tokenizer, prompts, gen, *, per_prompt=None, stop=MARKERS, seed=0, key=None,
             batch_size=None, memory_budget=None, chat_template=False, truncate="left", ignore_eos=False,
             stop_check_every=8, progress=False, in_out_weights=None, mesh=None) -> list[Result]
        prompts: strings (tokenized as the tokenizer does by default, so with BOS if it adds one; no chat
        template unless chat_template=True) or lists of token ids (used as given).
        gen: the settings (core/settings.py GenConfig). num_beams 1: sampling, greedy at temperature 0, with
        continuous batching when gen.continuous (greedy output is identical to static batches); num_beams > 1:
        beam search, or beam-sample with do_sample (beam.py). temperature / top_k / top_p / repetition_penalty
        are traced arrays, so changing them never recompiles; no_repeat_ngram is static (one compile per value).
        per_prompt: {field: one value per prompt} for max_new_tokens, temperature, top_k, top_p,
        repetition_penalty, overriding gen's value of that field (a limit of 0 gives an empty "length" result).
        stop: stop strings (default: the ISARA template markers; () for none), checked on the host every
        stop_check_every steps (prompts.py). EOS ids: cfg.eos_ids plus tokenizer.eos_token_id (ignore_eos=True:
        generate max_new_tokens always).
        mesh: a ('data', 'fsdp', 'tensor') Mesh (core/mesh.py make_mesh, the same --mesh as training) or None
        (one device). Parameters are placed by the model's sharding rules (cache.sharding_rules); batch rows over
        data x fsdp (batch sizes are rounded up to a multiple of data x fsdp; the default batch size is per
        data x fsdp shard); the KV cache rows likewise, its KV heads over tensor when the parameters' are.
        Results are gathered for the host. Single-process (one host) meshes.
    Result(text, token_ids, logprobs, finish_reason, prompt_tokens, truncated)
        text: the completion (text after the prompt, special tokens removed, cut before the first stop string,
        not stripped); token_ids: the generated ids, through the EOS or the token that completed the stop
        string; logprobs[i]: log p(token_ids[i]) under the model's *unprocessed* next-token distribution
        (temperature 1, no penalty or truncation); finish_reason: "eos", "stop", "length" (max_new_tokens) or
        "context" (the context length cfg.max_pos was reached); prompt_tokens: after truncation; truncated:
        prompt tokens dropped from the left.

Semantics: transformers' logits processors in their order (choose.py). Padding never counts as a seen token or
as part of an n-gram (unlike transformers on a padded batch): each row behaves as if it were generated alone.
gen.penalize_prompt=False: the repetition penalty and the n-gram ban see the generated tokens only
(transformers' `generate`, the default, applies both to prompt + generated ids).

Determinism: row i (the i-th prompt) draws its t-th token with uniform(fold_in(fold_in(key, i), t)) and an inverse
CDF: the output for a given key does not depend on the batch size, on the batch a prompt lands in, or on the other
prompts (up to float rounding differences between batch shapes).

How it runs: prompts are sorted by length (longest first) and cut into batches (`batch_size`, or the largest power
of two whose KV cache and working memory fit `memory_budget`: sizing.py); each batch is left-padded to a prompt
bucket, the batch to a power of two and max_new_tokens to a power of two, so the number of compiles stays small
(cache.py). The prefill writes a preallocated KV cache; the decode is one jitted lax.while_loop (steps.py); static
batches (static.py), continuous batching (continuous.py) or beams (beam.py) drive them. On CPU the weights are used
through a transient [in, out] copy (model.inference_layout: faster small-batch matmuls).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np

from selfalign_jax.core import model as M
from selfalign_jax.core.errors import UserError
from selfalign_jax.core.generate import beam, continuous, static
from selfalign_jax.core.generate.cache import place_params, placement
from selfalign_jax.core.generate.prompts import Job, Result, eos_ids, per_prompt as _values, tokenize_prompts
from selfalign_jax.core.generate.sizing import auto_batch_size
from selfalign_jax.core.settings import GenConfig
from selfalign_jax.core.template import MARKERS

PER_PROMPT = {"max_new_tokens": np.int64, "temperature": np.float32, "top_k": np.int32, "top_p": np.float32,
              "repetition_penalty": np.float32}  # GenConfig fields that may take one value per prompt


def generate(params: M.Params, cfg: M.Config, tokenizer, prompts: Sequence[str] | Sequence[Sequence[int]],
             gen: GenConfig, *, per_prompt: Mapping[str, Sequence] | None = None, stop: Sequence[str] = MARKERS,
             seed: int = 0, key=None, batch_size: int | None = None, memory_budget: int | None = None,
             chat_template: bool = False, truncate: str = "left", ignore_eos: bool = False,
             stop_check_every: int = 8, progress: bool = False, in_out_weights: bool | None = None,
             mesh=None) -> list[Result]:
    """A completion for every prompt, in input order (see the module docstring)."""
    n = len(prompts)
    if stop_check_every < 1:
        raise UserError("stop_check_every must be >= 1")
    if truncate not in ("left", "error"):
        raise UserError(f"truncate: expected 'left' or 'error', got {truncate!r}")
    bad = sorted(set(per_prompt or ()) - set(PER_PROMPT))
    if bad:
        raise UserError(f"per_prompt: {bad[0]!r} cannot vary per prompt (choose from {', '.join(PER_PROMPT)})")
    v = {f: _values(f, (per_prompt or {}).get(f, getattr(gen, f)), n, dt) for f, dt in PER_PROMPT.items()}
    limit, temp, topk, topp, pen = (v[f] for f in PER_PROMPT)
    _check(gen, limit, temp, topk, topp, pen)
    key = jax.random.key(seed) if key is None else key
    ids, truncated = tokenize_prompts(tokenizer, prompts, cfg, chat_template, truncate)
    results: list[Result | None] = [None] * n
    for i in range(n):
        if limit[i] == 0:
            results[i] = Result("", [], [], "length", len(ids[i]), truncated[i])
    order = sorted((i for i in range(n) if limit[i] > 0), key=lambda i: -len(ids[i]))
    if not order:
        return results
    params, place = prepare(params, cfg, mesh, in_out_weights)
    job = Job(gen, params, cfg, tokenizer, ids, key, temp, topk, topp, pen, limit, eos_ids(cfg, tokenizer, ignore_eos),
              int(cfg.pad_id if cfg.pad_id is not None else 0), tuple(s for s in (stop or ()) if s), stop_check_every,
              place)
    mult = job.rows_multiple
    if batch_size is None:
        batch_size = max(1, auto_batch_size(cfg, len(ids[order[0]]), int(limit.max()), memory_budget)
                         // gen.num_beams) * mult
    batch_size = -(-max(1, int(batch_size)) // mult) * mult
    from tqdm import tqdm

    bar = tqdm(total=len(order), desc="generate", unit="prompt", disable=not progress, leave=False)

    def done(i, r):
        r.truncated = truncated[i]
        results[i] = r
        bar.update(1)

    if gen.num_beams > 1:
        beam.run(job, order, batch_size, done)
    elif gen.continuous:
        continuous.run(job, order, batch_size, done)
    else:
        static.run(job, order, batch_size, done)
    bar.close()
    return results


def _check(gen: GenConfig, limit, temp, topk, topp, pen) -> None:
    """The per-prompt values in range, and the beam settings consistent."""
    if (limit < 0).any():
        raise UserError("max_new_tokens must be >= 0")
    if (temp < 0).any() or not np.isfinite(temp).all():
        raise UserError("temperature must be >= 0 (0 = greedy)")
    if (topk < 0).any():
        raise UserError("top_k must be >= 0 (0 = off)")
    if ((topp <= 0) | (topp > 1)).any():
        raise UserError("top_p must be in (0, 1] (1 = off)")
    if (pen <= 0).any():
        raise UserError("repetition_penalty must be > 0 (1 = off)")
    if gen.num_beams < 1:
        raise UserError(f"num_beams must be >= 1, got {gen.num_beams}")
    if gen.early_stopping not in (True, False, "never"):
        raise UserError(f"early_stopping: expected true, false or \"never\", got {gen.early_stopping!r}")
    decay = gen.exponential_decay_length_penalty
    if decay is not None:
        if gen.num_beams == 1:
            raise UserError("exponential_decay_length_penalty needs num_beams > 1")
        if len(decay) != 2 or decay[1] <= 0:
            raise UserError("exponential_decay_length_penalty: expected [start, factor] with factor > 0")
    if gen.num_beams > 1 and gen.do_sample and (temp <= 0).any():
        raise UserError("beam-sample needs temperature > 0")


def prepare(params: M.Params, cfg: M.Config, mesh, in_out_weights: bool | None):
    """(params placed on the mesh and in the inference layout, Placement or None)."""
    place = placement(cfg, mesh)
    if place is not None:
        params = place_params(params, cfg, mesh)
    if in_out_weights is None:  # CPU: decode matmuls are ~20% faster on [in, out] weights (a transient copy)
        in_out_weights = jax.default_backend() == "cpu" and M.num_params(params) * 4 <= (8 << 30)
    if in_out_weights:
        params = M.inference_layout(params)
    return params, place
