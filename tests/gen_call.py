"""Calling the sampler with flat keyword arguments, as the tests spell their cases: GenConfig fields go into a
GenConfig (a sequence for a per-prompt field goes into per_prompt), the rest to generate as they are. Defaults:
greedy (temperature 0 unless do_sample), static batches, beam search when num_beams > 1."""

import dataclasses

import numpy as np

from selfalign_jax.core.generate import generate as _generate
from selfalign_jax.core.generate.sampler import PER_PROMPT
from selfalign_jax.core.settings import GenConfig

FIELDS = {f.name for f in dataclasses.fields(GenConfig)}


def settings(**kw) -> tuple[GenConfig, dict, dict]:
    """(GenConfig, per_prompt, the other keyword arguments) of a flat keyword set."""
    per = {k: kw.pop(k) for k in list(kw)
           if k in PER_PROMPT and (not isinstance(kw[k], (int, float)) or (k == "max_new_tokens" and kw[k] == 0))}
    g = {k: kw.pop(k) for k in list(kw) if k in FIELDS}
    g.setdefault("do_sample", False)
    g.setdefault("temperature", 1.0 if g["do_sample"] else 0.0)
    g.setdefault("continuous", False)
    if "max_new_tokens" in per:
        g.setdefault("max_new_tokens", max(1, int(max(np.atleast_1d(per["max_new_tokens"]), default=1))))
    return GenConfig(**g), per, kw


def generate(params, cfg, tokenizer, prompts, **kw):
    gen, per, rest = settings(**kw)
    return _generate(params, cfg, tokenizer, prompts, gen, per_prompt=per or None, **rest)
