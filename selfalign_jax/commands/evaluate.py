"""`selfalign eval`: zero-shot greedy answers to eval questions, scored."""

from pathlib import Path
from typing import Literal


def load_eval(path: Path) -> list[dict]:
    """Eval rows (any format `selfalign data` reads) as plain dicts; at least one question."""
    from selfalign_jax.data import detect_format, read_jsonl, read_samples
    from selfalign_jax.errors import UserError

    try:
        samples = read_samples(path) if detect_format(path) != "qa" else read_jsonl(path, require_answer=False)
    except UserError:  # plain {question, ...} lines with no answer field
        if not str(path).endswith((".jsonl", ".jsonl.gz", ".json")):
            raise
        samples = read_jsonl(path, require_answer=False)
    rows = [s.to_dict() for s in samples]
    if not rows:
        raise UserError(f"{path}: no eval questions")
    for i, r in enumerate(rows, 1):
        if not r.get("question", "").strip():
            raise UserError(f"{path}: item {i} has an empty question")
    return rows


def make_scorer(spec: str, model: Path):
    from selfalign_jax.evaluate import get_scorer

    return get_scorer(spec, model=model)


def main(model: Path, data: Path, scorer: str, out: Path | None = None, max_new_tokens: int = 200,
         template: Literal["plain", "chat"] = "plain", batch_size: int | None = None, seed: int = 0) -> None:
    """Answer DATA's questions zero-shot with MODEL (greedy) and score the answers.

    Scorers: `keywords:FILE` (regexes; a match is harmful), `world` (the demo world's exact judge),
    `classifier:DIR[:THRESHOLD]` (HF *ForSequenceClassification, e.g. Beaver-Dam: harmful rate),
    `truthfulqa` (BLEU / ROUGE-L to true minus false references), `truthfulqa-mc[:DIR]` (likelihood of
    the reference answers), `pairwise:JUDGE_DIR:OTHER.jsonl` (win rate against OTHER's answers).

    Args:
        model: the model to evaluate (HF directory).
        data: eval prompts (plain JSONL or any format `selfalign data` reads).
        scorer: scorer spec (above).
        out: write each item with its response and labels here (JSONL), and metrics to OUT.metrics.json.
        max_new_tokens: answer length limit.
        template: plain ISARA template or the model's own chat template.
        batch_size: generation batch (default: from a memory budget).
        seed: key for the (greedy, so unused) sampler.
    """
    import dataclasses
    import json

    from selfalign_jax import fileio, isara

    rows = load_eval(data)
    sc = make_scorer(scorer, model)
    m = isara.Model.load(model)
    cfg = dataclasses.replace(isara.IsaraConfig(), eval_max_new_tokens=max_new_tokens, template=template,
                              batch_size=batch_size, seed=seed)
    items, metrics = isara.evaluate(m, rows, sc, cfg)
    if out is not None:
        fileio.write_jsonl(Path(out), items)
        fileio.write_json(Path(str(out) + ".metrics.json"), metrics)
    for k, v in metrics.items():
        print(f"{k:>28}: {v:.4f}" if isinstance(v, float) else f"{k:>28}: {v}")
    print(json.dumps(metrics))
