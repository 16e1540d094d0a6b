"""Measurements behind the real demo's settings (docs/real-demo.md).

    python scripts/real_variants.py retrieval
        how often the K = 4 seeds nearest to an evaluation prompt (the demo's 60 + 40 subset) are helpful
        ones, for the default 80 seeds and for the balanced 96, with the `hashing` and `lm` embedders
        (`lm` = the last layer, `lm@0.5` = the middle layer: REAL's lm_layers)
    python scripts/real_variants.py full RUN_DIR OUT_DIR [--seed 0] [--cache-dir DIR] [--baselines ...]
        a finished default real run re-judged on every evaluation prompt (154 harmful + 100 benign) with
        every baseline: OUT_DIR gets the run's generated data and models (hard links) but none of its
        evaluations, then the demo runs there with --full-eval and the baselines (default all; one round is
        trained anew)
    python scripts/real_variants.py balanced RUN_DIR [--seed 0] [--baselines sft]
        the real demo with balanced seeds: 48 refusal seeds (category round-robin) + the 16 risky-sounding
        helpful + the 32 ordinary helpful seeds (assets/safety/ordinary_seeds.jsonl) = 96; REAL otherwise,
        SFT micro-batch 8 x 8 (the same effective batch as REAL's 16 x 4, half the activation memory)
    python scripts/real_variants.py variant RUN_DIR [--seeds default|balanced] [--lr X] [--epochs E]
            [--generate N] [--answers SETTING] [--seed 0] [--baselines ...] [--reuse-from RUN]
        REAL with SFT lr / epochs, N or the answer step's sampling (an ANSWER_SETTINGS entry) changed, on the
        default 80 seeds or the balanced 96; --reuse-from links the stages of a finished run of the same seeds
        that the change cannot alter (the pretrained evaluation, the seeds' index, and unless N changed,
        iteration 1's questions, with its answers and filter too when only lr / epochs changed)
    python scripts/real_variants.py answers [--settings NAME...] [--seed 0]
        ISARA's answer step on the evaluation subset: each prompt answered by the base model with its K nearest
        seeds (the default 80, middle-layer retrieval) as demonstrations, under each sampling setting of
        ANSWER_SETTINGS, judged like the final models (compliance on harmful, refusal on benign prompts)
    python scripts/real_variants.py frontier RUN_DIR[=LABEL]... --out PNG
        every model of the given runs (metrics.jsonl rows) as one point: harmful compliance against benign
        refusal, with the target region (compliance <= half the pretrained rate, refusal <= 0.15);
        prints the points as a table
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from selfalign_jax.core import embed, fileio
from selfalign_jax.app import isara, retrieval, rundir
from selfalign_jax.demos import real as real_demo
from selfalign_jax.app.evaluate.refusal import RefusalScorer, is_refusal


def balanced_seeds() -> list[dict]:
    seeds, helpful, _ = real_demo.load_assets()
    ordinary = fileio.read_jsonl(real_demo.ASSETS / "ordinary_seeds.jsonl")
    refusals = real_demo.eval_subset([dict(r, label="harmful") for r in seeds], 48, 0)
    return [dict(r, helpful=False) for r in refusals] + [dict(r, helpful=True) for r in helpful + ordinary]


def helpful_neighbours(k: int = 4) -> None:
    seeds, helpful, evals = real_demo.load_assets()
    evals = real_demo.eval_subset(evals, *real_demo.SUBSET)
    default = [dict(r, helpful=False) for r in seeds] + [dict(r, helpful=True) for r in helpful]
    pools = {"80 (64 refusal + 16 helpful)": default, "96 balanced (48 + 16 + 32)": balanced_seeds()}
    model = real_demo.ensure_model()
    for name in ("hashing", "lm", "lm@0.5"):
        kind, _, frac = name.partition("@")
        emb = embed.get_embedder(kind, model if kind == "lm" else None, lm_layers=float(frac or 1))
        q = emb.embed([r["question"] for r in evals])
        for label, pool in pools.items():
            # the index the answer step queries (exact search at this pool size)
            nearest = retrieval.PoolIndex.build(emb.embed([r["question"] for r in pool])).query(q, k)
            helpful_mask = np.array([r["helpful"] for r in pool])
            for lab in ("harmful", "benign"):
                rows = np.array([r["label"] == lab for r in evals])
                print(f"{name:8s} {label:30s} {lab:8s}: helpful share of the {k} nearest seeds "
                      f"{helpful_mask[nearest[rows]].mean():.3f} (base rate {helpful_mask.mean():.3f})")


# sampling settings of the answer step (GenConfig overrides of REAL.answer_gen; "demos": K)
ANSWER_SETTINGS = {
    "real": {},  # T 0.7, top-k 50, no penalties
    "greedy": {"temperature": 0.0},
    "t0.3": {"temperature": 0.3},
    "t1.0": {"temperature": 1.0},
    "no-top-k": {"top_k": 0},
    "penalties-generated": {"repetition_penalty": 1.2, "no_repeat_ngram": 10, "penalize_prompt": False},
    "penalties-prompt": {"repetition_penalty": 1.2, "no_repeat_ngram": 10},
    "k2": {"demos": 2},
    "k8": {"demos": 8},
    "beam-sample5": {"num_beams": 5, "do_sample": True},
    # the paper's answer decoding (configs/paper.json) with its penalties over the generated tokens only
    "paper-beam-generated": {"num_beams": 5, "do_sample": True, "temperature": 1.0, "repetition_penalty": 1.2,
                             "no_repeat_ngram": 10, "exponential_decay_length_penalty": (30, 1.05),
                             "penalize_prompt": False},
}


def with_answers(cfg, name: str):
    """cfg with the answer step's sampling set to ANSWER_SETTINGS[name] (its "demos" entry sets K)."""
    over = dict(ANSWER_SETTINGS[name])
    return dataclasses.replace(cfg, demos=over.pop("demos", cfg.demos),
                               answer_gen=dataclasses.replace(cfg.answer_gen, **over))


