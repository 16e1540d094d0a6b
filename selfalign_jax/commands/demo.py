"""`selfalign demo`: the embedded default (a synthetic world with an exact judge)."""

from pathlib import Path
from typing import Literal


def main(run_dir: Path = Path("runs/demo"), domain: Literal["discrimination", "hate", "unethical"] = "discrimination",
         seeds: int = 64, iterations: int = 2, seed: int = 0, eval_per_domain: int = 50,
         cache_dir: Path | None = None, force: bool = False) -> None:
    """Show ISARA working on a 2-core CPU with nothing to download: pretrain (once, cached) a tiny model in
    a synthetic world whose harmful / safe answers are known exactly, align it from aligned seed pairs of
    one harm domain, compare with the paper's baselines, and write RUN_DIR/report.md and report.png.
    Running it again reuses the cached base model and the finished stages.

    Args:
        run_dir: where the run goes (resumed if it exists with the same settings).
        domain: the harm domain the seeds come from (the others measure cross-domain transfer).
        seeds: number of aligned seed pairs.
        iterations: ISARA iterations T.
        seed: seed of the world, the base model and the run.
        eval_per_domain: held-out eval prompts per domain.
        cache_dir: base-model cache (default $SELFALIGN_CACHE or ~/.cache/selfalign-jax).
        force: start over if RUN_DIR holds a run with other settings.
    """
    import json

    from selfalign_jax.report import table
    from selfalign_jax.world.demo import run_demo

    out, rows = run_demo(run_dir, domain, seeds, iterations, seed, eval_per_domain, cache_dir=cache_dir,
                         force=force)
    print()
    cols = [k for k in dict.fromkeys(k for r in rows for k in r)
            if k.split("/")[0] in ("harmful_rate", "helpful_rate")] + ["kept", "scaling_ratio"]
    print(table(rows, cols))
    print(f"\nreport: {run_dir / 'report.md'}  plot: {run_dir / 'report.png'}")
    print(json.dumps(out))
