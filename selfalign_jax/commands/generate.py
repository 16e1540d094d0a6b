"""`selfalign generate`: complete every prompt of a JSONL file with a local model."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from selfalign_jax.core.template import MARKERS


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
    hbm_gib: float | None = None,
    distributed: bool = False,
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
        hbm_gib: memory per device in GiB for the up-front plan check of --batch-size (default: the
            accelerator's; none on a CPU).
        distributed: call jax.distributed.initialize() first (multi-host; also implied by
            JAX_COORDINATOR_ADDRESS).
    """
    from selfalign_jax import api

    api.generate(**{k: v for k, v in locals().items() if k != "api"})
