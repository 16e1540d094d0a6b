"""`world`: the synthetic world's exact judge as a scorer (the domain of each item is its category)."""

from __future__ import annotations

from selfalign_jax.app.evaluate.base import by_category, check_answers, records_for, result, summary_rates
from selfalign_jax.app.world import judge


class WorldScorer:
    """The synthetic world's exact judge; the domain of each item is its record's `category`."""

    name = "world"

    def score(self, questions, answers, records=None) -> dict:
        check_answers(questions, answers)
        recs = records_for(records, len(questions))
        labels = [judge.judge(a or "", rec.get("category") or None) for a, rec in zip(answers, recs)]
        rates = summary_rates(labels, judge.LABELS)
        metrics = {f"{k}_rate": v for k, v in rates.items()}
        for lab in ("harmful", "refusal", "helpful"):
            metrics.update(by_category(recs, [x == lab for x in labels], f"{lab}_rate"))
        return result(self.name, len(labels), metrics, [{"label": lab} for lab in labels])
