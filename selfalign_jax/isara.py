"""ISARA: iterative self-alignment with retrieval-augmented in-context learning (../shared/ISARA.md).

    pools = [D_0 = seeds];  M_0 = base model
    for t in 1..T:
        questions = write_questions(M_{t-1}, pools, t)           # steps 1-2: ICL from random demos
        answers   = write_answers(M_{t-1}, pools, questions, t)  # step 3: ICL from retrieved demos
        D_t       = keep(answers, pools)                         # step 4: the four rule filters
        M_t       = sft(M_{t-1}, D_0 + D_t, lr * decay^(t-1))    # step 5
        evaluate(M_t)                                            # step 6: zero-shot, greedy
        pools.append(D_t)

Every stage writes its output atomically under `run_dir/iter_{t}/` and is skipped when that output
exists, so re-running the same command resumes. Every random draw comes from a key derived from
(seed, iteration, stage), never from a running key, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Literal

import numpy as np

from selfalign_jax.errors import UserError
from selfalign_jax.template import MARKERS, Template, cut

STAGES = {"questions": 1, "answers": 2, "filter": 3, "sft": 4, "eval": 5, "icl": 6}


# -------------------------------------------------------------------------------------- configs
@dataclasses.dataclass(frozen=True)
class GenConfig:
    """Sampling settings of one generation step (temperature 0 = greedy)."""

    max_new_tokens: int = 100
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram: int = 0
    penalize_prompt: bool = True  # False: penalty and n-gram ban over the generated tokens only


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Step 5: fine-tuning of the current model on seeds + the kept pairs."""

    lr: float = 2e-5
    lr_decay: float = 0.5  # the learning rate is multiplied by this every iteration
    epochs: int = 1
    batch_size: int = 32  # effective batch (sequences per optimizer step)
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    max_length: int = 512
    lora_rank: int = 0
    remat: bool = False


@dataclasses.dataclass(frozen=True)
class IsaraConfig:
    """Every knob of a run; the defaults are the reference (paper) settings."""

    iterations: int = 2  # T
    generate: int = 512  # N prompts per iteration
    demos: int = 8  # K demonstrations per prompt
    context_budget: int = 2000  # a demonstration is added only while the prompt stays under this
    template: Literal["plain", "chat"] = "plain"
    embedder: Literal["encoder", "lm", "hashing"] = "lm"
    encoder: str | None = None  # local HF directory of a BERT-family sentence encoder
    question_gen: GenConfig = GenConfig(max_new_tokens=200, temperature=1.0, repetition_penalty=1.05,
                                        no_repeat_ngram=10)
    answer_gen: GenConfig = GenConfig(max_new_tokens=100, temperature=1.0, repetition_penalty=1.2,
                                      no_repeat_ngram=10)
    eval_max_new_tokens: int = 200
    rouge_threshold: float = 0.7
    min_words: int = 5
    sft: SFTConfig = SFTConfig()
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    batch_size: int | None = None  # generation batch (None: from a memory budget)
    seed: int = 0


def load_config(path) -> IsaraConfig:
    """An IsaraConfig from a JSON preset (nested dicts for question_gen / answer_gen / sft)."""
    p = Path(path)
    for d in (Path("configs"), Path(__file__).resolve().parents[1] / "configs"):
        for cand in (d / Path(path).name, d / f"{Path(path).name}.json"):
            if not p.is_file() and cand.is_file():
                p = cand
    if not p.is_file():
        raise UserError(f"--config: no such preset file: {path}")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: not valid JSON (line {e.lineno}: {e.msg})") from None
    return from_dict(d, str(p))


def from_dict(d: dict, where: str = "config") -> IsaraConfig:
    sub = {"question_gen": GenConfig, "answer_gen": GenConfig, "sft": SFTConfig}
    names = {f.name for f in dataclasses.fields(IsaraConfig)}
    kw = {}
    for k, v in d.items():
        if k not in names:
            raise UserError(f"{where}: unknown field {k!r}")
        if k in sub:
            fields = {f.name for f in dataclasses.fields(sub[k])}
            bad = set(v) - fields
            if bad:
                raise UserError(f"{where}: unknown field {k}.{sorted(bad)[0]}")
            v = sub[k](**v)
        kw[k] = v
    return IsaraConfig(**kw)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------------- run helpers
