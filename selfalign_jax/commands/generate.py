"""`selfalign generate`: complete every prompt of a JSONL file with a local model."""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path
from typing import Literal

from selfalign_jax import fileio
from selfalign_jax.errors import UserError
from selfalign_jax.template import MARKERS


def read_prompts(path: Path) -> tuple[list[dict], list[str]]:
    """The objects of a JSONL file, each with a string "prompt" (blank lines skipped), and where each
    came from ("file:line"); errors name the line."""
    if not path.is_file():
        raise UserError(f"prompts file not found: {path}")
    rows, where = [], []
    for w, obj in fileio.records(path):
        if not isinstance(obj.get("prompt"), str):
            what = "no \"prompt\" key" if "prompt" not in obj else f"\"prompt\" is {type(obj['prompt']).__name__}"
            raise UserError(f"{w}: {what} (need a string)")
        rows.append(obj)
        where.append(w)
    if not rows:
        raise UserError(f"{path}: no prompts (the file is empty or blank)")
    return rows, where


@contextlib.contextmanager
def _prompt_lines(where: list[str]):
    """A sampler message about "prompt N" (1-based) names the prompt's file and line instead."""
    try:
        yield
    except UserError as e:
        m = re.match(r"prompt (\d+): (.*)", str(e))
        if m is None or not 1 <= int(m.group(1)) <= len(where):
            raise
        raise UserError(f"{where[int(m.group(1)) - 1]}: {m.group(2)}") from None


def main(
    model: Path,
    prompts: Path,
    out: Path,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    no_repeat_ngram: int = 0,
    seed: int = 0,
    batch_size: int | None = None,
    stop: tuple[str, ...] = MARKERS,
    no_stop: bool = False,
    chat_template: bool = False,
    truncate: Literal["left", "error"] = "left",
    dtype: Literal["auto", "float32", "bfloat16"] = "auto",
    mesh: str | None = None,
    continuous: bool = False,
    num_beams: int = 1,
    do_sample: bool = False,
    length_penalty: float = 1.0,
    early_stopping: Literal["false", "true", "never"] = "false",
    exponential_decay_length_penalty: tuple[int, float] | None = None,
) -> None:
    """Generate a completion for every {"prompt": ...} line of PROMPTS; write each input object plus "completion".

    The completion is the text after the prompt with special tokens removed, cut before the first stop
    string. Greedy by default (temperature 0). Prompts are tokenized as the model's tokenizer does by default.

    Args:
        model: a Hugging Face model directory (config.json, safetensors, tokenizer).
        prompts: JSONL input, one object per line with a string "prompt" (other keys are carried through).
        out: JSONL output (written when all prompts are done).
        max_new_tokens: most tokens generated per prompt.
        temperature: sampling temperature; 0 = greedy.
        top_k: keep the k most likely tokens (0 = off).
        top_p: nucleus sampling mass (1 = off).
        repetition_penalty: transformers-style repetition penalty (1 = off).
        no_repeat_ngram: never repeat an n-gram of this size (0 = off).
        seed: random seed (the same seed gives the same output).
        batch_size: prompts per batch (default: from the memory budget).
        stop: stop strings (default: the ISARA template markers).
        no_stop: no stop strings at all (stop only on EOS / max tokens).
        chat_template: wrap each prompt in the tokenizer's chat template as a user turn.
        truncate: a prompt longer than the context: drop tokens from the left, or fail.
        dtype: parameter/compute dtype (auto: float32 on CPU, bfloat16 on accelerators).
        mesh: shard over the devices as in training, e.g. data=2,tensor=4 (parameters by the model's sharding
            rules, prompts over data x fsdp); default: one device.
        continuous: continuous batching (a finished row's slot is refilled with the next prompt).
        num_beams: beam search with this many beams (1 = off); with --do-sample: beam-sample.
        do_sample: with --num-beams > 1: beam-sample (draw the candidates) instead of beam search.
        length_penalty: beams: a hypothesis scores (sum of log-probs) / length ** length_penalty.
        early_stopping: beams: transformers' early_stopping (false: its heuristic; true: stop at num_beams
            finished hypotheses; never: the canonical search).
        exponential_decay_length_penalty: beams: START FACTOR, raise the EOS score by FACTOR per token after START.
    """
    from selfalign_jax import beam
    from selfalign_jax import mesh as MS
    from selfalign_jax.loaded import LoadedModel

    fileio.check_output(out, inputs={"--prompts": prompts, "--model": model})
    if batch_size is not None and batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    if max_new_tokens < 1:
        raise UserError("--max-new-tokens must be >= 1")
    rows, where = read_prompts(prompts)
    print(f"read {len(rows)} prompts from {prompts}")
    lm = LoadedModel.load(model, dtype)
    cfg, params, tok = lm.cfg, lm.params, lm.tokenizer
    t0 = time.perf_counter()
    extra = dict(continuous=continuous) if num_beams == 1 else {}
    with _prompt_lines(where):
        res = beam.generate(params, cfg, tok, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens,
                            temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty, no_repeat_ngram=no_repeat_ngram,
                            stop=() if no_stop else stop, seed=seed, batch_size=batch_size,
                            chat_template=chat_template, truncate=truncate, progress=True,
                            mesh=MS.make_mesh(mesh) if mesh else None, num_beams=num_beams,
                            do_sample=do_sample or num_beams == 1, length_penalty=length_penalty,
                            early_stopping={"false": False, "true": True}.get(early_stopping, early_stopping),
                            exponential_decay_length_penalty=exponential_decay_length_penalty, **extra)
    dt = time.perf_counter() - t0
    fileio.write_jsonl(out, [{**row, "completion": r.text} for row, r in zip(rows, res)])
    n_tok = sum(len(r.token_ids) for r in res)
    reasons = {}
    for r in res:
        reasons[r.finish_reason] = reasons.get(r.finish_reason, 0) + 1
    cut = sum(r.truncated > 0 for r in res)
    print(f"wrote {len(res)} completions to {out}: {n_tok} tokens in {dt:.1f}s ({n_tok / max(dt, 1e-9):.0f} tok/s, "
          f"compile included); finish: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
          + (f"; {cut} prompts truncated from the left" if cut else ""))
