"""The settings of a run: plain frozen dataclasses, validated on construction (no JAX import: the CLI
builds its flags from them). `TrainConfig` is the trainer's (and `selfalign finetune`'s) and the `sft`
section of an `IsaraConfig`; presets in configs/*.json use the same field names."""

from __future__ import annotations

import dataclasses
from typing import Literal

from selfalign_jax.errors import UserError

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # the projections LoRA can adapt

# the `selfalign` command line being run (set by cli.main; None when a command is called from Python):
# which flags were given, so a preset can be overridden even by a value equal to the built-in default
COMMAND_LINE: list[str] | None = None


class SettingError(UserError):
    """A setting out of range: `field` of the settings class `owner` holds `value`, which breaks `rule`
    ("must be >= 1"). Its message names the bare flag (`--grad-accum must be >= 1`); `as_typed` names the
    flag as the command line spelled it (`--sft.grad-accum` in `selfalign run`); a preset names the field."""

    def __init__(self, owner: str, field: str, value, rule: str):
        self.owner, self.field, self.value, self.rule = owner, field, value, rule
        super().__init__(f"--{field.replace('_', '-')} {rule}")

    def as_typed(self, argv) -> UserError:
        """The error naming the flag(s) of `argv` that set this field (itself when none did)."""
        leaf = self.field.replace("_", "-")
        flags = {f"--{pre}{leaf}" for pre in _FLAG_PREFIXES[self.owner]}
        typed = []  # (flag, the value typed)
        for i, a in enumerate(argv or ()):
            name, eq, val = a.partition("=")
            if name in flags:
                typed.append((name, val if eq else (argv[i + 1] if i + 1 < len(argv) else "")))
        same = [f for f, v in typed if _same_value(v, self.value)]
        names = list(dict.fromkeys(f for f, _ in typed)) if len(same) != 1 else same
        return UserError(f"{' or '.join(names)} {self.rule}") if names else self


def _same_value(typed: str, value) -> bool:
    try:
        return float(typed) == float(value)
    except (TypeError, ValueError):
        return typed == str(value)


def _check(owner: str, obj, rules) -> None:
    """Raise SettingError for the first (field, ok, rule) that is not ok."""
    for field, ok, rule in rules:
        if not ok:
            raise SettingError(owner, field, getattr(obj, field), rule)


