"""`selfalign eval`: zero-shot greedy answers to eval questions, scored."""

from pathlib import Path
from typing import Literal


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
    from selfalign_jax.data import read_eval
    from selfalign_jax.errors import UserError
    from selfalign_jax.evaluate import get_scorer, precheck
    from selfalign_jax.config import IsaraConfig
    from selfalign_jax.loaded import LoadedModel

    if batch_size is not None and batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    if max_new_tokens < 1:
        raise UserError("--max-new-tokens must be >= 1")
    if out is not None:
        fileio.check_output(out, inputs={"--data": data, "--model": model})
        fileio.check_output(Path(str(out) + ".metrics.json"), "--out (metrics)", inputs={"--data": data})
    rows = read_eval(data)
    sc = get_scorer(scorer, model=model)
    precheck(sc, rows)
    m = LoadedModel.load(model)
    cfg = dataclasses.replace(IsaraConfig(), eval_max_new_tokens=max_new_tokens, template=template,
                              batch_size=batch_size, seed=seed)
    items, metrics = isara.evaluate(m, rows, sc, cfg)
    if out is not None:
        fileio.write_jsonl(Path(out), items)
        fileio.write_json(Path(str(out) + ".metrics.json"), metrics)
    for k, v in metrics.items():
        print(f"{k:>28}: {v:.4f}" if isinstance(v, float) else f"{k:>28}: {v}")
    print(json.dumps(metrics))
