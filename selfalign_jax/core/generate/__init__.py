"""Text generation: `generate(params, cfg, tokenizer, prompts, gen)` for a GenConfig (sampler.py), over static
batches (static.py), continuous batching (continuous.py) or beams (beam.py); the jitted steps (steps.py), token
choice (choose.py), the KV cache and its placement (cache.py), batch sizing (sizing.py), prompts and results
(prompts.py)."""

from selfalign_jax.core.generate.prompts import Result
from selfalign_jax.core.generate.sampler import generate

__all__ = ["Result", "generate"]