# settings that change how a run is laid out or checkpointed, not its results (up to float summation
# order): a run or a fine-tune resumes across them
RESULT_NEUTRAL = frozenset({"checkpoint_every", "keep_checkpoints", "mesh", "remat", "loss_chunk", "streams",
                            "packing"})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """SFT hyper-parameters. Defaults follow the ISARA reference (AdamW 0.9/0.95, no weight decay,
    cosine with 3% warm-up, effective batch 32, 1 epoch, lr 2e-5)."""

    lr: float = 2e-5  # peak learning rate (LoRA usually wants ~1e-4)
    b1: float = 0.9  # AdamW betas and epsilon
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0  # applied to matrices only (not norms / biases)
    warmup_ratio: float = 0.03  # warm-up steps = floor(ratio * total steps), as the authors' safe-rlhf
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # the decay after warm-up
    clip_norm: float | None = 1.0  # global gradient-norm clip; None/0 = off
    batch_size: int = 8  # rows per micro-batch (global, over all devices)
    grad_accum: int = 4  # micro-batches per optimizer step: effective batch = batch_size * grad_accum
    epochs: int = 1  # passes over the data
    max_length: int = 512  # model inputs per example (prompt + answer + EOS is cut to max_length + 1)
    bucket: int = 64  # sequence lengths are padded to a multiple of this (bounded compiles)
    # batch composition: False = uniformly random rows per step (the authors' sampler); True = rows of
    # similar length per step (less padding, faster; biases which examples share a step)
    length_grouping: bool = False
    # several whole examples per row (attention kept within each), in the fewest rows and length bucket:
    # the same token-normalised gradient with far less padding; loss_norm "sequence" keeps one per row
    packing: bool = True
    # "token": mean over every answer token of the step; "sequence" (the authors' safe-rlhf): each row's
    # loss summed over its answer tokens / the micro-batch's padded length, then the mean over the
    # micro-batch's rows, then over the step's micro-batches
    loss_norm: Literal["token", "sequence"] = "token"
    lora_rank: int = 0  # 0 = full fine-tuning
    lora_alpha: float = 16.0  # LoRA scale = alpha / rank
    lora_targets: tuple[str, ...] = LORA_TARGETS  # the projections that get adapters
    remat: bool = False  # rematerialise each layer in the backward pass
    loss_chunk: int = 512  # tokens per chunk of the fused LM-head + cross-entropy (0: plain, full logits)
    streams: int = 0  # row slices of a micro-batch run side by side in one graph (CPU cores); 0: auto (4 on one CPU)
    dtype: Literal["auto", "float32", "bfloat16"] = "float32"  # compute (masters, Adam stay fp32); auto: by backend
    seed: int = 0  # data order and LoRA init
    checkpoint_every: int = 0  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2  # train checkpoints kept
    mesh: str | None = None  # 'data=N,fsdp=N,tensor=N'; None: every device on fsdp

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accum

    def __post_init__(self) -> None:
        bad = [t for t in self.lora_targets if t not in LORA_TARGETS]
        _check("TrainConfig", self, [
            ("lr", self.lr > 0, "must be > 0"), ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("grad_accum", self.grad_accum >= 1, "must be >= 1"), ("epochs", self.epochs >= 1, "must be >= 1"),
            ("max_length", self.max_length >= 2, "must be >= 2"), ("bucket", self.bucket >= 1, "must be >= 1"),
            ("warmup_ratio", 0 <= self.warmup_ratio < 1, "must be in [0, 1)"),
            ("lora_rank", self.lora_rank >= 0, "must be >= 0"),
            ("schedule", self.schedule in ("cosine", "linear", "constant"), "must be cosine, linear or constant"),
            ("loss_norm", self.loss_norm in ("token", "sequence"), "must be token or sequence"),
            ("dtype", self.dtype in ("auto", "float32", "bfloat16"), "must be auto, float32 or bfloat16"),
            ("b1", 0 <= self.b1 < 1, "must be in [0, 1)"), ("b2", 0 <= self.b2 < 1, "must be in [0, 1)"),
            ("checkpoint_every", self.checkpoint_every >= 0, "must be >= 0"),
            ("streams", self.streams >= 0, "must be >= 0"),
            ("lora_targets", not bad, f"has an unknown entry {bad[0] if bad else ''!r} (choose from "
                                      f"{', '.join(LORA_TARGETS)})")])

    def fingerprint_fields(self) -> dict:
        """The settings that determine the trajectory (a resumed run must match them)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in RESULT_NEUTRAL}


# `selfalign finetune`'s (and `api.finetune`'s) defaults where they differ from the library's: dtype from
# the backend, a checkpoint every 200 steps
FINETUNE_DEFAULT = TrainConfig(dtype="auto", checkpoint_every=200)


@dataclasses.dataclass(frozen=True)
class GenConfig:
    """Sampling settings of one generation step (temperature 0 = greedy). num_beams > 1: beam search, or
    beam-sample with do_sample (transformers' semantics, selfalign_jax/beam.py)."""

    max_new_tokens: int = 100
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram: int = 0
    num_beams: int = 1
    do_sample: bool = True  # with num_beams > 1: beam-sample (True) or beam search (False)
    length_penalty: float = 1.0  # beams: a hypothesis scores sum log-prob / length ** length_penalty
    early_stopping: bool | Literal["never"] = False  # beams: transformers' early_stopping
    exponential_decay_length_penalty: tuple[int, float] | None = None  # beams: (start, factor) raises EOS after start
    penalize_prompt: bool = True  # False: repetition penalty and n-gram ban over the generated tokens only
    continuous: bool = True  # num_beams 1: continuous batching (a finished row's slot takes the next prompt)

    def __post_init__(self) -> None:
        _check("GenConfig", self, [
            ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
            ("temperature", self.temperature >= 0, "must be >= 0"), ("top_k", self.top_k >= 0, "must be >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0"),
            ("no_repeat_ngram", self.no_repeat_ngram >= 0, "must be >= 0")])


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


# where each settings class's fields appear on a command line: IsaraConfig's at the top (`selfalign run
# --iterations`), TrainConfig's at the top (`finetune --lr`) or under sft (`run --sft.lr`), GenConfig's
# under question-gen / answer-gen
_FLAG_PREFIXES = {"IsaraConfig": ("",), "TrainConfig": ("", "sft."), "GenConfig": ("question-gen.", "answer-gen.")}
