"""Pretraining documents, seed pairs and evaluation prompts of the synthetic world, as plain Python data.

A document is 3-6 conversations in the ISARA template joined by a blank line, all in ONE persona, so a
model must infer the persona from the context (the in-context mechanism ISARA relies on). With
probability `focus` every conversation of a document shares one topic (so a model learns to continue a
topic from demonstrations), otherwise topics are drawn independently. A document's persona is 'aligned'
with probability `aligned_frac` (default 0.2): most harm-domain documents comply, so the base model is
mostly harmful zero-shot, but safe when shown aligned demonstrations. Benign answers are the same in
both personas.
"""

import numpy as np

from selfalign_jax.core.errors import UserError
from selfalign_jax.app.world import language

SEP = "\n\n"


def render(question, answer):
    """One conversation in the plain ISARA template."""
    return f"BEGINNING OF CONVERSATION: USER: {question} ASSISTANT: {answer} END OF CONVERSATION"


def _rng(seed, *salt):
    return np.random.default_rng([int(seed), *salt])


def pretraining_documents(n, seed=0, aligned_frac=0.2, focus=0.5, topic_weights=None, min_conv=3, max_conv=6,
                          aside_prob=0.3):
    """`n` documents: dicts {text, persona, domains (one per conversation)}. Questions use training
    templates and objects only; a share `aside_prob` of answers ends with an aside naming any object of their
    topic (held-out objects included: that is how a model learns what they are)."""
    if n < 0 or not 0.0 <= aligned_frac <= 1.0 or not 0.0 <= focus <= 1.0 or not 1 <= min_conv <= max_conv:
        raise UserError("pretraining_documents: need n >= 0, 0 <= aligned_frac, focus <= 1, 1 <= min_conv <= max_conv")
    w = (np.ones(len(language.DOMAINS)) if topic_weights is None
         else np.array([topic_weights[d] for d in language.DOMAINS], float))
    w = w / w.sum()
    rng = _rng(seed, 1)
    docs = []
    for _ in range(n):
        persona = "aligned" if rng.random() < aligned_frac else "unaligned"
        k = int(rng.integers(min_conv, max_conv + 1))
        if rng.random() < focus:
            domains = [language.DOMAINS[rng.choice(len(w), p=w)]] * k
        else:
            domains = [language.DOMAINS[i] for i in rng.choice(len(w), size=k, p=w)]
        convs = []
        for d in domains:
            t = language.topic(d)
            q = language.question(d, rng, "train")
            convs.append(render(q, language.answer(d, persona, rng, aside_objects=t.objects, aside_prob=aside_prob)))
        docs.append({"text": SEP.join(convs), "persona": persona, "domains": domains})
    return docs


def _pairs(domain, n, seed, split, salt):
    t = language.topic(domain)
    if n < 0 or n > language.question_space_size(domain, split):
        raise UserError(f"cannot draw {n} distinct {split} questions for domain {domain!r}")
    rng = _rng(seed, salt, language.DOMAINS.index(domain))
    seen, out = set(), []
    while len(out) < n:
        q = language.question(domain, rng, split)
        if q in seen:
            continue
        seen.add(q)
        out.append({"question": q, "answer": language.answer(domain, "aligned", rng, aside_objects=t.train_objects),
                    "category": domain})
    return out


def seed_pairs(domain, n=64, seed=0):
    """`n` distinct aligned (question, answer) pairs of `domain` from training templates and objects:
    list of {question, answer, category}."""
    return _pairs(domain, n, seed, "train", 2)


def eval_prompts(domain, n=100, seed=0):
    """`n` distinct held-out prompts of `domain` (each has a held-out template or object), with an aligned
    reference answer: list of {question, answer, category}."""
    return _pairs(domain, n, seed, "eval", 3)


def stats(docs, tokenizer=None):
    """Corpus statistics: documents, conversations, whitespace words (distinct and per document), and with a
    `tokenizers.Tokenizer` the tokens per document and per conversation."""
    words = [d["text"].split() for d in docs]
    n_conv = sum(len(d["domains"]) for d in docs)
    out = {"documents": len(docs), "conversations": n_conv, "distinct_words": len({w for ws in words for w in ws}),
           "words_per_document": float(np.mean([len(ws) for ws in words])) if docs else 0.0,
           "aligned_share": float(np.mean([d["persona"] == "aligned" for d in docs])) if docs else 0.0}
    if tokenizer is not None:
        lens = [len(e.ids) for e in tokenizer.encode_batch([d["text"] for d in docs])]
        out["tokens_per_document"] = float(np.mean(lens)) if docs else 0.0
        out["max_tokens_per_document"] = int(max(lens, default=0))
        out["tokens_per_conversation"] = float(sum(lens) / max(n_conv, 1))
    return out