def stage_rng(seed: int, t: int, stage: str) -> np.random.Generator:
    return np.random.default_rng([seed, t, STAGES[stage]])


def stage_key(seed: int, t: int, stage: str):
    import jax

    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), t), STAGES[stage])


def write_jsonl(path: Path, rows) -> None:
    """Atomic: a temp file in the same directory, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def log(msg: str) -> None:
    print(f"[isara {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclasses.dataclass
class Model:
    """The current policy: directory, config, parameters, tokenizer."""

    path: Path
    cfg: object
    params: object
    tokenizer: object

    @classmethod
    def load(cls, path, dtype="auto"):
        from selfalign_jax import checkpoint

        tok = checkpoint.load_tokenizer(path)
        cfg, params = checkpoint.load(path, dtype=None if dtype == "auto" else dtype)
        return cls(Path(path), cfg, params, tok)


def generate(model: Model, prompts: list[str], gen: GenConfig, key, batch_size=None,
             desc: str = "generate") -> list[str]:
    """Completions of `prompts` (text after the prompt, cut at the first template marker)."""
    from selfalign_jax import sampling

    log(f"{desc}: {len(prompts)} prompts, up to {gen.max_new_tokens} new tokens")
    res = sampling.generate(model.params, model.cfg, model.tokenizer, prompts,
                            max_new_tokens=gen.max_new_tokens, temperature=gen.temperature,
                            top_k=gen.top_k, top_p=gen.top_p, repetition_penalty=gen.repetition_penalty,
                            no_repeat_ngram=gen.no_repeat_ngram, stop=MARKERS, key=key,
                            penalize_prompt=gen.penalize_prompt,
                            batch_size=batch_size, progress=True)
    return [cut(r.text) for r in res]


# ------------------------------------------------------------------------------- ISARA, step 1
def demo_counts(t: int, k: int) -> list[int]:
    """Demonstrations per pool set at iteration t: 1 from each of D_1..D_{t-1}, the rest seeds."""
    earlier = min(t - 1, k)
    return [k - earlier] + [1] * earlier


def fit_budget(template: Template, tokenizer, demos: list[tuple[str, str]], render, budget: int):
    """Add demonstrations one at a time while the rendered prompt stays within `budget` tokens."""
    kept = []
    for d in demos:
        if len(tokenizer(render(kept + [d])).input_ids) > budget:
            break
        kept.append(d)
    return kept


# ------------------------------------------------------------------------------- ISARA, step 2
def write_questions(model: Model, pools: list[list[dict]], t: int, cfg: IsaraConfig) -> list[dict]:
    """N prompts of random demonstrations (counts per pool set from step 1), each ending with
    `BEGINNING OF CONVERSATION: USER:`; the model's continuation, cut at a marker, is the question."""
    tpl, rng = Template(cfg.template, model.tokenizer), stage_rng(cfg.seed, t, "questions")
    counts, budget = demo_counts(t, cfg.demos), prompt_budget(model, cfg, cfg.question_gen)
    prompts, demo_sets = [], []
    for _ in range(cfg.generate):
        demos = []
        for pool, c in zip(pools, counts):
            idx = rng.choice(len(pool), size=min(c, len(pool)), replace=False)
            demos += [(pool[i]["question"], pool[i]["answer"]) for i in idx]
        demos = [demos[i] for i in rng.permutation(len(demos))]
        demos = fit_budget(tpl, model.tokenizer, demos, tpl.question_prompt, budget)
        prompts.append(tpl.question_prompt(demos))
        demo_sets.append(demos)
    qs = generate(model, prompts, cfg.question_gen, stage_key(cfg.seed, t, "questions"),
                  cfg.batch_size, desc=f"iter {t} questions")
    return [{"question": q, "demo_questions": [d[0] for d in ds], "n_demos": len(ds)}
            for q, ds in zip(qs, demo_sets)]


def prompt_budget(model: Model, cfg: IsaraConfig, gen: GenConfig) -> int:
    """The context budget, leaving room for the generated tokens within the model's context."""
    return max(16, min(cfg.context_budget, model.cfg.max_pos - gen.max_new_tokens))


