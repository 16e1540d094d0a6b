"""The settings of an ISARA run: `IsaraConfig`, a plain frozen dataclass validated on construction, whose
`sft` section is a `TrainConfig` and whose generation steps are `GenConfig`s (selfalign_jax/core/settings.py).
Presets in configs/*.json use the same field names."""

from __future__ import annotations

import dataclasses
from typing import Literal

from selfalign_jax.core.settings import GenConfig, TrainConfig, _check

# the `selfalign` command line being run (set by cli.main; None when a command is called from Python):
# which flags were given, so a preset can be overridden even by a value equal to the built-in default
COMMAND_LINE: list[str] | None = None


@dataclasses.dataclass(frozen=True)
class IsaraConfig:
    """Every knob of a run; the defaults are the reference (paper) settings."""

    iterations: int = 2  # T
    generate: int = 512  # N prompts per iteration
    demos: int = 8  # K demonstrations per prompt (question and answer generation)
    icl_demos: int | None = None  # K of the ICL baselines (None: demos; the authors used 4 on Alpaca, 6 to generate)
    answer_demos: Literal["knn", "random"] = "knn"  # answer demonstrations: retrieved, or random (authors' --random)
    context_budget: int = 2000  # a demonstration is added only while the prompt stays under this
    template: Literal["plain", "chat"] = "plain"
    embedder: Literal["encoder", "lm", "hashing"] = "lm"
    encoder: str | None = None  # local HF directory of a BERT-family sentence encoder
    lm_layers: float = 1.0  # the lm embedder pools the hidden states after this fraction of the layers
    question_gen: GenConfig = GenConfig(max_new_tokens=200, temperature=1.0, repetition_penalty=1.05,
                                        no_repeat_ngram=10)
    answer_gen: GenConfig = GenConfig(max_new_tokens=100, temperature=1.0, repetition_penalty=1.2,
                                      no_repeat_ngram=10)
    eval_max_new_tokens: int = 200
    rouge_threshold: float = 0.7
    min_words: int = 5
    # duplicate filter: "all" drops a question equal to any seed, earlier kept or this iteration's kept
    # question (ours); "iteration" only to one kept earlier in this iteration (the authors')
    dedup: Literal["all", "iteration"] = "all"
    lr_decay: float = 0.5  # step 5's learning rate is sft.lr * lr_decay^(t - 1) at iteration t
    # step 5's trainer settings; the run sets lr (decayed), seed (per iteration) and dtype (the model's)
    sft: TrainConfig = TrainConfig(batch_size=32, grad_accum=1)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    batch_size: int | None = None  # generation batch (None: from a memory budget)
    seed: int = 0
    # 'data=N,fsdp=N,tensor=N' for SFT (over sft.mesh), generation and the lm embedder; None: one device (generation),
    # every device on fsdp (SFT)
    mesh: str | None = None

    @property
    def k_icl(self) -> int:
        return self.demos if self.icl_demos is None else self.icl_demos

    def __post_init__(self) -> None:
        _check("IsaraConfig", self, [
            ("iterations", self.iterations >= 1, "must be >= 1"), ("generate", self.generate >= 1, "must be >= 1"),
            ("demos", self.demos >= 1, "must be >= 1"), ("context_budget", self.context_budget >= 1, "must be >= 1"),
            ("lm_layers", 0 < self.lm_layers <= 1, "must be in (0, 1]"),
            ("icl_demos", self.icl_demos is None or self.icl_demos >= 1, "must be >= 1"),
            ("answer_demos", self.answer_demos in ("knn", "random"), "must be knn or random"),
            ("dedup", self.dedup in ("all", "iteration"), "must be all or iteration"),
            ("eval_max_new_tokens", self.eval_max_new_tokens >= 1, "must be >= 1"),
            ("batch_size", self.batch_size is None or self.batch_size >= 1, "must be >= 1"),
            ("rouge_threshold", 0 <= self.rouge_threshold <= 1, "must be in [0, 1]"),
            ("min_words", self.min_words >= 0, "must be >= 0"), ("lr_decay", self.lr_decay > 0, "must be > 0")])
