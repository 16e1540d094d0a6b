"""ISARA: iterative self-alignment with retrieval-augmented in-context learning (../shared/ISARA.md).

    pools = [D_0 = seeds];  M_0 = base model
    for t in 1..T:
        questions = write_questions(M_{t-1}, pools, t)           # steps 1-2: ICL from random demos
        answers   = write_answers(M_{t-1}, pools, questions, t)  # step 3: ICL from retrieved demos
        D_t       = filter_answers(answers, pools)               # step 4: the four rule filters
        M_t       = sft(M_{t-1}, D_0 + D_t, lr * decay^(t-1))    # step 5
        evaluate(M_t)                                            # step 6: greedy, no demonstrations
        pools.append(D_t)

This module holds the steps; the loop with its resumable run directory is `rundir.run`. Every random
draw comes from a key derived from (seed, iteration, stage), never from a running key, so a resumed
run equals an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import jax
import numpy as np

from selfalign_jax.core import checkpoint, hostmem, train
from selfalign_jax.core import generate as G
from selfalign_jax.app import config as app_config, filters
from selfalign_jax.app.config import IsaraConfig
from selfalign_jax.core.settings import GenConfig, given_train_fields, pin_split
from selfalign_jax.core.loaded import LoadedModel
from selfalign_jax.core.mesh import compute_dtype, make_mesh, writer_only
from selfalign_jax.core.template import MARKERS, Template, cut

STAGES = {"questions": 1, "answers": 2, "filter": 3, "sft": 4, "eval": 5, "icl": 6}


# ---------------------------------------------------------------------------------- run helpers
def stage_rng(seed: int, t: int, stage: str) -> np.random.Generator:
    return np.random.default_rng([seed, t, STAGES[stage]])


def stage_key(seed: int, t: int, stage: str):
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), t), STAGES[stage])


def log(msg: str) -> None:
    print(f"[isara {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def memory_note() -> str:
    """This process's resident set now, the part of it that is live JAX arrays, and its peak so far (the peak is
    what /usr/bin/time -v reports)."""
    arrays = sum(x.nbytes for x in jax.live_arrays())
    return (f"RSS {hostmem.rss_bytes() / 2**30:.2f} GiB (arrays {arrays / 2**30:.2f} GiB), "
            f"peak {hostmem.peak_rss_bytes() / 2**30:.2f} GiB")


def generate(model: LoadedModel, prompts: list[str], gen: GenConfig, key, batch_size=None,
             desc: str = "generate", mesh: str | None = None) -> list[str]:
    """Completions of `prompts` (text after the prompt, cut at the first template marker)."""
    log(f"{desc}: {len(prompts)} prompts, up to {gen.max_new_tokens} new tokens"
        + (f", {gen.num_beams} beams" if gen.num_beams > 1 else ""))
    res = G.generate(model.params, model.cfg, model.tokenizer, prompts, gen, stop=MARKERS, key=key,
                     batch_size=batch_size, progress=True, mesh=make_mesh(mesh) if mesh else None)
    hostmem.release()  # the sampler's freed cache and working memory back to the kernel (core/hostmem.py)
    return [cut(r.text) for r in res]


# ------------------------------------------------------------------------------- ISARA, step 1
def demo_counts(t: int, k: int) -> list[int]:
    """Demonstrations per pool set D_0..D_{t-1} at iteration t: 1 from each generated set, the rest
    seeds; past t = K + 1 only the K newest generated sets give one (the authors' `[1]*t` rule
    stops there)."""
    earlier = min(t - 1, k)
    return [k - earlier] + [0] * (t - 1 - earlier) + [1] * earlier


def fit_budget(template: Template, tokenizer, demos: list[tuple[str, str]], render, budget: int):
    """The demonstrations, in order, that fit: each is added only if the rendered prompt stays under
    `budget` tokens (`<`); one that does not fit is skipped and later ones are still tried (the
    authors' rule). `render` always renders the rest of the prompt (e.g. the question)."""
    kept = []
    for d in demos:
        if len(tokenizer(render(kept + [d])).input_ids) < budget:
            kept.append(d)
    return kept


# ------------------------------------------------------------------------------- ISARA, step 2
def draw_demos(pools: list[list[dict]], counts: list[int], rng) -> list[tuple[str, str]]:
    """One question prompt's demonstrations: counts[j] distinct random pairs of pool set j, in pool order."""
    demos = []
    for pool, c in zip(pools, counts):
        idx = rng.choice(len(pool), size=min(c, len(pool)), replace=False)
        demos += [(pool[i]["question"], pool[i]["answer"]) for i in idx]
    return demos


def write_questions(model: LoadedModel, pools: list[list[dict]], t: int, cfg: IsaraConfig) -> list[dict]:
    """N prompts of random demonstrations (counts per pool set from step 1), each ending with
    `BEGINNING OF CONVERSATION: USER:`; the model's continuation, cut at a marker, is the question.
    Order as the authors': the seeds, then the one demo from each generated set in pool order (the
    newest next to the `USER:` slot); no shuffle across sets."""
    tpl, rng = Template(cfg.template, model.tokenizer), stage_rng(cfg.seed, t, "questions")
    counts, budget = demo_counts(t, cfg.demos), prompt_budget(model, cfg, cfg.question_gen)
    prompts, demo_sets = [], []
    for _ in range(cfg.generate):
        demos = fit_budget(tpl, model.tokenizer, draw_demos(pools, counts, rng), tpl.question_prompt, budget)
        prompts.append(tpl.question_prompt(demos))
        demo_sets.append(demos)
    qs = generate(model, prompts, cfg.question_gen, stage_key(cfg.seed, t, "questions"),
                  cfg.batch_size, desc=f"iter {t} questions", mesh=cfg.mesh)
    return [{"question": q, "demo_questions": [d[0] for d in ds], "n_demos": len(ds)}
            for q, ds in zip(qs, demo_sets)]


def prompt_budget(model: LoadedModel, cfg: IsaraConfig, gen: GenConfig) -> int:
    """The context budget, leaving room for the generated tokens within the model's context."""
    return max(16, min(cfg.context_budget, model.cfg.max_pos - gen.max_new_tokens))


# ------------------------------------------------------------------------------- ISARA, step 3
def write_answers(model: LoadedModel, pools, indexes, embedder, questions: list[dict], t: int,
                  cfg: IsaraConfig) -> list[dict]:
    """For each new question, demonstrations from each pool set (counts as in step 1): its nearest
    neighbours (answer_demos="knn"), or random ones ("random", the authors' --random ablation); then the
    question; the model's continuation is the answer. Order as the authors': per set, nearest first,
    seeds then D_1..D_{t-1}, so the generated neighbour stands right before the question. The budget
    skips demonstrations that do not fit; the question is always kept."""
    tpl = Template(cfg.template, model.tokenizer)
    counts, budget = demo_counts(t, cfg.demos), prompt_budget(model, cfg, cfg.answer_gen)
    qs = [q["question"] for q in questions]
    if cfg.answer_demos == "random":
        rng = stage_rng(cfg.seed, t, "answers")
        per_set = [[rng.choice(len(pool), size=min(c, len(pool)), replace=False) for _ in qs]
                   for pool, c in zip(pools, counts)]
    else:
        q_vecs = embedder.embed(qs)
        per_set = [index.query(q_vecs, c) if c > 0 else [[] for _ in qs]
                   for index, c in zip(indexes, counts)]
    prompts, used = [], []
    for i, q in enumerate(qs):
        demos = []
        for pool, ids in zip(pools, per_set):
            demos += [(pool[j]["question"], pool[j]["answer"]) for j in ids[i] if j >= 0]
        demos = fit_budget(tpl, model.tokenizer, demos, lambda ds: tpl.answer_prompt(ds, q), budget)
        prompts.append(tpl.answer_prompt(demos, q))
        used.append(len(demos))
    answers = generate(model, prompts, cfg.answer_gen, stage_key(cfg.seed, t, "answers"),
                       cfg.batch_size, desc=f"iter {t} answers", mesh=cfg.mesh)
    return [{**q, "answer": a, "n_answer_demos": n} for q, a, n in zip(questions, answers, used)]


# ------------------------------------------------------------------------------- ISARA, step 4
def filter_answers(answers: list[dict], pools, t: int, cfg: IsaraConfig) -> tuple[list[dict], dict]:
    """The paper's four rule filters; returns the kept pairs and the drop counts by reason."""
    fcfg = filters.FilterConfig(cfg.rouge_threshold, cfg.min_words, cfg.min_words)
    # dedup "all": against every pool set too; "iteration" (the authors'): this iteration's kept only
    seen = [s["question"] for pool in pools for s in pool] if cfg.dedup == "all" else []
    res = filters.filter_pairs([(a["question"], a["answer"], a["demo_questions"]) for a in answers],
                               seen_questions=seen, cfg=fcfg)
    kept = [{"question": answers[i]["question"], "answer": answers[i]["answer"], "source": f"D_{t}",
             "iteration": t} for i in res.kept_idx]
    return kept, {r: res.counts.get(r, 0) for r in filters.REASONS}


# ------------------------------------------------------------------------------- ISARA, step 5
def sft(model: LoadedModel | Path, pairs: list[dict], out_dir: Path, lr: float, cfg: IsaraConfig,
        t: int) -> LoadedModel:
    """Fine-tune the current model (loaded, or its directory: read straight into the train state) on `pairs`
    (loss on answers), export to out_dir, return M_t."""
    path = Path(model) if isinstance(model, (str, Path)) else model.path
    base = checkpoint.read_config(path)
    if isinstance(model, LoadedModel):
        dtype, max_pos, tokenizer = model.cfg.dtype, model.cfg.max_pos, model.tokenizer
    else:
        dtype, max_pos = compute_dtype(cfg.dtype), checkpoint.config_from_hf(base).max_pos
        tokenizer = checkpoint.load_tokenizer(path)
    tcfg = dataclasses.replace(cfg.sft, lr=lr, seed=cfg.seed * 1000 + t, dtype=dtype,
                               max_length=min(cfg.sft.max_length, max_pos - 1), mesh=cfg.mesh or cfg.sft.mesh)
    tcfg = pin_split(tcfg, given_train_fields(app_config.COMMAND_LINE, "sft."))  # --sft.batch-size etc. run as given
    log(f"SFT of {path.name} on {len(pairs)} pairs, lr {lr:.3g}")
    # Orbax train state (params + Adam moments in fp32: 3x the model): only for resuming this SFT, so it
    # is deleted once the model is exported
    ckpt = Path(out_dir).with_name(Path(out_dir).name + ".ckpt")
    trained = train.finetune(model, [(p["question"], p["answer"]) for p in pairs], tokenizer, out_dir=out_dir,
                             train_cfg=tcfg, template=Template(cfg.template, tokenizer), checkpoint_dir=ckpt,
                             base_config=base)
    if ckpt.is_dir():
        writer_only("sft_ckpt", lambda: shutil.rmtree(ckpt))
    hostmem.release()
    return trained


# ------------------------------------------------------------------------------- ISARA, step 6
def answer_questions(model: LoadedModel, questions: list[str], max_new_tokens: int, demos_for=None,
                     template: str = "plain", seed: int = 0, batch_size=None, mesh: str | None = None) -> list[str]:
    """Greedy answers to `questions` (optionally with demonstrations: ICL baselines; rendered in the
    order given, for ICL-kNN nearest first as the authors')."""
    tpl = Template(template, model.tokenizer)
    budget = max(16, model.cfg.max_pos - max_new_tokens)
    prompts = []
    for i, q in enumerate(questions):
        demos = demos_for(i, q) if demos_for else []
        demos = fit_budget(tpl, model.tokenizer, demos, lambda ds: tpl.answer_prompt(ds, q), budget)
        prompts.append(tpl.answer_prompt(demos, q))
    gen = GenConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    return generate(model, prompts, gen, stage_key(seed, 0, "eval"), batch_size, desc="evaluate", mesh=mesh)


def evaluate(model: LoadedModel, eval_set: list[dict], scorer, cfg: IsaraConfig, demos_for=None) -> tuple[list, dict]:
    """Zero-shot greedy answers (up to eval_max_new_tokens) scored by `scorer`."""
    qs = [r["question"] for r in eval_set]
    answers = answer_questions(model, qs, cfg.eval_max_new_tokens, demos_for, cfg.template, cfg.seed,
                               cfg.batch_size, cfg.mesh)
    res = scorer.score(qs, answers, eval_set)
    rows = [{**r, "response": a, **item} for r, a, item in zip(eval_set, answers, res["items"])]
    return rows, res["metrics"]
