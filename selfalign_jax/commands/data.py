"""`selfalign data`: convert a public dataset file to the plain {question, answer} JSONL."""

from pathlib import Path
from typing import Literal


Format = Literal["auto", "qa", "alpaca", "alpaca-eval", "hh-rlhf", "beavertails-eval", "beavertails", "truthfulqa"]


def main(
    input: Path,
    out: Path,
    format: Format = "auto",
    category: tuple[str, ...] = (),
    seeds: int | None = None,
    eval_out: Path | None = None,
    seed: int = 0,
) -> None:
    """Convert INPUT to plain JSONL, keep the given categories, optionally split off N seeds.

    Args:
        input: the dataset file (.jsonl, .jsonl.gz, .json or .csv).
        out: where to write the plain JSONL (the seeds when --seeds is given).
        format: the input schema; auto tells it from the extension and fields.
        category: keep only rows with any of these categories (exact labels).
        seeds: draw this many rows as seeds (written to --out); the rest go to --eval-out.
        eval_out: where to write the rows not drawn as seeds.
        seed: random seed for the seed draw (same seed, same split).
    """
    from selfalign_jax import api

    api.data(input, out, format, category, seeds, eval_out, seed)
