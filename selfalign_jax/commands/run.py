"""`selfalign run`: the ISARA loop, resumable."""

from pathlib import Path
from typing import Annotated

import tyro

from selfalign_jax.app.config import IsaraConfig


def main(model: Path, seeds: Path, run_dir: Path, eval: Path | None = None, scorer: str | None = None,
         config: str | None = None, max_new_tokens: int | None = None, force: bool = False,
         hbm_gib: float | None = None, distributed: bool = False,
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
        hbm_gib: memory per device in GiB for the up-front plan check (default: the accelerator's; none on a CPU).
        distributed: call jax.distributed.initialize() first (multi-host; also implied by
            JAX_COORDINATOR_ADDRESS).
    """
    from selfalign_jax import api

    api.run(model, seeds, run_dir, eval, scorer, config, max_new_tokens, force, hbm_gib=hbm_gib,
            distributed=distributed, cfg=cfg)
