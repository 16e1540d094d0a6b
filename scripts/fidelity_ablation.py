"""Ablation of the fidelity choices (docs/fidelity.md): patch ONE choice to its alternative in-process, then run
the synthetic demo as `selfalign demo --run-dir ROOT/ITEM/seedS --seed S --domain D` for each seed.
    python scripts/fidelity_ablation.py ITEM --seeds 0 1 2 --root DIR --cache-dir DIR  # last line: JSON
    python scripts/fidelity_ablation.py ITEM --check  # seconds, no demo: the patch changes behaviour
ITEM: the alternative -> what is patched (none = the current code; run dirs don't record the patch):
  item1 SFT-on-seeds baseline: ONE round (lr sft.lr, t=0, baselines/sft/model), not T rounds with ISARA's
        lr decay -> `rundir.baseline` wrapped for kind "sft".
  item2 warm-up ceil(ratio * total), not floor (a short SFT starts with an lr-0 step) -> `train.warmup_steps`.
  item3 question demos shuffled across sets (rng.permutation after the draws); answer and ICL demos
        rendered reversed (nearest last, D_{t-1}..D_1 first) -> `isara.write_questions` (a copy with the shuffle),
        `Template.answer_prompt` (demos reversed; its other callers pass no demos).
  item4 budget: stop at the first demo that does not fit, keep while <= budget -> `isara.fit_budget`.
  item5 markers BEGIN, END, USER, ASSISTANT only; a marker at index 0 IS a cut point -> `isara.MARKERS`,
        `isara.cut`, `generate.prompts.find_stop` (the world's pretraining and its base-model cache untouched).
  item6 length-sorted SFT steps -> no patch: `sft.length_grouping=True` in the run config (the
        length-sorted `plan_epoch`); packing stays on as in none (same token-normalised gradient).
"""

import argparse
import contextlib
import dataclasses
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace as NS
from unittest import mock

import numpy as np

from selfalign_jax.core import hostmem, train
from selfalign_jax.core.generate import prompts as gen_prompts
from selfalign_jax.app import isara, rundir
from selfalign_jax.core.batching import plan_epoch
from selfalign_jax.demos.synthetic import DEMO, run_demo
from selfalign_jax.core.template import Template

OLD_MARKERS = ("BEGIN", "END", "USER", "ASSISTANT")
ORIG_DRAW = isara.draw_demos  # old_draw_demos calls it while isara.draw_demos is patched
_answer_prompt, _baseline = Template.answer_prompt, rundir.baseline


def old_baseline(kind, model_dir, seeds, run_dir, cfg, eval_set, scorer, force=False, note=None):  # item1
    if kind != "sft":
        return _baseline(kind, model_dir, seeds, run_dir, cfg, eval_set, scorer, force, note)
    rd = rundir.RunDir(Path(run_dir), cfg, model_dir, seeds, eval_set, force, note)
    m = rd.model_stage(rd.root / "baselines/sft/model",
                       lambda out: isara.sft(rd.base.model, rd.seeds, out, cfg.sft.lr, cfg, 0))
    rd.eval_stage("baselines/sft", m, scorer, row="sft")
    return rd.finish()


def old_warmup_steps(tcfg, total_steps):  # item2
    return int(math.ceil(tcfg.warmup_ratio * total_steps))


def old_draw_demos(pools, counts, rng):  # item3: the current draws, then a shuffle across sets
    demos = ORIG_DRAW(pools, counts, rng)
    return [demos[i] for i in rng.permutation(len(demos))]


def old_answer_prompt(self, pairs, question):  # item3: best-first lists rendered nearest last
    return _answer_prompt(self, list(pairs)[::-1], question)


def old_fit_budget(template, tokenizer, demos, render, budget):  # item4
    kept = []
    for d in demos:
        if len(tokenizer(render(kept + [d])).input_ids) > budget:
            break
        kept.append(d)
    return kept


def old_find_stop(text, stop):  # item5: a marker at index 0 is a cut point
    return min((j for j in (text.find(s) for s in stop) if j >= 0), default=-1)


def old_cut(text, markers=OLD_MARKERS):
    return text[:i if (i := old_find_stop(text, markers)) >= 0 else len(text)].strip()


PATCHES = {"none": [], "item1": [(rundir, "baseline", old_baseline)],
           "item2": [(train, "warmup_steps", old_warmup_steps)],
           "item3": [(isara, "draw_demos", old_draw_demos), (Template, "answer_prompt", old_answer_prompt)],
           "item4": [(isara, "fit_budget", old_fit_budget)],
           "item5": [(isara, "MARKERS", OLD_MARKERS), (isara, "cut", old_cut),
                     (gen_prompts, "find_stop", old_find_stop)],
           "item6": []}


def configure(item, cfg):
    return dataclasses.replace(cfg, sft=dataclasses.replace(cfg.sft, length_grouping=True)) if item == "item6" else cfg


def patched(item):
    stack = contextlib.ExitStack()
    for obj, name, new in PATCHES[item]:
        stack.enter_context(mock.patch.object(obj, name, new))
    return stack


