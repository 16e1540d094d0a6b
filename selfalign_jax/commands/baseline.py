"""`selfalign baseline`: the paper's baselines, written beside an ISARA run."""

from pathlib import Path
from typing import Annotated, Literal

import tyro

from selfalign_jax.app.config import IsaraConfig


def main(kind: Literal["pretrained", "sft", "icl-knn", "icl-random", "one-round"], model: Path, seeds: Path,
         run_dir: Path, eval: Path, scorer: str, config: str | None = None,
         max_new_tokens: int | None = None, force: bool = False, distributed: bool = False,
         cfg: Annotated[IsaraConfig, tyro.conf.arg(name="")] = IsaraConfig()) -> None:
    """Run one baseline into RUN_DIR/baselines/KIND and refresh the run's report.

    pretrained: the base model zero-shot; sft: SFT on the seeds only; icl-knn / icl-random: the base
    model with K retrieved / random seed demonstrations at inference; one-round: one ISARA iteration
    generating T x N samples.

    Args:
        kind: which baseline.
        model: base model directory.
        seeds: seed pairs (as for `selfalign run`).
        run_dir: the run directory shared with `selfalign run` (same config).
        eval: evaluation prompts.
        scorer: how to score answers (see `selfalign eval --help`).
        config: preset JSON; flags given override it.
        max_new_tokens: sets both question and answer generation lengths.
        force: start over if RUN_DIR was made with a different config.
        distributed: call jax.distributed.initialize() first (multi-host; also implied by
            JAX_COORDINATOR_ADDRESS).
    """
    from selfalign_jax import api

    api.baseline(kind, model, seeds, run_dir, eval, scorer, config, max_new_tokens, force,
                 distributed=distributed, cfg=cfg)
