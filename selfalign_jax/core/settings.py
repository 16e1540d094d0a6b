"""The settings of the core: the trainer's `TrainConfig` and a generation step's `GenConfig`, plain frozen
dataclasses validated on construction (no JAX import: the CLI builds its flags from them). A setting out of
range raises `SettingError`, which names the flag or preset field."""

from __future__ import annotations

import dataclasses
from typing import Literal

from selfalign_jax.core.errors import UserError

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # the projections LoRA can adapt

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
                            "packing", "auto_fit", "memory_gib"})


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
    # the trainer runs each step in micro-batches of fewer rows (grad_accum raised by the same factor: with
    # loss_norm "token" the same gradient up to float summation order) and turns remat on where the memory plan
    # (core/plan.py) says the step needs it, and on a CPU takes at most CPU_MICRO_ROWS rows per micro-batch
    # (core/train.py fit_memory); the command line turns it off when --batch-size, --grad-accum or --remat is given
    auto_fit: bool = True
    memory_gib: float = 0.0  # auto_fit's budget per device in GiB; 0: the memory at hand (HBM, or host RAM)
    loss_chunk: int = 512  # tokens per chunk of the fused LM-head + cross-entropy (0: plain, full logits)
    streams: int = 1  # row slices of a micro-batch run side by side in one graph (each a copy of the model in it)
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
            ("streams", self.streams >= 1, "must be >= 1"), ("memory_gib", self.memory_gib >= 0, "must be >= 0"),
            ("lora_targets", not bad, f"has an unknown entry {bad[0] if bad else ''!r} (choose from "
                                      f"{', '.join(LORA_TARGETS)})")])

    def fingerprint_fields(self) -> dict:
        """The settings that determine the trajectory (a resumed run must match them)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in RESULT_NEUTRAL}


# the TrainConfig fields whose values a command line fixes for auto_fit: given, the trainer runs them as they are
SPLIT_FIELDS = ("batch_size", "grad_accum", "remat")


def pin_split(tcfg: TrainConfig, given) -> TrainConfig:
    """tcfg with auto_fit off when `given` (TrainConfig field names a command line set) names a SPLIT_FIELDS
    field; unchanged otherwise."""
    return dataclasses.replace(tcfg, auto_fit=False) if set(given or ()) & set(SPLIT_FIELDS) else tcfg


def given_train_fields(argv, prefix: str = "") -> set[str]:
    """The TrainConfig fields a command line names (`--grad-accum 2`, `--sft.remat`, `--no-remat`), flags
    spelled with `prefix` ("sft." in `selfalign run`); empty for no command line."""
    names, got = {f.name for f in dataclasses.fields(TrainConfig)}, set()
    for a in argv or ():
        if not a.startswith("--" + prefix):
            continue
        name = a[2 + len(prefix):].split("=", 1)[0].replace("-", "_")
        got |= {c for c in (name, name[3:] if name.startswith("no_") else "") if c in names}
    return got


# `selfalign finetune`'s (and `api.finetune`'s) defaults where they differ from the library's: dtype from
# the backend, a checkpoint every 200 steps
FINETUNE_DEFAULT = TrainConfig(dtype="auto", checkpoint_every=200)


@dataclasses.dataclass(frozen=True)
class GenConfig:
    """Sampling settings of one generation step (temperature 0 = greedy). num_beams > 1: beam search, or
    beam-sample with do_sample (transformers' semantics, selfalign_jax/core/generate/beam.py)."""

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


# `selfalign generate`'s (and `api.generate`'s) settings where they differ from GenConfig's: greedy, static batches,
# beam search (not beam-sample) when --num-beams > 1
GENERATE_DEFAULT = GenConfig(max_new_tokens=128, temperature=0.0, do_sample=False, continuous=False)


# where each settings class's fields appear on a command line: IsaraConfig's at the top (`selfalign run
# --iterations`), TrainConfig's at the top (`finetune --lr`) or under sft (`run --sft.lr`), GenConfig's
# under question-gen / answer-gen
_FLAG_PREFIXES = {"IsaraConfig": ("",), "TrainConfig": ("", "sft."), "GenConfig": ("question-gen.", "answer-gen.")}
