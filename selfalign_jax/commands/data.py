"""`selfalign data`: convert a public dataset file to the plain {question, answer} JSONL."""

from collections import Counter
from pathlib import Path
from typing import Literal

from selfalign_jax import data as dataset
from selfalign_jax import fileio
from selfalign_jax.errors import UserError

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
    if eval_out is not None and seeds is None:
        raise UserError("--eval-out needs --seeds N")
    paths = [p.resolve() for p in (input, out, eval_out) if p is not None]
    if len(set(paths)) != len(paths):
        raise UserError("--input, --out and --eval-out must be different files")
    fileio.check_output(out)
    if eval_out is not None:
        fileio.check_output(eval_out, "--eval-out")
    if seeds is not None and seeds < 1:
        raise UserError("--seeds must be >= 1")
    loaded = dataset.load(input, format)
    rows = loaded.samples
    print(f"read {len(rows)} rows from {input} (format {loaded.format})")
    for why, n in sorted(loaded.skipped.items()):
        print(f"  skipped {n} rows: {why}")
    if category:
        rows = dataset.filter_categories(rows, category, input)
        print(f"kept {len(rows)} rows in categories {', '.join(category)}")
    if seeds is None:
        fileio.write_jsonl(out, rows)
        print(f"wrote {len(rows)} rows to {out}")
        _per_category(rows)
        return
    if seeds > len(rows):
        raise UserError(f"{input}: --seeds {seeds} but only {len(rows)} rows (after filtering)")
    seed_rows, rest = dataset.split_seeds(rows, seeds, seed)
    empty = sum(1 for s in seed_rows if not s.answer.strip())
    if empty:
        raise UserError(f"{input}: {empty} of the {seeds} seeds have no answer (format {loaded.format}); "
                        f"seeds need answers")
    fileio.write_jsonl(out, seed_rows)
    print(f"wrote {len(seed_rows)} seeds to {out} (seed {seed})")
    if eval_out is not None:
        fileio.write_jsonl(eval_out, rest)
        print(f"wrote {len(rest)} eval rows to {eval_out}")
    else:
        print(f"{len(rest)} rows not drawn as seeds were not written (no --eval-out)")
    _per_category(seed_rows)


def _per_category(rows) -> None:
    counts = Counter(s.category for s in rows if s.category)
    if 1 < len(counts) <= 15:
        for c, n in sorted(counts.items()):
            print(f"  {n:6d}  {c}")
