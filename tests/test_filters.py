"""ROUGE-L against the rouge_score package, and the four ISARA filters."""

import random

import pytest

from selfalign_jax.app import filters
from selfalign_jax.app.filters import FilterConfig, filter_pairs, lcs_len, rouge_l, rouge_l_max, rouge_tokenize

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer", reason="rouge-score (test extra) not installed")
SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def ref_f(target, pred):
    return SCORER.score(target, pred)["rougeL"].fmeasure


def dp_lcs(a, b):
    t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            t[i][j] = t[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(t[i - 1][j], t[i][j - 1])
    return t[-1][-1]


@pytest.mark.parametrize("target,pred,want", [
    ("", "", 0.0),
    ("", "a b c", 0.0),
    ("hello world", "", 0.0),
    ("!!! ... ???", "hello", 0.0),                      # punctuation only: no tokens
    ("The cat sat.", "the CAT, sat!", 1.0),             # case and punctuation ignored
    ("a b c d", "a c", 2 * (1.0 * 0.5) / 1.5),          # p=1, r=0.5
    ("the the the", "the", 2 * (1.0 * (1 / 3)) / (1 + 1 / 3)),  # repeated words
    ("a b a b", "b a b a", 2 * 0.75 * 0.75 / 1.5),      # lcs 3
    ("don't stop", "don t stop", 1.0),                  # apostrophe splits the word
    ("café 3.5%", "caf 3 5", 1.0),                      # non-ASCII letters are separators
])
def test_rouge_hand_checked(target, pred, want):
    assert rouge_l(target, pred) == pytest.approx(want, abs=1e-12)
    assert rouge_l(target, pred) == ref_f(target, pred)


def test_tokenizer_matches_rouge_score():
    from rouge_score import tokenize
    for s in ["Hello, World! 42x", "  tabs\tand\nnewlines ", "İstanbul ÄÖÜ ß", "a-b_c d.e", ""]:
        assert rouge_tokenize(s) == tokenize.tokenize(s, None)


def test_rouge_random_matches_reference():
    rng = random.Random(0)
    vocab = ["a", "b", "c", "d", "The", "cat", "CAT,", "x1", "!", "...", "dog's", "é", "q?"]
    for _ in range(400):
        t = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 30)))
        p = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 30)))
        assert rouge_l(t, p) == ref_f(t, p)
        ta, pa = rouge_tokenize(t), rouge_tokenize(p)
        assert lcs_len(ta, pa) == dp_lcs(ta, pa)


def test_lcs_long_sequences():
    rng = random.Random(1)
    a = [rng.randint(0, 5) for _ in range(300)]
    b = [rng.randint(0, 5) for _ in range(250)]
    assert lcs_len(a, b) == dp_lcs(a, b)


def test_multi_reference_is_max():
    refs = ["how do I bake bread at home", "what is the capital of france", ""]
    pred = "what is the capital city of france"
    want = max(ref_f(r, pred) for r in refs)
    assert rouge_l_max(refs, pred) == want
    assert want == SCORER.score_multi(refs, pred)["rougeL"].fmeasure
    assert rouge_l_max([], pred) == 0.0


def test_filters_each_reason():
    demos = ("What is the best way to learn a new language quickly?",)
    cands = [
        ("How can I improve my sleep at night?", "Keep a regular schedule and avoid screens.", demos),   # kept
        ("How can I  improve my sleep at night? ", "Some other answer with enough words.", demos),      # duplicate
        ("What is the best way to learn a new language fast?", "Practice every day with natives.", demos),  # rouge
        ("Why is sky blue?", "Rayleigh scattering of sunlight by air.", demos),                    # short_question
        ("What should I cook for dinner tonight?", "Pasta.", demos),                                   # short_answer
        ("Is it true that the earth is round, yes or no please?", "the earth is round, yes", demos),  # in question
    ]
    res = filter_pairs(cands)
    assert res.reasons == [None, "duplicate", "rouge", "short_question", "short_answer", "answer_in_question"]
    assert res.kept == [cands[0]] and res.kept_idx == [0]
    assert set(res.counts) == set(filters.REASONS) and sum(res.counts.values()) == 5


def test_filters_seen_threshold_and_objects():
    class C:
        def __init__(self, q, a, d):
            self.question, self.answer, self.demo_questions = q, a, d

    q = "Tell me how to grow tomatoes on a balcony."
    a = "Use large pots, full sun and regular watering."
    assert filter_pairs([C(q, a, ())], seen_questions=[q]).reasons == ["duplicate"]
    # ROUGE exactly at the threshold is kept (drop only when > threshold)
    demo = "Tell me how to grow potatoes on a balcony."
    f = rouge_l(demo, q)
    assert filter_pairs([(q, a, [demo])], cfg=FilterConfig(rouge_threshold=f)).reasons == [None]
    assert filter_pairs([(q, a, [demo])], cfg=FilterConfig(rouge_threshold=f - 1e-9)).reasons == ["rouge"]
    assert filter_pairs([(q, "Just two", ())], cfg=FilterConfig(min_answer_words=2)).reasons == [None]
