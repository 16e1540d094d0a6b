"""Decode benchmark on one accelerator: our jitted generate vs transformers `generate` (torch) on the same random
weights, the same device, at several batch sizes.

Models (`--models`, random Llama-shaped weights written by transformers, loaded by `checkpoint.load`):
  bench: the sampler benchmark's (8 layers, hidden 512, 8 heads, 2 KV heads, intermediate 1408, vocab 32000);
  1b:    Llama-3.2-1B's shape (16 layers, hidden 2048, 32 heads, 8 KV heads, intermediate 8192, vocab 128256, tied);
  toy:   2 layers, hidden 64 (for `--cpu` runs of scripts/device_check.sh).
Each batch size B of `--batches` gets B random prompts of `--prompt` tokens and greedy decoding of exactly `--new`
tokens (EOS ignored), in `--dtype`, static batching. Timed (best of `--reps` after a warm-up that compiles):
  t1 = generate(1 new token) (the prefill and one step), tN = generate(`--new` tokens);
  prefill_tok_s = B * prompt / t1; decode_tok_s = B * (new - 1) / (tN - t1);
  hbm_frac = bytes a decode step reads (every matmul weight and the embedding row, the KV cache's S slots of every
    layer, S = the padded prompt + new-token buckets) * (new - 1) / (tN - t1) / the measured read bandwidth, where
    the bandwidth is a jitted sum over a 1 GiB array (best of 5; on a CPU run 256 MiB): the fraction of the memory
    bandwidth a decode step reaches.
transformers: `generate(max_new_tokens=n, min_new_tokens=n)` on the same weights (torch, `--torch-device`, sdpa
attention, the same dtype), timed the same way (ref_*); ratio = ours / ref.
Last line: JSON {"models": {name: {"B": {...}}}, "mem_read_gbs": ..., ...}.

    python scripts/bench_decode.py --models bench,1b --batches 1,16,64,256 --dtype bfloat16 --torch-device cuda
    python scripts/bench_decode.py --models toy --batches 1,4 --prompt 16 --new 8 --dtype float32   # CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from selfalign_jax.core.settings import GenConfig

BASE = dict(max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0, rms_norm_eps=1e-5)
MODELS = {
    "bench": dict(vocab_size=32000, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, intermediate_size=1408, tie_word_embeddings=False),
    "1b": dict(vocab_size=128256, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=8192, tie_word_embeddings=True, rope_theta=500000.0),
    "toy": dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, tie_word_embeddings=False),
}


class IdTokenizer:
    """Stand-in tokenizer for token-id prompts (the text is not looked at)."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


