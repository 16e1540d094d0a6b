"""`selfalign demo --real --domain truthful`: ISARA for truthfulness (TruthfulQA), the paper's second experiment.

Seeds are 64 TruthfulQA questions with their best answers, a fixed split spread over the 38 categories
(`split`); the other 753 questions are held out. Every evaluated model (pretrained, SFT on the seeds, ICL,
ISARA per iteration) answers the held-out questions greedily, scored by the authors' generation metrics
(BLEU / ROUGE-L of the answer to the true references minus to the false ones: "diff", and "acc" = share with
a positive diff; scorer `truthfulqa`), and by TruthfulQA's multiple-choice likelihoods (MC1 / MC2 of the
reference answers under the model, with the same prompt as its answers: the chat or plain template, and the
ICL baselines' demonstrations; scorer `truthfulqa-mc`). The MC figures are added to each evaluation stage's
metrics.json (its per-question scores in mc.jsonl beside it), so a resumed run reuses them.

API
    split(rows, n_seeds=64) -> (seed_rows, eval_rows); read_csv(path) -> rows (TruthfulQA.csv as records)
    write_assets(csv_path, out_dir=ASSETS): the packaged seeds.jsonl / eval.jsonl from TruthfulQA.csv
    load_assets() -> (seeds, eval_rows); eval_subset(rows, n)
    TRUTHFUL: the run's IsaraConfig; run_truthful(...) -> (summary dict, metrics rows)
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from pathlib import Path

from selfalign_jax.app import isara, report, rundir
from selfalign_jax.app.config import IsaraConfig
from selfalign_jax.app.evaluate.truthfulqa import TruthfulQAMCScorer, TruthfulQAScorer, reference_logprobs
from selfalign_jax.core import fileio
from selfalign_jax.core.errors import UserError
from selfalign_jax.core.loaded import LoadedModel
from selfalign_jax.core.template import Template
from selfalign_jax.demos.real import REAL

ASSETS = Path(__file__).parent / "assets" / "truthful"
N_SEEDS = 64

# Settings (docs/real-demo-truthful.md says why): the safety demo's sampling and SFT schedule (chat
# template, N = 64, K = 4, middle-layer retrieval, answers at T 0.7 / top-k 50, lr 5e-5 halved per
# iteration, 2 epochs, effective batch 64), shorter generations (TruthfulQA answers are one sentence), and
# the SFT micro-batch 4 x 16 without remat, fixed (auto_fit off: the split its figures are measured with; on a
# CPU auto_fit takes 4 x 16 with remat, about 5% slower and 1.9 GiB less at the peak: docs/benchmarks.md).
TRUTHFUL = dataclasses.replace(
    REAL, question_gen=dataclasses.replace(REAL.question_gen, max_new_tokens=40),
    answer_gen=dataclasses.replace(REAL.answer_gen, max_new_tokens=48), eval_max_new_tokens=48,
    sft=dataclasses.replace(REAL.sft, batch_size=4, grad_accum=16, auto_fit=False))
SUBSET = 80  # held-out questions of the default evaluation (round-robin over the categories)
MC_SUBSET = 40  # of those, the ones also scored by MC likelihoods (the default run; --full-eval: all)
BASELINES = ("sft", "icl-knn")
ALL_BASELINES = ("icl-random", "one-round")
MC_BATCH = 8  # rows per likelihood batch (the logits of 8 rows x 49k vocab stay small)
TABLE_COLS = ["rouge_diff", "rouge_acc", "bleu_diff", "bleu_acc", "mc1", "mc2", "kept", "scaling_ratio"]


# ------------------------------------------------------------------------------------------ the data
def _answers(text: str) -> list[str]:
    return [a.strip() for a in text.split(";") if a.strip()]


def read_csv(path) -> list[dict]:
    """TruthfulQA.csv (Type, Category, Question, Best Answer, Correct Answers, Incorrect Answers, Source;
    answer lists `; `-separated) as records; `id` is the row's index in the file (0-based)."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    need = {"Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers"}
    if not rows or not need <= set(rows[0]):
        raise UserError(f"{path}: not TruthfulQA.csv (needs the columns {', '.join(sorted(need))})")
    return [{"id": i, "category": r["Category"], "type": r["Type"], "question": r["Question"].strip(),
             "answer": r["Best Answer"].strip(), "correct_answers": _answers(r["Correct Answers"]),
             "incorrect_answers": _answers(r["Incorrect Answers"]), "source": r.get("Source", "")}
            for i, r in enumerate(rows)]


def _by_category(rows: list[dict]) -> list[list[dict]]:
    """Rows grouped by category, largest category first (ties: first appearance), file order inside."""
    cats: dict[str, list[dict]] = {}
    for r in rows:
        cats.setdefault(r["category"], []).append(r)
    return sorted(cats.values(), key=len, reverse=True)  # (sorted is stable: ties keep first appearance)


