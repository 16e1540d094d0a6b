"""`selfalign run`: the ISARA loop, resumable."""

from pathlib import Path
from typing import Annotated

import tyro

from selfalign_jax import config as settings
from selfalign_jax.config import IsaraConfig


def main(model: Path, seeds: Path, run_dir: Path, eval: Path | None = None, scorer: str | None = None,
         config: str | None = None, max_new_tokens: int | None = None, force: bool = False,
         cfg: Annotated[IsaraConfig, tyro.conf.arg(name="")] = IsaraConfig()) -> None:
    """Align MODEL with ISARA from SEEDS; resumes when RUN_DIR holds an unfinished run of the same config.

    Args:
        model: base model (Hugging Face directory, safetensors).
        seeds: seed (question, answer) pairs: plain JSONL or any format `selfalign data` reads.
        run_dir: run directory (config, per-iteration data, models, metrics.jsonl, report.md/png).
        eval: evaluation prompts (any format `selfalign data` reads); evaluates base and each M_t.
        scorer: how to score eval answers (see `selfalign eval --help`); needed with --eval.
        config: a preset JSON (e.g. configs/paper.json, configs/fast.json); flags given override it.
        max_new_tokens: sets both --question-gen.max-new-tokens and --answer-gen.max-new-tokens.
        force: start over in a run directory made with a different config (old results moved aside).
    """
    from selfalign_jax import rundir
    from selfalign_jax.data import read_eval, read_seeds
    from selfalign_jax.evaluate import get_scorer, precheck
    from selfalign_jax.errors import UserError

    if eval and not scorer:
        raise UserError("--eval needs --scorer (see `selfalign eval --help`)")
    if scorer and not eval:
        raise UserError("--scorer needs --eval PROMPTS (there is nothing to score without them)")
    c = rundir.resolve(cfg, config, max_new_tokens, given=rundir.given_fields(settings.COMMAND_LINE))
    rundir.check_run_dir(run_dir)
    seed_rows = read_seeds(seeds)
    eval_rows = read_eval(eval) if eval else None
    sc = get_scorer(scorer, model=model) if eval_rows is not None else None
    precheck(sc, eval_rows)
    rows = rundir.run(model, seed_rows, run_dir, c, eval_rows, sc, force)
    from selfalign_jax.report import table
    print(table(rows))
    print(f"report: {Path(run_dir) / 'report.md'}")
