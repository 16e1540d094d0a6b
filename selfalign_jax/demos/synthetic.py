"""`selfalign demo`: ISARA in the synthetic world, end to end, with the paper's baselines.

Builds the world, pretrains (or reuses) the tiny base model, takes aligned seed pairs from one harm
domain, runs the baselines (pretrained, SFT on seeds, ICL-kNN, ICL-random, one round) and ISARA, and
scores held-out prompts of every domain with the world's exact judge: the harmful rate over the prompts of
the three harm domains (target domain and cross-domain, each and together) and the helpful rate over the
prompts of the benign ones (app/evaluate/world.py).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from selfalign_jax.core import fileio
from selfalign_jax.app import rundir
from selfalign_jax.app.config import IsaraConfig
from selfalign_jax.core.settings import GenConfig, TrainConfig
from selfalign_jax.core.errors import UserError
from selfalign_jax.app.evaluate import get_scorer
from selfalign_jax.app.isara import log
from selfalign_jax.app.world import corpus, language, pretrain

# The run's settings for a ~1M-parameter model: the paper's loop and filters with shorter generations,
# and a learning rate a from-scratch tiny model needs (the paper's 2e-5 is for 7B models). Answers are
# sampled with no n-gram ban and no repetition penalty: both act on the prompt too (as in HF `generate`),
# and this world's refusals are formulaic, so a 10-gram ban forbids copying the demonstrations' safe
# answers and pushes the model into garbled, often harmful ones (measured, seed 0, temperature 0.7: 76 of 169
# kept answers harmful with the ban, 9 of 171 without). The paper's beam-sample is not implemented.
DEMO = IsaraConfig(
    iterations=2, generate=192, demos=8, context_budget=900, embedder="lm",
    question_gen=GenConfig(max_new_tokens=40, temperature=1.0, repetition_penalty=1.05,
                                 no_repeat_ngram=10),
    answer_gen=GenConfig(max_new_tokens=48, temperature=0.7, repetition_penalty=1.0, no_repeat_ngram=0),
    eval_max_new_tokens=48,
    lr_decay=0.5, sft=TrainConfig(lr=3e-4, epochs=1, batch_size=16, grad_accum=1, max_length=128),
    batch_size=64, seed=0)


def eval_set(n_per_domain: int, seed: int) -> list[dict]:
    return [r for d in language.DOMAINS for r in corpus.eval_prompts(d, n_per_domain, seed=1000 + seed)]


def summary(rows: list[dict], domain: str, minutes: float) -> dict:
    by = {r["row"]: r for r in rows}
    last = [r for r in rows if r["row"].startswith("isara_it")][-1]
    harm = lambda r, d: r.get(f"harmful_rate/{d}")  # noqa: E731
    out = {"target_domain": domain,
           "pretrained_harmful": harm(by["pretrained"], domain),
           "isara_harmful": harm(last, domain),
           "benign_helpful": last.get("helpful_rate")}  # over the benign prompts, as in report.md
    for name in ("sft", "icl-knn", "icl-random", "one-round"):
        if name in by:
            out[f"{name.replace('-', '_')}_harmful"] = harm(by[name], domain)
    for r in rows:
        if r["row"].startswith("isara_it"):
            out[f"isara_it{r['iteration']}_harmful"] = harm(r, domain)
    out["cross_domain_harmful"] = {d: [harm(by["pretrained"], d), harm(last, d)]
                                   for d in language.HARM_DOMAINS if d != domain}
    out["kept"] = [r.get("kept") for r in rows if r["row"].startswith("isara_it")]
    out["scaling_ratio"] = last.get("scaling_ratio")
    out["minutes"] = round(minutes, 2)
    return out


def run_demo(run_dir: Path, domain: str = "discrimination", seeds: int = 64, iterations: int = 2,
             seed: int = 0, eval_per_domain: int = 50, cfg: IsaraConfig = DEMO, cache_dir=None,
             baselines=("sft", "icl-knn", "icl-random", "one-round"), base_settings=None, force=False) -> dict:
    t0 = time.time()
    if domain not in language.HARM_DOMAINS:
        raise UserError(f"--domain: {domain!r} is not a harm domain ({', '.join(language.HARM_DOMAINS)})")
    rundir.open_run_dir(Path(run_dir))  # locked before the (long) base-model pretraining
    kw = {"settings": base_settings} if base_settings is not None else {}
    base = pretrain.ensure_base_model(cache_dir, seed=seed, log=log, **kw)
    log(f"base model: {base}")
    cfg = dataclasses.replace(cfg, iterations=iterations, seed=seed)
    seed_rows = [{"question": r["question"], "answer": r["answer"]}
                 for r in corpus.seed_pairs(domain, seeds, seed=seed)]
    evals, scorer = eval_set(eval_per_domain, seed), get_scorer("world")
    rows = rundir.run(base, seed_rows, run_dir, cfg, evals, scorer, force=force,
                     argv_note={"demo_domain": domain})
    for kind in baselines:
        log(f"baseline: {kind}")
        rows = rundir.baseline(kind, base, seed_rows, run_dir, cfg, evals, scorer,
                                 note={"demo_domain": domain})
    out = summary(rows, domain, (time.time() - t0) / 60)
    fileio.write_json(Path(run_dir) / "demo.json", out)
    return out, rows
