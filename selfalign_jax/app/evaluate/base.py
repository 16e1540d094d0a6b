"""What every scorer shares: the Scorer protocol, rates by label and by category, the result dict."""

from __future__ import annotations

from collections import Counter
from typing import Protocol, Sequence

import numpy as np

from selfalign_jax.app.data import CATEGORY_SEP
from selfalign_jax.core.errors import UserError


class Scorer(Protocol):
    name: str  # a scorer may also set `version` (default 1): raised when its rules change (rundir.scorer_tag)

    def score(self, questions: Sequence[str], answers: Sequence[str] | None, records: Sequence) -> dict: ...


def summary_rates(labels: Sequence, keys: Sequence | None = None) -> dict:
    """Share of each label (keys: the labels to report, default those seen, in first-seen order)."""
    labels = list(labels)
    keys = list(dict.fromkeys(labels)) if keys is None else list(keys)
    n = len(labels)
    c = Counter(labels)
    return {k: (c[k] / n if n else 0.0) for k in keys}


def share(flags: Sequence[bool]) -> float:
    """Share of true flags (0.0 for none)."""
    flags = list(flags)
    return sum(map(bool, flags)) / len(flags) if flags else 0.0


def scaling_ratio(kept_counts, n_seeds: int) -> dict:
    """Data scaling ratio: kept self-generated samples (all iterations) / seed samples.
    kept_counts: a sequence (iterations 1..T in order) or a mapping iteration -> count."""
    if isinstance(kept_counts, dict):
        kept = [int(kept_counts[k]) for k in sorted(kept_counts)]
    else:
        kept = [int(k) for k in kept_counts]
    total = sum(kept)
    return {"n_seeds": int(n_seeds), "kept_per_iteration": kept, "kept_total": total,
            "scaling_ratio": (total / n_seeds) if n_seeds else None}


def as_record(r) -> dict:
    if r is None:
        return {}
    return r.to_dict() if hasattr(r, "to_dict") else dict(r)


def records_for(records, n: int) -> list[dict]:
    if records is None:
        return [{} for _ in range(n)]
    records = [as_record(r) for r in records]
    if len(records) != n:
        raise UserError(f"scorer: {n} questions but {len(records)} records")
    return records


def categories(rec: dict) -> list[str]:
    cat = rec.get("category")
    return [c for c in (cat or "").split(CATEGORY_SEP) if c]


def by_category(records: list[dict], flags: Sequence[bool], key: str) -> dict:
    """{f"{key}/{category}": share flagged among the items of that category} (multi-label rows count
    under each of their categories)."""
    num, den = Counter(), Counter()
    for rec, f in zip(records, flags):
        for c in categories(rec):
            den[c] += 1
            num[c] += bool(f)
    return {f"{key}/{c}": num[c] / den[c] for c in sorted(den)}


def check_answers(questions, answers):
    if answers is None or len(answers) != len(questions):
        raise UserError(f"scorer: {len(questions)} questions but "
                        f"{'no' if answers is None else len(answers)} answers")


def result(name: str, n: int, metrics: dict, items: list) -> dict:
    return {"scorer": name, "n": n, "metrics": {k: _py(v) for k, v in metrics.items()}, "items": items}


def _py(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


def pad_id(cfg, tok) -> int:
    for v in (getattr(tok, "pad_token_id", None), cfg.pad_id, cfg.eos_ids[0] if cfg.eos_ids else None):
        if v is not None:
            return int(v)
    return 0
