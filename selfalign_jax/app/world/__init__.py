"""The synthetic alignment world: a small language with known ground truth, its corpus, judge and tokenizer."""

from selfalign_jax.app.world.corpus import eval_prompts, pretraining_documents, render, seed_pairs
from selfalign_jax.app.world.judge import harmful_rate, helpful_rate, judge_all, rates
from selfalign_jax.app.world.language import BENIGN_DOMAINS, DOMAINS, HARM_DOMAINS, PERSONAS

__all__ = ["eval_prompts", "pretraining_documents", "render", "seed_pairs", "harmful_rate", "helpful_rate",
           "judge_all", "rates", "BENIGN_DOMAINS", "DOMAINS", "HARM_DOMAINS", "PERSONAS"]