def best_time(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def mem_read_rate(mib: int, reps: int = 5) -> float:
    """Bytes/s of a jitted sum over a mib MiB fp32 array (streaming reads), best of reps."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((mib << 18,), jnp.float32)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()
    return (mib << 20) / best_time(lambda: f(x).block_until_ready(), reps)


def step_bytes(cfg, params, batch: int, cache_slots: int) -> int:
    """Bytes one decode step reads: every weight but the embedding table (one row per token of it), and the cache."""
    import jax

    from selfalign_jax.core import model as M

    total = sum(x.nbytes for x in jax.tree.leaves(params))
    emb = sum(x.nbytes for x in jax.tree.leaves(params.embed))
    # tied: the LM head reads the whole table; untied: the lookup reads one row per token
    weights = total if params.lm_head is None else total - emb + batch * (emb // cfg.vocab_size)
    return weights + batch * M.cache_row_bytes(cfg, cache_slots)


def decode_rates(B: int, new: int, t1: float, tn: float, nbytes: int = 0, bw: float = 0.0) -> dict:
    """decode tok/s, ms per step and the bandwidth fraction from t1 / tN; None where tN - t1 is under 5% of tN
    (the decode steps are lost in the call's noise: a toy run)."""
    dec = tn - t1
    if dec < 0.05 * tn:
        return dict(decode_tok_s=None, step_ms=None, hbm_frac=None)
    out = dict(decode_tok_s=round(B * (new - 1) / dec, 1), step_ms=round(dec / (new - 1) * 1e3, 3))
    if bw:
        out["hbm_frac"] = round(nbytes * (new - 1) / dec / bw, 3)
    return out


def build(name: str, dtype: str, d: Path, torch_device: str):
    import torch
    import transformers

    torch.manual_seed(0)
    conf = transformers.LlamaConfig(**{**BASE, **MODELS[name]})
    with torch.device(torch_device):
        hf = transformers.LlamaForCausalLM(conf)
    hf = hf.to(getattr(torch, dtype)).eval()
    hf.save_pretrained(str(d), safe_serialization=True)
    return hf


def ours_side(d: Path, dtype: str, batches, prompt: int, new: int, reps: int, bw: float) -> dict:
    from selfalign_jax.core import checkpoint
    from selfalign_jax.core.generate import cache, generate

    cfg, params = checkpoint.load(d, dtype=dtype)
    tok, out = IdTokenizer(), {}
    slots = cache.prompt_bucket(prompt - 1) + cache.new_tokens_bucket(new)
    for B in batches:
        prompts = np.random.default_rng(B).integers(3, cfg.vocab_size, (B, prompt)).tolist()

        def run(n):
            res = generate(params, cfg, tok, prompts, GenConfig(max_new_tokens=n, temperature=0.0, continuous=False),
                           stop=(), ignore_eos=True, batch_size=B)
            assert all(len(r.token_ids) == n for r in res)

        t0 = time.perf_counter()
        run(1)
        run(new)
        compile_s = time.perf_counter() - t0
        t1, tn = best_time(lambda: run(1), reps), best_time(lambda: run(new), reps)
        nbytes = step_bytes(cfg, params, B, slots)
        out[str(B)] = dict(prefill_tok_s=round(B * prompt / t1, 1), step_mib=round(nbytes / 2**20, 1),
                           first_calls_s=round(compile_s, 2), t1_s=round(t1, 4), tn_s=round(tn, 4),
                           **decode_rates(B, new, t1, tn, nbytes, bw))
        print(f"  ours B={B}: {out[str(B)]}", flush=True)
    return out


def ref_side(hf, batches, prompt: int, new: int, reps: int, device: str, vocab: int) -> dict:
    import torch

    out = {}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for B in batches:
        ids = torch.tensor(np.random.default_rng(B).integers(3, vocab, (B, prompt)), device=device)
        mask = torch.ones_like(ids)

        def run(n):
            with torch.no_grad():
                hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                            pad_token_id=0)
            sync()

        run(1)
        run(new)
        t1, tn = best_time(lambda: run(1), reps), best_time(lambda: run(new), reps)
        out[str(B)] = dict(prefill_tok_s=round(B * prompt / t1, 1), t1_s=round(t1, 4), tn_s=round(tn, 4),
                           **decode_rates(B, new, t1, tn))
        print(f"  transformers B={B}: {out[str(B)]}", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="bench,1b", help=f"comma list of {sorted(MODELS)}")
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--torch-device", default="cuda")
    ap.add_argument("--skip-ref", action="store_true")
    ap.add_argument("--bw-mib", type=int, default=1024, help="size of the bandwidth probe's array")
    args = ap.parse_args()
    import jax
    import torch
    import transformers

    batches = [int(b) for b in args.batches.split(",")]
    dev = jax.devices()[0]
    bw = mem_read_rate(args.bw_mib)
    print(f"jax {jax.__version__} on {dev.platform} {dev.device_kind}; torch {torch.__version__} on "
          f"{args.torch_device}; transformers {transformers.__version__}; read bandwidth {bw / 1e9:.0f} GB/s",
          flush=True)
    res = dict(device=f"{dev.platform}:{dev.device_kind}", mem_read_gbs=round(bw / 1e9, 1), dtype=args.dtype,
               prompt=args.prompt, new=args.new, batches=batches, models={})
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory(prefix=f"bench_decode_{name}_") as d:
            hf = build(name, args.dtype, Path(d), args.torch_device)
            n_params = sum(p.numel() for p in hf.parameters())
            print(f"{name}: {n_params / 1e6:.0f}M parameters", flush=True)
            ours = ours_side(Path(d), args.dtype, batches, args.prompt, args.new, args.reps, bw)
            m = dict(params_m=round(n_params / 1e6, 1), ours=ours)
            if not args.skip_ref:
                ref = ref_side(hf, batches, args.prompt, args.new, args.reps, args.torch_device,
                               MODELS[name]["vocab_size"])
                m["ref"] = ref
                m["decode_ratio"] = {b: round(ours[b]["decode_tok_s"] / ref[b]["decode_tok_s"], 2)
                                     if ours[b]["decode_tok_s"] and ref[b]["decode_tok_s"] else None for b in ours}
            del hf
            res["models"][name] = m
    print(json.dumps(res))


if __name__ == "__main__":
    main()
