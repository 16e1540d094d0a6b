"""`selfalign eval`: zero-shot greedy answers to eval questions, scored."""

from pathlib import Path
from typing import Literal


def main(model: Path, data: Path, scorer: str, out: Path | None = None, max_new_tokens: int = 200,
         template: Literal["plain", "chat"] = "plain", batch_size: int | None = None, seed: int = 0,
         mesh: str | None = None, distributed: bool = False) -> None:
    """Answer DATA's questions zero-shot with MODEL (greedy) and score the answers.

    Scorers: `keywords:FILE` (regexes; a match is harmful), `world` (the demo world's exact judge),
    `classifier:DIR[:THRESHOLD]` (HF *ForSequenceClassification, e.g. Beaver-Dam: harmful rate),
    `truthfulqa` (BLEU / ROUGE-L to true minus false references), `truthfulqa-mc[:DIR]` (likelihood of
    the reference answers), `pairwise:JUDGE_DIR:OTHER.jsonl` (win rate against OTHER's answers).

    Args:
        model: the model to evaluate (HF directory).
        data: eval prompts (plain JSONL or any format `selfalign data` reads).
        scorer: scorer spec (above).
        out: write each item with its response and labels here (JSONL), and metrics to OUT.metrics.json.
        max_new_tokens: answer length limit.
        template: plain ISARA template or the model's own chat template.
        batch_size: generation batch (default: from a memory budget).
        seed: key for the (greedy, so unused) sampler.
        mesh: shard generation (and likelihood scoring) over the devices, e.g. data=2,tensor=4.
        distributed: call jax.distributed.initialize() first (multi-host; also implied by
            JAX_COORDINATOR_ADDRESS).
    """
    from selfalign_jax import api

    api.evaluate(model, data, scorer, out, max_new_tokens, template, batch_size, seed, mesh=mesh,
                 distributed=distributed)