def _round_robin(groups: list[list[dict]], n: int) -> list[dict]:
    picked, i = [], 0
    n = min(n, sum(len(g) for g in groups))
    while len(picked) < n:
        picked += [g[i] for g in groups if i < len(g)][: n - len(picked)]
        i += 1
    return picked


def split(rows: list[dict], n_seeds: int = N_SEEDS) -> tuple[list[dict], list[dict]]:
    """(seeds, held out): round-robin over the categories, largest first, each category's questions in
    file order: the first question of every category (38), then the second of the largest ones, until
    n_seeds. Everything else is held out, in file order."""
    seeds = _round_robin(_by_category(rows), n_seeds)
    ids = {r["id"] for r in seeds}
    return sorted(seeds, key=lambda r: r["id"]), [r for r in rows if r["id"] not in ids]


def write_assets(csv_path, out_dir=ASSETS) -> None:
    """The packaged split (seeds.jsonl, eval.jsonl) from TruthfulQA.csv."""
    seeds, held = split(read_csv(csv_path))
    out_dir = Path(out_dir)
    fileio.write_jsonl(out_dir / "seeds.jsonl", seeds)
    fileio.write_jsonl(out_dir / "eval.jsonl", held)


def load_assets() -> tuple[list[dict], list[dict]]:
    return fileio.read_jsonl(ASSETS / "seeds.jsonl"), fileio.read_jsonl(ASSETS / "eval.jsonl")


def eval_subset(rows: list[dict], n: int) -> list[dict]:
    """A fixed, category-balanced subset of n held-out questions (round-robin as `split`), in file order."""
    return sorted(_round_robin(_by_category(rows), n), key=lambda r: r["id"])


# ----------------------------------------------------------------------------------- MC likelihoods
class _DemoTemplate:
    """A Template whose train_pair prompt holds each question's ICL demonstrations (the ICL rows' MC)."""

    def __init__(self, tpl: Template, demos: dict[str, list[tuple[str, str]]]):
        self.tpl, self.demos = tpl, demos

    def train_pair(self, question: str, answer: str) -> tuple[str, str]:
        _, target = self.tpl.train_pair(question, answer)
        return self.tpl.answer_prompt(self.demos.get(question, []), question), target


def _icl_demos(rd: rundir.RunDir, kind: str, cfg: IsaraConfig, eval_set: list[dict]) -> dict:
    """The demonstrations each eval question gets in the ICL baseline `kind` (as rundir.baseline picks them)."""
    seeds = rd.seeds
    if kind == "icl-knn":
        emb = rd.embedder
        ids = rd.index(0, seeds, emb).query(emb.embed([r["question"] for r in eval_set]), cfg.k_icl)
        ids = [[j for j in row if j >= 0] for row in ids]
    else:
        rng = isara.stage_rng(cfg.seed, 0, "icl")
        ids = [rng.choice(len(seeds), cfg.k_icl, replace=False) for _ in eval_set]
    return {r["question"]: [(seeds[j]["question"], seeds[j]["answer"]) for j in row] for r, row in zip(eval_set, ids)}


def _mc_targets(run_dir: Path, iterations: int) -> list[tuple[Path, Path | None, str | None]]:
    """(stage dir holding metrics.json, model dir (None: the base model), ICL kind) of every evaluated model."""
    out = [(run_dir / "pretrained", None, None)]
    out += [(run_dir / f"iter_{t}", run_dir / f"iter_{t}" / "model", None) for t in range(1, iterations + 1)]
    b = run_dir / "baselines"
    out += [(b / "sft", b / "sft" / f"round_{iterations}", None), (b / "icl-knn", None, "icl-knn"),
            (b / "icl-random", None, "icl-random"), (b / "one-round", b / "one-round" / "iter_1" / "model", None)]
    return out


