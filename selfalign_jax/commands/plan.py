"""`selfalign plan`: bytes per device of fine-tuning and generation for a model, mesh and HBM size."""

from __future__ import annotations

from pathlib import Path
from typing import Literal


def main(
    model: Path,
    mesh: str | None = None,
    devices: int | None = None,
    hbm_gib: float | None = None,
    config: Path | None = None,
    batch_size: int | None = None,
    grad_accum: int | None = None,
    max_length: int | None = None,
    lora_rank: int | None = None,
    remat: bool | None = None,
    dtype: Literal["auto", "float32", "bfloat16"] | None = None,
    gen_batch: int | None = None,
    prompt_len: int | None = None,
    max_new_tokens: int | None = None,
    json: bool = False,
) -> None:
    """Predict the memory per device of an SFT step and of generation before anything compiles: parameters,
    optimizer state, gradients, activations (with and without remat), LoRA adapters, KV cache; the largest
    micro-batch and generation batch that fit; a suggested mesh. Exits 2 with one line naming what does not
    fit and the smallest change that would. The last line printed is the plan as JSON.

    Args:
        model: Hugging Face model directory (only config.json is read).
        mesh: device mesh, e.g. data=2,fsdp=4,tensor=1 (default: every device on fsdp).
        devices: device count to plan for (default: the mesh's product, else the devices JAX sees).
        hbm_gib: memory per device in GiB (default: the accelerator's limit; 16 on a CPU).
        config: run preset (e.g. configs/tpu-v5e-8.json): SFT batch / length / LoRA / remat, generation
            batch and lengths, dtype; the flags below override it.
        batch_size: SFT rows per micro-batch over all devices (default: the preset's sft.batch_size /
            sft.grad_accum, else 8).
        grad_accum: micro-batches per optimizer step (only the gradient accumulator depends on it).
        max_length: SFT tokens per row (default 512).
        lora_rank: LoRA rank (0 = full fine-tuning).
        remat: recompute each layer in the backward pass.
        dtype: compute dtype; auto = float32 on CPU, bfloat16 on accelerators (or when --hbm-gib is given).
        gen_batch: generation batch (default: the preset's batch_size, else 32).
        prompt_len: prompt tokens (default: the preset's context_budget, else 2000).
        max_new_tokens: new tokens (default: the preset's longest generation, else 200).
        json: print only the JSON line.
    """
    from selfalign_jax import api

    api.plan(model, mesh, devices, hbm_gib, config, batch_size, grad_accum, max_length, lora_rank, remat, dtype,
             gen_batch, prompt_len, max_new_tokens, json)
