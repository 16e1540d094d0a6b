"""Learnability probe of the world's tiny base model: does it behave like the base model ISARA needs?

Measures, on held-out evaluation prompts (greedy decoding, the world's exact judge):
  (a) zero-shot harmful rate per harm domain, helpful rate per benign domain;
  (b) harmful rate with 8 aligned demonstrations of the same domain in the prompt (ICL);
  (c) question writing: 8 aligned demonstrations + `BEGINNING OF CONVERSATION: USER:`, sampled;
      share >= 5 words, share in the demonstrations' domain, share copied from the demonstrations,
      share passing ISARA's ROUGE-L <= 0.7 rule, distinct share;
  (d) malformed share and the share of answers that stop at END / </s>;
  (e) SFT sanity: fine-tune on 64 aligned seed pairs of one harm domain (loss on answer tokens),
      harmful rate of that domain before / after.
Prints a table, then one JSON line.

    python scripts/world_probe.py [--model DIR | --cache DIR] [--seed 0] [--n 50] [--sft-domain discrimination]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from selfalign_jax.core import checkpoint, model as M  # noqa: E402
from selfalign_jax.app.filters import rouge_l_max  # noqa: E402
from selfalign_jax.core.template import Template  # noqa: E402
from selfalign_jax.app.world import corpus as C, judge as J, language as L, pretrain as P  # noqa: E402
from selfalign_jax.app.world.tokenizer import load_tokenizer  # noqa: E402

TPL = Template()


def question_domains(q: str) -> set:
    """Domains whose act phrases occur in `q` (the act decides a question's domain)."""
    q = f" {q} "
    return {d for d in L.DOMAINS if any(f" {a} " in q for a in L.topic(d).acts)}


def answers(params, cfg, tok, prompts, **kw):
    raw = P.decode(params, cfg, tok, prompts, raw=True, **kw)
    from selfalign_jax.core.template import cut

    cutted = [cut(r.split("</s>")[0]) for r in raw]
    stopped = [("END" in r) or ("</s>" in r) for r in raw]
    return cutted, stopped


def sft(params, cfg, tok, pairs, epochs=4, batch=16, lr=5e-4, seed=0):
    """Tiny SFT: AdamW, loss on answer tokens (+ </s>) only; returns new params."""
    import optax

    eos = tok.token_to_id("</s>")
    seqs, masks = [], []
    for p in pairs:
        prompt, target = TPL.train_pair(p["question"], p["answer"])
        a = tok.encode(prompt).ids
        b = tok.encode(target, add_special_tokens=False).ids + [eos]
        seqs.append(a + b)
        masks.append([0] * len(a) + [1] * len(b))
    T = max(len(s) for s in seqs)
    toks = np.zeros((len(seqs), T), np.int32)
    lm = np.zeros((len(seqs), T), np.float32)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        toks[i, :len(s)], lm[i, :len(m)] = s, m
    steps = epochs * (-(-len(seqs) // batch))
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
        optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), steps, 0.0),
        b1=0.9, b2=0.95, weight_decay=0.0))

    def loss_fn(p, t, m):
        valid = t != cfg.pad_id
        pos = M.positions(valid)
        lg = M.forward(p, cfg, t[:, :-1], pos[:, :-1])
        nll = -jnp.take_along_axis(jax.nn.log_softmax(lg, -1), t[:, 1:, None], -1)[..., 0]
        w = m[:, 1:]
        return (nll * w).sum() / w.sum()

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(p, s, t, m):
        loss, g = jax.value_and_grad(loss_fn)(p, t, m)
        u, s = opt.update(g, s, p)
        return jax.tree.map(lambda a, b: a + b, p, u), s, loss

    params = jax.tree.map(jnp.copy, params)
    state = opt.init(params)
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(epochs):
        order = rng.permutation(len(seqs))
        for b0 in range(0, len(order), batch):
            idx = order[b0:b0 + batch]
            params, state, loss = step(params, state, jnp.asarray(toks[idx]), jnp.asarray(lm[idx]))
            losses.append(float(loss))
    return params, losses


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="a pretrained world model directory (default: ensure_base_model)")
    ap.add_argument("--cache", help="cache directory for ensure_base_model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=50, help="evaluation prompts per domain")
    ap.add_argument("--k", type=int, default=8, help="demonstrations for ICL and question writing")
    ap.add_argument("--temperature", type=float, default=0.8, help="question-writing temperature")
    ap.add_argument("--sft-domain", default="discrimination")
    ap.add_argument("--no-sft", action="store_true")
    a = ap.parse_args(argv)

    t0 = time.time()
    model_dir = Path(a.model) if a.model else P.ensure_base_model(a.cache, seed=a.seed)
    t_pre = time.time() - t0
    meta = P.read_meta(model_dir) or {}
    cfg, params = checkpoint.load(model_dir, dtype="float32")
    tok = load_tokenizer(model_dir)
    rng = np.random.default_rng(a.seed + 100)
    seeds = {d: C.seed_pairs(d, 64, seed=a.seed) for d in L.DOMAINS}
    evals = {d: C.eval_prompts(d, a.n, seed=a.seed) for d in L.DOMAINS}
    res = {"model": str(model_dir), "pretrain_seconds": meta.get("seconds", {}).get("total"),
           "ensure_seconds": round(t_pre, 1), "params": meta.get("params"),
           "loss_last": meta.get("loss_last")}

    def demos(d):
        return [(p["question"], p["answer"]) for p in rng.choice(seeds[d], a.k, replace=False)]

    t1 = time.time()
    rows = []
    for mode in ("zero-shot", "icl"):
        prompts, doms = [], []
        for d in L.DOMAINS:
            for e in evals[d]:
                prompts.append(TPL.answer_prompt(demos(d) if mode == "icl" else [], e["question"]))
                doms.append(d)
        outs, stopped = answers(params, cfg, tok, prompts, max_new=48)
        for d in L.DOMAINS:
            sel = [i for i, x in enumerate(doms) if x == d]
            r = J.rates([outs[i] for i in sel], d)
            r["stopped"] = float(np.mean([stopped[i] for i in sel]))
            res[f"{mode}/{d}"] = {k: round(v, 3) for k, v in r.items()}
            rows.append((mode, d, r))
        res[f"{mode}/example"] = {"prompt_tail": prompts[0][-120:], "answer": outs[0]}
    t_ans = time.time() - t1

    # (c) question writing
    t2 = time.time()
    qprompts, qdoms, qdemos = [], [], []
    for d in L.DOMAINS:
        for _ in range(a.n):
            dm = demos(d)
            qprompts.append(TPL.question_prompt(dm))
            qdoms.append(d)
            qdemos.append([q for q, _ in dm])
    qs = P.decode(params, cfg, tok, qprompts, max_new=40, temperature=a.temperature, seed=a.seed)
    qstats = {}
    for d in L.DOMAINS:
        sel = [i for i, x in enumerate(qdoms) if x == d]
        items = [qs[i] for i in sel]
        qstats[d] = {
            "ge5_words": float(np.mean([len(q.split()) >= 5 for q in items])),
            "in_domain": float(np.mean([question_domains(q) == {d} for q in items])),
            "copied": float(np.mean([q in qdemos[i] for q, i in zip(items, sel)])),
            "rouge_ok": float(np.mean([rouge_l_max(qdemos[i], q) <= 0.7 for q, i in zip(items, sel)])),
            "distinct": len(set(items)) / max(len(items), 1),
            "example": items[0],
        }
        res[f"questions/{d}"] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in qstats[d].items()}
    t_q = time.time() - t2

    # (e) SFT sanity
    if not a.no_sft:
        t3 = time.time()
        d = a.sft_domain
        new, losses = sft(params, cfg, tok, seeds[d], seed=a.seed)
        prompts = [TPL.answer_prompt([], e["question"]) for x in L.DOMAINS for e in evals[x]]
        doms = [x for x in L.DOMAINS for _ in evals[x]]
        outs, _ = answers(new, cfg, tok, prompts, max_new=48)
        res["sft"] = {"domain": d, "loss_first": round(losses[0], 3), "loss_last": round(losses[-1], 3),
                      "steps": len(losses), "seconds": round(time.time() - t3, 1)}
        for x in L.DOMAINS:
            sel = [i for i, y in enumerate(doms) if y == x]
            r = J.rates([outs[i] for i in sel], x)
            res[f"sft/{x}"] = {k: round(v, 3) for k, v in r.items()}
            rows.append(("sft-" + d[:5], x, r))

    res["seconds"] = {"answers": round(t_ans, 1), "questions": round(t_q, 1), "total": round(time.time() - t0, 1)}
    harm = list(L.HARM_DOMAINS)
    res["summary"] = {
        "zero_shot_harmful": round(float(np.mean([res[f"zero-shot/{d}"]["harmful"] for d in harm])), 3),
        "icl_harmful": round(float(np.mean([res[f"icl/{d}"]["harmful"] for d in harm])), 3),
        "benign_helpful": round(float(np.mean([res[f"zero-shot/{d}"]["helpful"] for d in L.BENIGN_DOMAINS])), 3),
        "malformed": round(float(np.mean([res[f"zero-shot/{d}"]["malformed"] for d in L.DOMAINS])), 3),
        "stopped": round(float(np.mean([res[f"zero-shot/{d}"]["stopped"] for d in L.DOMAINS])), 3),
        "questions_ge5": round(float(np.mean([qstats[d]["ge5_words"] for d in L.DOMAINS])), 3),
        "questions_in_domain": round(float(np.mean([qstats[d]["in_domain"] for d in L.DOMAINS])), 3),
        "questions_copied": round(float(np.mean([qstats[d]["copied"] for d in L.DOMAINS])), 3),
        "questions_rouge_ok": round(float(np.mean([qstats[d]["rouge_ok"] for d in L.DOMAINS])), 3),
    }
    if "sft" in res:
        res["summary"]["sft_harmful_before"] = res[f"zero-shot/{a.sft_domain}"]["harmful"]
        res["summary"]["sft_harmful_after"] = res[f"sft/{a.sft_domain}"]["harmful"]

    print(f"model {model_dir}  params {res['params']}  pretrain {res['pretrain_seconds']} s  "
          f"final loss {res['loss_last']}")
    print(f"{'setting':<12} {'domain':<15} {'harmful':>8} {'refusal':>8} {'helpful':>8} {'malformed':>9} "
          f"{'stopped':>8}")
    for mode, d, r in rows:
        st = f"{r['stopped']:8.2f}" if "stopped" in r else f"{'':>8}"
        print(f"{mode:<12} {d:<15} {r['harmful']:8.2f} {r['refusal']:8.2f} {r['helpful']:8.2f} "
              f"{r['malformed']:9.2f} {st}")
    print(f"\n{'questions':<12} {'domain':<15} {'>=5 words':>9} {'in domain':>9} {'copied':>7} {'rouge ok':>8} "
          f"{'distinct':>8}  example")
    for d in L.DOMAINS:
        q = qstats[d]
        print(f"{'T=' + str(a.temperature):<12} {d:<15} {q['ge5_words']:9.2f} {q['in_domain']:9.2f} "
              f"{q['copied']:7.2f} {q['rouge_ok']:8.2f} {q['distinct']:8.2f}  {q['example'][:60]}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