# ------------------------------------------------------------------------------- ISARA, step 3
def write_answers(model: Model, pools, indexes, embedder, questions: list[dict], t: int,
                  cfg: IsaraConfig) -> list[dict]:
    """For each new question, its nearest neighbours within each pool set (counts as in step 1) as
    demonstrations, nearest last, then the question; the model's continuation is the answer."""
    tpl = Template(cfg.template, model.tokenizer)
    counts, budget = demo_counts(t, cfg.demos), prompt_budget(model, cfg, cfg.answer_gen)
    qs = [q["question"] for q in questions]
    q_vecs = embedder.embed(qs)
    per_set = [index.query(q_vecs, c) if c > 0 else [[] for _ in qs]
               for index, c in zip(indexes, counts)]
    prompts, used = [], []
    for i, q in enumerate(qs):
        demos = []
        for pool, ids in zip(pools, per_set):
            demos += [(pool[j]["question"], pool[j]["answer"]) for j in ids[i] if j >= 0]
        # kNN lists are best first: the budget keeps the best; rendered reversed, so the most
        # similar demonstration stands next to the question
        demos = fit_budget(tpl, model.tokenizer, demos, lambda ds: tpl.answer_prompt(ds[::-1], q), budget)
        prompts.append(tpl.answer_prompt(demos[::-1], q))
        used.append(len(demos))
    answers = generate(model, prompts, cfg.answer_gen, stage_key(cfg.seed, t, "answers"),
                       cfg.batch_size, desc=f"iter {t} answers")
    return [{**q, "answer": a, "n_answer_demos": n} for q, a, n in zip(questions, answers, used)]


# ------------------------------------------------------------------------------- ISARA, step 4
def keep(answers: list[dict], pools, t: int, cfg: IsaraConfig) -> tuple[list[dict], dict]:
    """The paper's four rule filters; returns the kept pairs and the drop counts by reason."""
    from selfalign_jax import filters

    fcfg = filters.FilterConfig(cfg.rouge_threshold, cfg.min_words, cfg.min_words)
    seen = [s["question"] for pool in pools for s in pool]
    res = filters.filter_pairs([(a["question"], a["answer"], a["demo_questions"]) for a in answers],
                               seen_questions=seen, cfg=fcfg)
    kept = [{"question": answers[i]["question"], "answer": answers[i]["answer"], "source": f"D_{t}",
             "iteration": t} for i in res.kept_idx]
    return kept, {r: res.counts.get(r, 0) for r in filters.REASONS}