# ------------------------------------------------------------------- --check probes (stubs, no model)
def tok(text):  # a tokenizer stub: one token per word
    return NS(input_ids=text.split())


def probe_item1(cfg):  # the SFT stages the baseline trains: (dir, lr, t)
    calls = []
    with mock.patch.object(rundir, "RunDir", lambda root, *a: NS(
            root=Path(root), base=NS(model=None), seeds=[], model_stage=lambda p, fn: fn(p) or NS(model=None),
            eval_stage=lambda *a, **k: None, finish=lambda: [])), \
            mock.patch.object(isara, "sft", lambda m, pairs, out, lr, c, t: calls.append((out.name, lr, t))):
        rundir.baseline("sft", None, [], "/nonexistent", cfg, [], None)
    return calls


def probe_item3(cfg):  # the USER turns of a question prompt, an answer prompt (kNN) and an ICL-kNN prompt
    prompts, c = [], dataclasses.replace(cfg, generate=1, demos=4)
    pools = [[{"question": f"s{i}", "answer": "a"} for i in range(8)],
             [{"question": f"g{i}", "answer": "a"} for i in range(4)]]
    model, index = NS(tokenizer=tok, cfg=NS(max_pos=10**6)), NS(query=lambda v, k: [list(range(k))])
    with mock.patch.object(isara, "generate", lambda m, ps, *a, **k: prompts.extend(ps) or [""] * len(ps)):
        isara.write_questions(model, pools, 2, c)
        isara.write_answers(model, pools, [index, index], NS(embed=lambda qs: None), [{"question": "q"}], 2, c)
        isara.answer_questions(model, ["q"], 8, lambda i, q: [("n0", "a"), ("n1", "a"), ("n2", "a")])
    return [re.findall(r"USER: (\w+)", p) for p in prompts]


def fit_words(lengths, budget=8):  # item4: the demo lengths (words) that fit_budget keeps
    demos = [(" ".join(["w"] * n), "") for n in lengths]
    ds = isara.fit_budget(None, tok, demos, lambda ds: " ".join(q for q, _ in ds), budget)
    return [len(q.split()) for q, _ in ds]


PROBES = {"item1": probe_item1, "item3": probe_item3,
          # (warm-up steps, lr at steps 0 and 1) of a 2-step SFT with peak lr 1
          "item2": lambda cfg: (train.warmup_steps(cfg.sft, 2), [
              round(float(train.lr_schedule(dataclasses.replace(cfg.sft, lr=1.0), 2)(s)), 3) for s in range(2)]),
          # the demos kept of lengths [4, 10, 3] and of [8] under a budget of 8 words
          "item4": lambda cfg: (fit_words([4, 10, 3]), fit_words([8])),
          "item5": lambda cfg: [(isara.cut(s), gen_prompts.find_stop(s, isara.MARKERS))  # (cut text, stop index)
                                for s in ("What is the ANSI \\begin{x} ASSISTENT: y", "USER: hello ASSISTANT: hi")],
          # each step's example lengths (sorted), 16 examples, 4 per step
          "item6": lambda cfg, n=np.array([5, 60, 7, 90, 12, 80, 3, 70] * 2): [
              sorted(n[b].tolist()) for b in plan_epoch(n, 4, 0, 0, cfg.sft.length_grouping)]}


def check(item):
    if item == "none":
        return print("none: the current code, nothing to check")
    new = PROBES[item](DEMO)
    with patched(item):
        old = PROBES[item](configure(item, DEMO))
    assert new != old, f"{item}: the patch changes nothing: {new}"
    print(f"{item} current: {new}\n{item} old:     {old}\n{item}: OK (behaviour differs)")


KEYS = ("pretrained_harmful", "isara_harmful", "isara_it1_harmful", "benign_helpful", "sft_harmful",
        "icl_knn_harmful", "icl_random_harmful", "one_round_harmful", "minutes")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("item", choices=sorted(PATCHES))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--root", type=Path, default=Path("runs/fidelity"))
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--domain", default="discrimination")
    ap.add_argument("--check", action="store_true", help="show that the patch changes behaviour (no demo)")
    args = ap.parse_args()
    if args.check:
        return check(args.item)
    hostmem.reexec()  # as the `selfalign` command: huge pages for XLA:CPU (re-runs this script once)
    outs = []
    with patched(args.item):
        for s in args.seeds:
            out, _ = run_demo(args.root / args.item / f"seed{s}", args.domain, seed=s, cfg=configure(args.item, DEMO),
                              cache_dir=args.cache_dir)
            outs.append(out)
            cross = ", ".join(f"{d} {a:.2f}->{b:.2f}" for d, (a, b) in out["cross_domain_harmful"].items())
            print(f"{args.item} seed {s}: " + "  ".join(f"{k} {out.get(k)}" for k in KEYS) + f"  cross {cross}",
                  flush=True)
    mean = {k: round(sum(o[k] for o in outs) / len(outs), 4) for k in KEYS if all(o.get(k) is not None for o in outs)}
    print(json.dumps({"item": args.item, "seeds": args.seeds, "mean": mean, "runs": outs}))


if __name__ == "__main__":
    main()
