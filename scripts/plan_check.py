"""`selfalign plan`'s prediction for one SFT step (or, with --generate, one sampler prefill) against what XLA
allocates for it.

Builds a model config from numbers (no weights are read), compiles the trainer's step for a random batch,
and prints per device: the plan's state (params + LoRA + AdamW) and temporaries (gradients + compute copy +
activations + loss) next to XLA's memory_analysis (arguments / temporaries) and, on an accelerator, the
peak bytes in use after one real step (`device.memory_stats()`).

    python scripts/plan_check.py --preset 1b --batch 8 --length 512 --dtype bfloat16 [--remat] [--lora 16]
    python scripts/plan_check.py --preset smollm2 --batch 4 --length 256 [--remat]   # the real demo's SFT step
    python scripts/plan_check.py --layers 4 --hidden 512 ...       # any shape
    python scripts/plan_check.py --preset 2b --batch 4 --length 2000 --generate 200   # the prefill's working memory

On the CPU the step only compiles unless --run is given (a 1B step in fp32 takes minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from selfalign_jax.core import mesh as MS
from selfalign_jax.core import model as M
from selfalign_jax.core import plan as P
from selfalign_jax.core.generate import cache as gen_cache, sizing  # noqa: E402
from selfalign_jax.core import train as T

PRESETS = {  # published shapes
    "1b": {"vocab_size": 128256, "hidden": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "head_dim": 64,
           "intermediate": 8192, "tied": True},
    "2b": {"family": "gemma2", "vocab_size": 256000, "hidden": 2304, "n_layers": 26, "n_heads": 8, "n_kv_heads": 4,
           "head_dim": 256, "intermediate": 9216, "tied": True},  # Gemma-2-2B-like
    "smollm2": {"vocab_size": 49152, "hidden": 576, "n_layers": 30, "n_heads": 9, "n_kv_heads": 3, "head_dim": 64,
                "intermediate": 1536, "tied": True},  # SmolLM2-135M, the real demos' model
    "tiny": {"vocab_size": 8192, "hidden": 512, "n_layers": 4, "n_heads": 8, "n_kv_heads": 4, "head_dim": 64,
             "intermediate": 1536},
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    for k in ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab"):
        ap.add_argument(f"--{k.replace('_', '-')}", type=int)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--remat", action="store_true")
    ap.add_argument("--lora", type=int, default=0)
    ap.add_argument("--mesh", default=None)
    ap.add_argument("--run", action="store_true", help="also run one step (default on accelerators)")
    ap.add_argument("--generate", type=int, default=0, metavar="NEW",
                    help="check the sampler's prefill of --batch prompts of --length tokens with NEW new-token slots")
    a = ap.parse_args()
    shape = dict(PRESETS[a.preset])
    for k, f in (("layers", "n_layers"), ("hidden", "hidden"), ("heads", "n_heads"), ("kv_heads", "n_kv_heads"),
                 ("head_dim", "head_dim"), ("intermediate", "intermediate"), ("vocab", "vocab_size")):
        if getattr(a, k) is not None:
            shape[f] = getattr(a, k)
    cfg = M.Config(family=shape.pop("family", "llama"), max_pos=max(4096, a.length + a.generate + 1), **shape)
    if a.generate:
        return check_prefill(dataclasses.replace(cfg, dtype=a.dtype), a.batch, a.length, a.generate)
    mesh = MS.make_mesh(a.mesh)
    sizes = dict(mesh.shape)
    tc = T.TrainConfig(batch_size=a.batch, grad_accum=1, max_length=a.length, remat=a.remat, lora_rank=a.lora,
                       dtype=a.dtype, streams=1)
    tr = T.Trainer(cfg, tc, 10, mesh=mesh)
    pb = P.train_bytes(cfg, P.TrainSettings(batch_size=a.batch, max_length=a.length, dtype=a.dtype,
                                            remat=a.remat, lora_rank=a.lora), sizes)
    rows = tr.micro_rows
    batch = {"tokens": np.random.default_rng(0).integers(0, cfg.vocab_size, (1, rows, a.length), dtype=np.int32),
             "pos": np.broadcast_to(np.arange(a.length, dtype=np.int32), (1, rows, a.length)).copy(),
             "targets": np.random.default_rng(1).integers(0, cfg.vocab_size, (1, rows, a.length), dtype=np.int32),
             "weights": np.ones((1, rows, a.length), np.float32)}
    abstract = {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype, sharding=tr.batch_sh[k]) for k, v in batch.items()}
    frozen_abs = None
    if a.lora:
        frozen_abs = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, jnp.dtype(a.dtype), sharding=sh),
                                  M.param_specs(cfg), tr.frozen_sh, is_leaf=M.is_spec)
    # the micro-batch's gradient (the step's largest temporaries) with the train state held beside it
    ma = tr.fns.grads.lower(tr.abstract_state().params, frozen_abs, abstract).compile().memory_analysis()
    mib = 1 << 20
    args = pb["params"] + pb["lora"]
    temp = pb["gradients"] + pb["work"] + pb["activations"] + pb["loss"]
    xla_temp = ma.temp_size_in_bytes + ma.output_size_in_bytes  # the gradient is the output
    dev = jax.devices()[0]
    print(f"{dev.platform} {dev.device_kind}, mesh {sizes}, {cfg.n_layers} layers, D={cfg.hidden}, V={cfg.vocab_size}, "
          f"batch {a.batch} x {a.length}, {a.dtype}, remat {a.remat}, LoRA {a.lora}")
    print(f"  arguments (trainable, with the frozen base under LoRA): plan {args / mib:.1f} MiB, "
          f"XLA {ma.argument_size_in_bytes / mib:.1f} MiB")
    print(f"  gradient + temporaries of one micro-batch: plan {temp / mib:.1f} MiB, XLA {xla_temp / mib:.1f} MiB "
          f"(ratio {xla_temp / max(temp, 1):.2f})")
    if a.run or dev.platform != "cpu":
        params = jax.jit(lambda k: M.init_params(dataclasses.replace(cfg, dtype="float32"), k),
                         out_shardings=tr.param_sh)(jax.random.PRNGKey(0))
        st, frozen = tr.init_state(params, owned=True)
        st, metrics = tr.step(st, frozen, batch)
        jax.block_until_ready(metrics)
        stats = dev.memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
        if peak is not None:
            print(f"  peak in use after one step: {peak / mib:.1f} MiB; plan total {pb['total'] / mib:.1f} MiB "
                  f"(ratio {peak / pb['total']:.2f})")
        else:
            print(f"  (no memory_stats on {dev.platform}); loss {float(metrics['loss']):.3f}")
    print("  plan parts (MiB): " + ", ".join(f"{k} {v / mib:.1f}" for k, v in pb.items()))
    assert math.isfinite(pb["total"])


def check_prefill(cfg: M.Config, rows: int, prompt_len: int, new: int) -> None:
    """plan.gen_bytes' working memory against XLA's temporaries of the sampler's prefill (one device)."""
    gb = P.gen_bytes(cfg, P.GenSettings(batch_size=rows, prompt_len=prompt_len, max_new_tokens=new, dtype=cfg.dtype))
    Tp, Tn = sizing.cache_lengths(prompt_len, new)
    params = jax.eval_shape(lambda: M.init_params(cfg, jax.random.key(0)))
    cache = jax.eval_shape(lambda: M.init_cache(cfg, rows, Tp + Tn))
    tokens = jax.ShapeDtypeStruct((rows, Tp), jnp.int32)
    f = jax.jit(gen_cache.prefill_cache, static_argnames="cfg", donate_argnames="cache")
    ma = f.lower(params, cfg=cfg, tokens_BxT=tokens, pos_BxT=tokens, cache=cache).compile().memory_analysis()
    mib = 1 << 20
    print(f"{jax.devices()[0].platform}: prefill of {rows} x {Tp} prompt slots (+{Tn} new), {cfg.n_layers} layers, "
          f"{cfg.n_heads} heads of {cfg.head_dim}, {cfg.dtype}")
    print(f"  KV cache: plan {gb['kv_cache'] / mib:.1f} MiB; working memory: plan {gb['work'] / mib:.1f} MiB, "
          f"XLA temporaries {ma.temp_size_in_bytes / mib:.1f} MiB (ratio {ma.temp_size_in_bytes / gb['work']:.2f})")
    if jax.default_backend() == "cpu" and cfg.dtype != "float32":
        print("  (XLA:CPU keeps fp32 copies of bf16 weights for its matmuls: its temporaries are not an accelerator's)")


if __name__ == "__main__":
    main()