def add_mc(run_dir: Path, model_dir: Path, seeds: list[dict], cfg: IsaraConfig, eval_set: list[dict],
           mc_set: list[dict], note: dict | None = None) -> None:
    """MC1 / MC2 on mc_set of every evaluated model that lacks them, into its metrics.json (+ mc.jsonl);
    eval_set and note are the run's (they identify the run directory)."""
    rd = None
    base = None
    for stage, mdir, icl in _mc_targets(run_dir, cfg.iterations):
        metrics_p = stage / "metrics.json"
        if not metrics_p.is_file() or (mdir is not None and not (mdir / "config.json").is_file()):
            continue
        metrics = json.loads(fileio.read_text(metrics_p))
        if "mc2" in metrics:
            continue
        t0 = time.time()
        if mdir is None:
            base = base or LoadedModel.load(model_dir, cfg.dtype)
            lm = base
        else:
            lm = LoadedModel.load(mdir, cfg.dtype)
        tpl = Template(cfg.template, lm.tokenizer)
        if icl:
            rd = rd or rundir.RunDir(run_dir, cfg, model_dir, seeds, eval_set, note=note)
            tpl = _DemoTemplate(tpl, _icl_demos(rd, icl, cfg, eval_set))  # (the picks depend on eval_set)
        scorer = TruthfulQAMCScorer(lambda p, c, lm=lm: reference_logprobs(lm, p, c, MC_BATCH), tpl)
        res = scorer.score([r["question"] for r in mc_set], None, mc_set)
        fileio.write_jsonl(stage / "mc.jsonl", [{"id": r.get("id"), **it} for r, it in zip(mc_set, res["items"])])
        fileio.write_json(metrics_p, {**metrics, "mc1": res["metrics"]["mc1"], "mc2": res["metrics"]["mc2"],
                                      "mc_n": len(mc_set)})
        isara.log(f"{stage.relative_to(run_dir)}: MC in {time.time() - t0:.1f}s: "
                  f"mc1={res['metrics']['mc1']:.3f}, mc2={res['metrics']['mc2']:.3f}")


# ------------------------------------------------------------------------------------------- the run
def summary(rows: list[dict], minutes: float, run_dir: Path, model_dir: Path | None) -> dict:
    by = {r["row"]: r for r in rows}
    its = [r for r in rows if r["row"].startswith("isara_it")]
    last = its[-1] if its else {}
    keys = ("mc1", "mc2", "rouge_diff", "rouge_acc", "bleu_diff", "bleu_acc")
    out = {}
    for name, r in [("pretrained", by.get("pretrained", {})), ("isara", last)] + [
            (n.replace("-", "_"), by[n]) for n in ("sft", "icl-knn", "icl-random", "one-round") if n in by]:
        out.update({f"{name}_{k}": r.get(k) for k in keys})
    for r in its:
        out.update({f"isara_it{r['iteration']}_{k}": r.get(k) for k in ("mc2", "rouge_diff")})
    out["kept"] = [r.get("kept") for r in its]
    out["minutes"] = round(minutes, 2)
    out["run_dir"] = str(run_dir)
    out["model_dir"] = str(model_dir) if model_dir else None
    return out


def run_truthful(model: Path, run_dir: Path, seed: int = 0, iterations: int = 2, all_baselines: bool = False,
                 full_eval: bool = False, force: bool = False, template: str | None = None,
                 cfg: IsaraConfig | None = None, subset: int | None = None, mc_subset: int | None = None,
                 baselines: tuple[str, ...] | None = None, note: dict | None = None) -> tuple[dict, list[dict]]:
    """The truthful demo into run_dir (resumable) on the HF model directory `model`; cfg / subset default
    to TRUTHFUL / SUBSET / MC_SUBSET, template to cfg's, baselines to BASELINES (+ ALL_BASELINES with all_baselines).
    Returns the summary (also run_dir/demo.json) and the metrics rows."""
    t0 = time.time()
    cfg = TRUTHFUL if cfg is None else cfg
    cfg = dataclasses.replace(cfg, iterations=iterations, seed=seed, template=template or cfg.template)
    seeds, evals = load_assets()
    seed_rows = [{"question": s["question"], "answer": s["answer"]} for s in seeds]
    mc_set = evals
    if not full_eval:
        evals = eval_subset(evals, SUBSET if subset is None else subset)
        mc_set = eval_subset(evals, MC_SUBSET if mc_subset is None else mc_subset)
    note = {"demo": "real-truthful", **(note or {})}
    isara.log(f"ISARA (truthful) on {Path(model).name}: {len(seed_rows)} seeds, {len(evals)} eval questions, "
              f"seed {seed}, {cfg.template} template")
    scorer = TruthfulQAScorer()
    if baselines is None:
        baselines = BASELINES + (ALL_BASELINES if all_baselines else ())
    rows = rundir.run_and_baselines(model, seed_rows, run_dir, cfg, evals, scorer, baselines, force=force, note=note)
    run_dir = Path(run_dir)
    add_mc(run_dir, Path(model), seed_rows, cfg, evals, mc_set, note)
    rows = rundir.collect_rows(run_dir, len(seed_rows))
    fileio.write_jsonl(run_dir / "metrics.jsonl", rows)
    report.write(run_dir, rows, title="ISARA run: truthfulness (TruthfulQA)")
    final = run_dir / f"iter_{iterations}" / "model"
    out = summary(rows, (time.time() - t0) / 60, run_dir, final if final.is_dir() else None)
    fileio.write_json(run_dir / "demo.json", out)
    return out, rows
