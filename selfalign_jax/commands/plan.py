"""`selfalign plan`: bytes per device of fine-tuning and generation for a model, mesh and HBM size."""

from __future__ import annotations

import json as _json
import sys
from pathlib import Path
from typing import Literal


def _hbm_default() -> tuple[float, str]:
    """The first device's memory limit (accelerators), else 16 GiB (a TPU v5e chip) as an assumption."""
    import jax

    dev = jax.devices()[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return stats["bytes_limit"] / (1 << 30), f"{dev.device_kind} memory limit"
    return 16.0, "assumed (a TPU v5e chip; pass --hbm-gib)"


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
    import jax

    from selfalign_jax import checkpoint, rundir
    from selfalign_jax import mesh as MS
    from selfalign_jax import plan as P
    from selfalign_jax.errors import UserError

    raw = checkpoint.read_config(model)
    pre = rundir.load_config(config) if config is not None else None
    s = pre.sft if pre else None
    hbm_note = "given"
    if hbm_gib is None:
        hbm_gib, hbm_note = _hbm_default()
    elif hbm_gib <= 0:
        raise UserError("--hbm-gib must be > 0")
    if dtype is None:
        dtype = pre.dtype if pre else "auto"
    if dtype == "auto":
        cpu = jax.default_backend() == "cpu"
        dtype = "float32" if cpu and hbm_note != "given" else "bfloat16"
    if devices is None and mesh and "-1" not in mesh:
        devices = _product(mesh)
    n = devices or jax.device_count()
    if n < 1:
        raise UserError("--devices must be >= 1")
    sizes = MS.parse_mesh(mesh, n)
    accum = grad_accum or (s.grad_accum if s else 1)
    ts = P.TrainSettings(
        batch_size=batch_size or (max(1, s.batch_size // s.grad_accum) if s else 8),
        max_length=max_length or (s.max_length if s else 512), dtype=dtype,
        lora_rank=lora_rank if lora_rank is not None else (s.lora_rank if s else 0),
        remat=remat if remat is not None else (s.remat if s else False), grad_accum=accum)
    new = max_new_tokens or (max(pre.question_gen.max_new_tokens, pre.answer_gen.max_new_tokens,
                                 pre.eval_max_new_tokens) if pre else 200)
    gs = P.GenSettings(batch_size=gen_batch or (pre.batch_size if pre and pre.batch_size else 32),
                       prompt_len=prompt_len or (pre.context_budget if pre else 2000), max_new_tokens=new,
                       dtype=dtype)
    for name, v in (("--batch-size", ts.batch_size), ("--max-length", ts.max_length), ("--gen-batch", gs.batch_size),
                    ("--prompt-len", gs.prompt_len), ("--max-new-tokens", gs.max_new_tokens),
                    ("--grad-accum", ts.grad_accum)):
        if v < 1:
            raise UserError(f"{name} must be >= 1")
    if ts.lora_rank < 0:
        raise UserError("--lora-rank must be >= 0")
    cfg = checkpoint.config_from_hf(raw, dtype)
    p = P.plan(cfg, sizes, hbm_gib, ts, gs)
    p["hbm_source"] = hbm_note
    if not json:
        print(P.table(p))
    print(_json.dumps(p))
    if not p["fits"]:
        print(f"selfalign: error: {p['advice'][0]}", file=sys.stderr)
        sys.exit(2)


def _product(mesh: str) -> int:
    """data*fsdp*tensor of a mesh string with no -1 axis (bad entries are reported by parse_mesh)."""
    n = 1
    for part in mesh.split(","):
        _, _, v = part.partition("=")
        try:
            n *= max(1, int(v))
        except ValueError:
            return 1
    return n