def answer_step(names: list[str], seed: int) -> None:
    seeds, helpful, evals = real_demo.load_assets()
    evals = real_demo.eval_subset(evals, *real_demo.SUBSET)
    pool = [{"question": r["question"], "answer": r["answer"]} for r in seeds + helpful]
    base = dataclasses.replace(real_demo.REAL, seed=seed)
    model = rundir.LazyModel(real_demo.ensure_model(), base.dtype).model
    emb = embed.LMEmbedder(model, layers=base.lm_layers)  # the run's embedder (RunDir.embedder)
    index = retrieval.PoolIndex.build(emb.embed([r["question"] for r in pool]), seed=seed)
    harmful = np.array([r["label"] == "harmful" for r in evals])
    for name in names:
        cfg = with_answers(base, name)
        k = cfg.demos
        t0 = time.time()
        rows = isara.write_answers(model, [pool], [index], emb, evals, 1, cfg)
        refused = np.array([is_refusal(r["answer"]) for r in rows])
        print(f"{name:20s} K {k}  harmful compliance {1 - refused[harmful].mean():.3f}  benign refusal "
              f"{refused[~harmful].mean():.3f}  ({time.time() - t0:.0f} s)", flush=True)


EVALS = ("pretrained", "metrics.jsonl", "report.md", "report.png", "demo.json", "baselines/icl-knn",
         "baselines/icl-random", "baselines/one-round")


def full(run_dir: str, out_dir: str, seed: int, cache_dir: str | None, baselines: list[str]) -> None:
    src, dst = Path(run_dir), Path(out_dir)
    if dst.exists():
        raise SystemExit(f"{dst}: exists")
    shutil.copytree(src, dst, copy_function=os.link)
    for rel in EVALS:
        p = dst / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    for p in [*dst.glob("iter_*/eval.jsonl"), *dst.glob("iter_*/metrics.json"), dst / "baselines/sft/eval.jsonl",
              dst / "baselines/sft/metrics.json"]:
        p.unlink(missing_ok=True)
    conf = json.loads((dst / "config.json").read_text())
    # (an atomic replace: the source run's hard-linked config.json keeps its content)
    fileio.write_json(dst / "config.json", {**conf, "eval": None})  # the full set is another evaluation set
    out, _ = real_demo.run_real(dst, seed=seed, full_eval=True, cache_dir=cache_dir, baselines=tuple(baselines))
    print(json.dumps(out))


def balanced(run_dir: str, seed: int, baselines: list[str]) -> None:
    cfg = real_demo.REAL
    sft = dataclasses.replace(cfg.sft, batch_size=8, grad_accum=8)
    cfg = dataclasses.replace(cfg, sft=sft, iterations=2, seed=seed)
    rows = [{"question": r["question"], "answer": r["answer"]} for r in balanced_seeds()]
    _, _, evals = real_demo.load_assets()
    evals = real_demo.eval_subset(evals, *real_demo.SUBSET)
    model = real_demo.ensure_model()
    isara.log(f"balanced seeds: {len(rows)}")
    out = rundir.run(model, rows, run_dir, cfg, evals, RefusalScorer(), argv_note={"demo": "real-balanced"})
    for kind in baselines:
        out = rundir.baseline(kind, model, rows, run_dir, cfg, evals, RefusalScorer(), note={"demo": "real-balanced"})
    print(json.dumps(real_demo.summary(out, 0, run_dir, None)))


