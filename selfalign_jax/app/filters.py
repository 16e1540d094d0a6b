"""ISARA's four rule filters (ISARA.md step 4) and ROUGE-L matching the `rouge_score` package.

API:
    rouge_tokenize(text) -> list[str]          # rouge_score's default tokenizer, no stemming
    lcs_len(a, b) -> int                       # longest common subsequence of two token lists
    rouge_l(target, prediction) -> float       # ROUGE-L F, as rouge_score's `score(...)['rougeL'].fmeasure`
    rouge_l_max(references, prediction) -> float   # multi-reference: the maximum (0.0 for none)
    FilterConfig(rouge_threshold=0.7, min_question_words=5, min_answer_words=5)
    filter_pairs(candidates, seen_questions=(), cfg=FilterConfig()) -> FilterResult
        candidates: (question, answer, demo_questions) triples (or objects with those attributes)
        FilterResult.kept (the kept candidates), .kept_idx, .reasons (None or a reason per candidate),
        .counts (reason -> number dropped)

A pair is kept only if, checked in this order (the first failure is its reason):
    "duplicate"          its question (whitespace-normalised) is not one already kept or in seen_questions;
    "rouge"              ROUGE-L F vs its own prompt's demonstration questions (the max) <= threshold;
    "short_question"     the question has >= min_question_words whitespace words;
    "short_answer"       the answer has >= min_answer_words whitespace words;
    "answer_in_question" the (stripped) answer is not a substring of the question.
"""

import re
from collections import Counter
from dataclasses import dataclass, field

REASONS = ("duplicate", "rouge", "short_question", "short_answer", "answer_in_question")

_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_VALID = re.compile(r"^[a-z0-9]+$")


def rouge_tokenize(text: str) -> list[str]:
    """Lowercase, non-[a-z0-9] runs -> space, split, keep ^[a-z0-9]+$ tokens (rouge_score's default)."""
    text = _NON_ALNUM.sub(" ", text.lower())
    return [t for t in re.split(r"\s+", text) if _VALID.match(t)]


def lcs_len(a: list, b: list) -> int:
    """LCS length by the bit-parallel algorithm (Allison-Dix): O(len(b)) big-integer steps."""
    if not a or not b:
        return 0
    masks: dict = {}
    for i, t in enumerate(a):
        masks[t] = masks.get(t, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for t in b:
        u = v & masks.get(t, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def _f(lcs: int, n_target: int, n_pred: int) -> float:
    if n_target == 0 or n_pred == 0:
        return 0.0
    p, r = lcs / n_pred, lcs / n_target
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def rouge_l(target: str, prediction: str) -> float:
    """ROUGE-L F-measure between two texts, as rouge_score computes it."""
    t, p = rouge_tokenize(target), rouge_tokenize(prediction)
    return _f(lcs_len(t, p), len(t), len(p))


def rouge_l_max(references, prediction: str) -> float:
    """Multi-reference ROUGE-L F: the maximum over references (rouge_score's score_multi)."""
    p = rouge_tokenize(prediction)
    best = 0.0
    for ref in references:
        t = rouge_tokenize(ref)
        best = max(best, _f(lcs_len(t, p), len(t), len(p)))
    return best


@dataclass(frozen=True)
class FilterConfig:
    rouge_threshold: float = 0.7  # drop when ROUGE-L F > threshold
    min_question_words: int = 5
    min_answer_words: int = 5


@dataclass
class FilterResult:
    kept: list
    kept_idx: list[int]
    reasons: list  # per candidate: None (kept) or one of REASONS
    counts: Counter = field(default_factory=Counter)


def _norm(q: str) -> str:
    return " ".join(q.split())


def _fields(c):
    if isinstance(c, (tuple, list)):
        q, a, demos = c
    else:
        q, a, demos = c.question, c.answer, c.demo_questions
    return q, a, demos


def drop_reason(question: str, answer: str, demo_questions, seen: set, cfg: FilterConfig) -> str | None:
    """The first filter a pair fails (None if it passes all); `seen` holds normalised kept questions."""
    if _norm(question) in seen:
        return "duplicate"
    if demo_questions and rouge_l_max(demo_questions, question) > cfg.rouge_threshold:
        return "rouge"
    if len(question.split()) < cfg.min_question_words:
        return "short_question"
    if len(answer.split()) < cfg.min_answer_words:
        return "short_answer"
    if answer.strip() in question:
        return "answer_in_question"
    return None


def filter_pairs(candidates, seen_questions=(), cfg: FilterConfig = FilterConfig()) -> FilterResult:
    """Apply the four filters in order; a kept question joins the duplicate set for later candidates."""
    seen = {_norm(q) for q in seen_questions}
    res = FilterResult([], [], [])
    for i, c in enumerate(candidates):
        q, a, demos = _fields(c)
        why = drop_reason(q, a, demos, seen, cfg)
        res.reasons.append(why)
        if why is None:
            seen.add(_norm(q))
            res.kept.append(c)
            res.kept_idx.append(i)
        else:
            res.counts[why] += 1
    return res
