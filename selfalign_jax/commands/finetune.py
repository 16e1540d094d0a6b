"""`selfalign finetune`: supervised fine-tuning on {question, answer} JSONL, exported as an HF directory."""

from pathlib import Path
from typing import Annotated, Literal

import tyro

from selfalign_jax.core.settings import FINETUNE_DEFAULT, TrainConfig, given_train_fields, pin_split


def main(
    model: Path,
    data: Path,
    out: Path,
    template: Literal["plain", "chat"] = "plain",
    checkpoint_dir: Path | None = None,
    resume: bool = True,
    export_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    overwrite: bool = False,
    distributed: bool = False,
    hbm_gib: float | None = None,
    cfg: Annotated[TrainConfig, tyro.conf.arg(name="")] = FINETUNE_DEFAULT,
) -> None:
    """Fine-tune MODEL on the (question, answer) pairs of DATA with the ISARA recipe (loss on answer
    tokens only, AdamW 0.9/0.95, cosine schedule with warm-up) and write the result to OUT.

    The training flags (--lr, --epochs, --batch-size rows per micro-batch over all devices, --grad-accum
    micro-batches per step, --max-length, --warmup-ratio, --weight-decay, --clip-norm, --lora-rank,
    --lora-alpha, --mesh data=N,fsdp=N,tensor=N, --seed, --dtype, --remat, --checkpoint-every, ...) are
    the fields of `TrainConfig`.

    Args:
        model: Hugging Face checkpoint directory (safetensors) to start from.
        data: JSONL file, one {"question": str, "answer": str} object a line.
        out: directory for the fine-tuned HF checkpoint (transformers loads it).
        template: plain (the paper's conversation template) or chat (the tokenizer's chat template).
        checkpoint_dir: Orbax train checkpoints (default OUT.ckpt); a matching run there is resumed.
        resume: resume from checkpoint_dir when it holds this run (else refuse to overwrite it).
        export_dtype: dtype of the exported weights; auto = the source checkpoint's.
        overwrite: replace a non-empty OUT.
        distributed: call jax.distributed.initialize() first (multi-host; also implied by
            JAX_COORDINATOR_ADDRESS).
        hbm_gib: memory per device in GiB for the up-front plan check (default: the accelerator's; none on a CPU).
    """
    from selfalign_jax import api
    from selfalign_jax.app import config

    cfg = pin_split(cfg, given_train_fields(config.COMMAND_LINE))  # --batch-size / --grad-accum / --remat as given
    api.finetune(model, data, out, template, checkpoint_dir, resume, export_dtype, overwrite,
                 distributed=distributed, hbm_gib=hbm_gib, cfg=cfg)