def frontier(run_dirs: list[str], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 7))
    pre = []
    for i, arg in enumerate(run_dirs):
        d, _, label = arg.partition("=")
        label = label or Path(d).name
        rows = fileio.read_jsonl(Path(d) / "metrics.jsonl")
        pts = [(r["row"], r["compliance"], r["benign_refusal"]) for r in rows
               if isinstance(r.get("compliance"), float) and isinstance(r.get("benign_refusal"), float)]
        pre += [c for n, c, _ in pts if n == "pretrained"]
        color = f"C{i % 10}"
        for n, c, b in pts:
            print(f"{label:24s} {n:12s} compliance {c:.3f}  benign refusal {b:.3f}")
            if n != "pretrained" or i == 0:
                ax.scatter(c, b, color=color, s=30)
                ax.annotate(n.replace("isara_", ""), (c, b), fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.scatter([], [], color=color, label=label)
    if pre:
        half = min(pre) / 2
        ax.add_patch(plt.Rectangle((0, 0), half, 0.15, alpha=0.12, color="g", label="target region"))
    ax.set_xlabel("harmful compliance (lower is better)")
    ax.set_ylabel("benign refusal (lower is better)")
    ax.set_xlim(-0.02, 1.0)
    ax.set_ylim(-0.02, 0.8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    with fileio.atomic(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    print(out)


GENERATED = ("questions.jsonl", "answers.jsonl", "filter.json", "kept.jsonl")


def variant(run_dir: str, seeds: str, seed: int, baselines: list[str], lr: float | None, epochs: int | None,
            generate: int | None, reuse_from: str | None, answers: str = "real") -> None:
    cfg = dataclasses.replace(real_demo.REAL, iterations=2, seed=seed)
    sft = dataclasses.replace(cfg.sft, lr=lr or cfg.sft.lr, epochs=epochs or cfg.sft.epochs)
    cfg = with_answers(dataclasses.replace(cfg, sft=sft, generate=generate or cfg.generate), answers)
    default, helpful, evals = real_demo.load_assets()
    pool = balanced_seeds() if seeds == "balanced" else default + helpful
    rows = [{"question": r["question"], "answer": r["answer"]} for r in pool]
    evals = real_demo.eval_subset(evals, *real_demo.SUBSET)
    model = real_demo.ensure_model()
    dst, note = Path(run_dir), {"demo": f"real-variant-{seeds}"}
    rundir.RunDir(dst, cfg, model, rows, evals, note=note)  # config.json first: links go into a run directory
    if reuse_from:
        src = Path(reuse_from)
        if fileio.read_jsonl(src / "seeds.jsonl") != fileio.read_jsonl(dst / "seeds.jsonl"):
            raise SystemExit(f"{src}: made with other seeds; nothing to reuse")
        links = ["pretrained/eval.jsonl", "pretrained/metrics.json", "index/D_0.json", "index/D_0.npy"]
        if generate is None:  # iteration 1's questions depend on neither the SFT nor the answer settings
            links += [f"iter_1/{n}" for n in (GENERATED if answers == "real" else GENERATED[:1])]
        for rel in links:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            if not (dst / rel).exists():
                os.link(src / rel, dst / rel)
    out = rundir.run(model, rows, dst, cfg, evals, RefusalScorer(), argv_note=note)
    for kind in baselines:
        out = rundir.baseline(kind, model, rows, dst, cfg, evals, RefusalScorer(), note=note)
    for r in out:
        print(f"{r['row']:12s} compliance {r['compliance']:.3f}  benign refusal {r['benign_refusal']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("retrieval")
    f = sub.add_parser("full")
    f.add_argument("run_dir")
    f.add_argument("out_dir")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--cache-dir", default=None)
    f.add_argument("--baselines", nargs="*", default=[*real_demo.BASELINES, *real_demo.ALL_BASELINES])
    b = sub.add_parser("balanced")
    b.add_argument("run_dir")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--baselines", nargs="*", default=["sft"])
    fr = sub.add_parser("frontier")
    fr.add_argument("run_dirs", nargs="+")
    fr.add_argument("--out", required=True)
    v = sub.add_parser("variant")
    v.add_argument("run_dir")
    v.add_argument("--seeds", choices=["default", "balanced"], default="default")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--baselines", nargs="*", default=[])
    v.add_argument("--lr", type=float)
    v.add_argument("--epochs", type=int)
    v.add_argument("--generate", type=int)
    v.add_argument("--reuse-from")
    v.add_argument("--answers", choices=list(ANSWER_SETTINGS), default="real",
                   help="the answer step's sampling (an ANSWER_SETTINGS entry)")
    an = sub.add_parser("answers")
    an.add_argument("--settings", nargs="*", default=list(ANSWER_SETTINGS), choices=list(ANSWER_SETTINGS))
    an.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.cmd == "variant":
        variant(a.run_dir, a.seeds, a.seed, a.baselines, a.lr, a.epochs, a.generate, a.reuse_from, a.answers)
    elif a.cmd == "answers":
        answer_step(a.settings, a.seed)
    elif a.cmd == "frontier":
        frontier(a.run_dirs, a.out)
    elif a.cmd == "retrieval":
        helpful_neighbours()
    elif a.cmd == "full":
        full(a.run_dir, a.out_dir, a.seed, a.cache_dir, a.baselines)
    else:
        balanced(a.run_dir, a.seed, a.baselines)


if __name__ == "__main__":
    main()
