"""`selfalign finetune`: supervised fine-tuning on {question, answer} JSONL, exported as an HF directory."""

from pathlib import Path
from typing import Annotated, Literal

import tyro

from selfalign_jax.config import TrainConfig

# the command's defaults where they differ from the library's: dtype from the backend, a checkpoint
# every 200 steps
CLI_DEFAULT = TrainConfig(dtype="auto", checkpoint_every=200)


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
    cfg: Annotated[TrainConfig, tyro.conf.arg(name="")] = CLI_DEFAULT,
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
    """
    # jax and the trainer are imported here, not at the top: `selfalign --help` stays fast
    from selfalign_jax import mesh as meshlib

    meshlib.initialize_distributed(True if distributed else None)

    import dataclasses

    import jax

    from selfalign_jax import checkpoint, fileio, train
    from selfalign_jax.data import read_pairs
    from selfalign_jax.template import Template

    fileio.check_output(out, inputs={"--model": model, "--data": data}, directory=True, overwrite=overwrite)
    if checkpoint_dir is not None:
        fileio.check_output(checkpoint_dir, "--checkpoint-dir", inputs={"--model": model, "--out": out},
                            directory=True, overwrite=True)
    checkpoint.read_config(model)  # a missing or wrong --model directory is named before anything else
    pairs = read_pairs(data)
    tok = checkpoint.load_tokenizer(model)
    tcfg = dataclasses.replace(cfg, dtype=meshlib.compute_dtype(cfg.dtype))
    mesh_obj = meshlib.make_mesh(tcfg.mesh)
    if jax.process_index() == 0:
        shape = ", ".join(f"{k}={v}" for k, v in mesh_obj.shape.items())
        kind = f"LoRA rank {tcfg.lora_rank}" if tcfg.lora_rank else "full"
        print(f"finetune {model} on {len(pairs)} pairs from {data}: mesh {shape}, effective batch "
              f"{tcfg.effective_batch}, lr {tcfg.lr}, {kind}, {tcfg.dtype}")
    tmpl = Template(kind=template, tokenizer=tok if template == "chat" else None)
    train.finetune(model, pairs, tok, out, tcfg, tmpl, checkpoint_dir=checkpoint_dir, resume=resume, mesh=mesh_obj,
                   export_dtype=None if export_dtype == "auto" else export_dtype, overwrite=overwrite)
    if jax.process_index() == 0:
        print(f"wrote {out}")