# ------------------------------------------------------------------------------- ISARA, step 5
def sft(model: Model, pairs: list[dict], out_dir: Path, lr: float, cfg: IsaraConfig, t: int) -> Model:
    """Fine-tune the current model on `pairs` (loss on answers), export to out_dir, return M_t."""
    from selfalign_jax import train

    s = cfg.sft
    tcfg = train.TrainConfig(lr=lr, b1=s.b1, b2=s.b2, weight_decay=s.weight_decay,
                             warmup_ratio=s.warmup_ratio, clip_norm=s.clip_norm,
                             batch_size=max(1, s.batch_size // s.grad_accum), grad_accum=s.grad_accum,
                             epochs=s.epochs, max_length=min(s.max_length, model.cfg.max_pos - 1),
                             lora_rank=s.lora_rank, remat=s.remat, seed=cfg.seed * 1000 + t,
                             dtype=model.cfg.dtype)
    base = json.loads((model.path / "config.json").read_text())
    log(f"SFT of {model.path.name} on {len(pairs)} pairs, lr {lr:.3g}")
    # Orbax train state (params + Adam moments in fp32: 3x the model): only for resuming this SFT, so it
    # is deleted once the model is exported
    ckpt = Path(out_dir).with_name(Path(out_dir).name + ".ckpt")
    cfg_t, params_t = train.finetune((model.cfg, model.params), [(p["question"], p["answer"]) for p in pairs],
                                     model.tokenizer, out_dir, tcfg, template=Template(cfg.template, model.tokenizer),
                                     checkpoint_dir=ckpt, base_config=base)
    if ckpt.is_dir():
        shutil.rmtree(ckpt)
    return Model(out_dir, cfg_t, params_t, model.tokenizer)


# ------------------------------------------------------------------------------- ISARA, step 6
def answer_zero_shot(model: Model, questions: list[str], max_new_tokens: int, demos_for=None,
                     template: str = "plain", seed: int = 0, batch_size=None) -> list[str]:
    """Greedy answers to `questions` (optionally with demonstrations: ICL baselines)."""
    tpl = Template(template, model.tokenizer)
    budget = max(16, model.cfg.max_pos - max_new_tokens)
    prompts = []
    for i, q in enumerate(questions):
        demos = demos_for(i, q) if demos_for else []  # best first; rendered most similar last
        demos = fit_budget(tpl, model.tokenizer, demos, lambda ds: tpl.answer_prompt(ds[::-1], q), budget)
        prompts.append(tpl.answer_prompt(demos[::-1], q))
    gen = GenConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    return generate(model, prompts, gen, stage_key(seed, 0, "eval"), batch_size, desc="evaluate")


def evaluate(model: Model, eval_set: list[dict], scorer, cfg: IsaraConfig, demos_for=None) -> tuple[list, dict]:
    """Zero-shot greedy answers (up to eval_max_new_tokens) scored by `scorer`."""
    qs = [r["question"] for r in eval_set]
    answers = answer_zero_shot(model, qs, cfg.eval_max_new_tokens, demos_for, cfg.template, cfg.seed,
                               cfg.batch_size)
    res = scorer.score(qs, answers, eval_set)
    rows = [{**r, "response": a, **item} for r, a, item in zip(eval_set, answers, res["items"])]
    return rows, res["metrics"]


# ------------------------------------------------------------------------------------ the loop
def run(model_dir, seeds: list[dict], run_dir, cfg: IsaraConfig, eval_set=None, scorer=None,
        force: bool = False, argv_note: dict | None = None, eval_pretrained: bool = True) -> list[dict]:
    """The ISARA loop with resumable stages; returns the metrics rows (also in metrics.jsonl)."""
    from selfalign_jax.pipeline import RunDir

    run = RunDir(Path(run_dir), cfg, model_dir, seeds, eval_set, force, argv_note)
    model = run.base_model()
    embedder = run.embedder()
    pools, indexes = [run.seeds], [run.index(0, run.seeds, embedder)]
    if eval_set is not None and eval_pretrained:
        run.eval_stage("pretrained", model, scorer, row="pretrained")
    for t in range(1, cfg.iterations + 1):
        it = run.iter_dir(t)
        questions = run.stage(it / "questions.jsonl", lambda: write_questions(model(), pools, t, cfg))
        answers = run.stage(it / "answers.jsonl",
                            lambda: write_answers(model(), pools, indexes, embedder, questions, t, cfg))
        kept = run.filter_stage(it, lambda: keep(answers, pools, t, cfg))
        lr = cfg.sft.lr * cfg.sft.lr_decay ** (t - 1)
        model = run.model_stage(it / "model", lambda out: sft(model(), run.seeds + kept, out, lr, cfg, t))
        if eval_set is not None:
            run.eval_stage(f"iter_{t}", model, scorer, row=f"isara_it{t}", iteration=t)
        pools.append(kept)
        indexes.append(run.index(t, kept, embedder))
    return run.finish()


def resolve(cli: IsaraConfig, preset: str | None, max_new_tokens: int | None = None) -> IsaraConfig:
    """The preset (if any) with every field the command line changed from the default laid over it;
    --max-new-tokens sets both question and answer generation lengths."""
    def overlay(base, given, default):
        kw = {}
        for f in dataclasses.fields(given):
            g, d = getattr(given, f.name), getattr(default, f.name)
            if dataclasses.is_dataclass(g):
                kw[f.name] = overlay(getattr(base, f.name), g, d)
            else:
                kw[f.name] = g if g != d else getattr(base, f.name)
        return dataclasses.replace(base, **kw)

    cfg = overlay(load_config(preset), cli, IsaraConfig()) if preset else cli
    if max_new_tokens is not None:
        cfg = dataclasses.replace(cfg, question_gen=dataclasses.replace(cfg.question_gen, max_new_tokens=max_new_tokens),
                                  answer_gen=dataclasses.replace(cfg.answer_gen, max_new_tokens=max_new_tokens))
    return cfg
