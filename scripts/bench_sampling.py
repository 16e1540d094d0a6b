"""Benchmark: our jitted sampler vs transformers `generate` (torch, CPU) on the same random weights.

Config (issue 3): Llama, 8 layers, hidden 512, 8 heads, 2 KV heads, intermediate 1408, vocab 32000; batch 32,
prompt 128 tokens, 128 new tokens, greedy, fp32, the same thread count on both sides.

Reported:
  ours_tok_s / ref_tok_s: new tokens per second of a whole generate call (prefill + decode + host work),
    compile excluded (compile_s separately); ratio = ours / ref.
  ours_decode_tok_s / ref_decode_tok_s: the decode part alone (ours timed on the jitted decode loop; the
    reference as generate(128) minus generate(1)).
  roofline_frac: FLOP/s of our decode loop (2 x matmul parameters + attention over the keys each step
    sees, per token) / FLOP/s of a jitted fp32 2048^3 matmul; the decode is timed in chunks of 32 steps,
    each right after a matmul measurement (best of 2), and the median chunk ratio is reported, so both sides
    of the ratio see the same machine load. roofline_frac_cpu: the same with FLOPs per CPU-second on both
    sides (insensitive to other processes on a shared machine).
  matmul_only_frac: the decode's weight matmuls alone (every layer's q, k, v, o, gate, up, down and the LM
    head on the same [in, out] weights at batch 32; no attention, norms or token choice): their FLOPs (2 x
    matmul params per token) / time / matmul peak, timed the same interleaved way. The ceiling XLA:CPU's
    small-batch matmuls put on roofline_frac; decode_vs_matmul_only = roofline_frac / matmul_only_frac.
  mem_read_gbs: the machine's streaming read bandwidth (a jitted sum over a 512 MiB fp32 array, best of 3).
    decode_mem_frac: bytes a decode step reads (every matmul weight, the KV cache's S slots of every layer)
    / step time / mem_read_gbs, the bandwidth fraction (on a GPU: of HBM). roofline_frac_bound: an upper
    estimate of roofline_frac on this machine: the decode's FLOPs over the time of its weight matmuls alone
    (as in matmul_only_frac) plus its KV-cache read at mem_read_gbs, everything else (norms, RoPE, softmax,
    cache writes, token choice) taken as free.
  cpu_util: process CPU time / wall time while running (how many cores the side actually used).
  ref_matmul_gflops / ref_matmul_vs_ours: torch's fp32 2048^3 matmul (its BLAS, e.g. MKL) and its ratio to
    XLA's: how much of `ratio` is the machine's BLAS (MKL runs far below XLA on some AMD CPUs).
Workload (issue 14), shaped like an ISARA stage: `--workload-prompts` (256) random prompts of 300-1500 tokens,
per-prompt new-token limits from a long-tailed mix (lognormal, mean ~40, max 200, fixed seed), EOS ignored so
each row generates exactly its limit, the same weights on every side, in one run:
  workload_ours_tok_s: our continuous batching (`--workload-batch` slots); workload_static_tok_s: our static
    batching (same batch size, prompts sorted by length); workload_ref_tok_s: transformers `generate` on the same
    sorted batches, each run to the longest limit in the batch (it has no per-row limit) and credited with the
    rows' limits only, at its best batch size among `--ref-batch-sizes` (tried on the first batches);
  all as useful (generated) tokens per second, compile excluded (a warm-up run first); workload_vs_static,
  workload_vs_ref; ours_prefill_s / ours_decode_s: the prefill / decode split of our continuous run (timed in a
  separate run that waits for each call).
The machine may be shared: ratios in one run are what to compare, absolute numbers are noisy.

    python scripts/bench_sampling.py [--threads N] [--reps 2] [--skip-ref] [--workload-prompts 256]
    python scripts/bench_sampling.py --workload-only --skip-ref   # our static and continuous workload only
    python scripts/bench_sampling.py --workload-only --skip-ref --shrink-from 1000000   # ... the cache never shrinking
    python scripts/bench_sampling.py --workload-only --ref-device cuda --workload-prompts 128   # on a GPU, both sides
    python scripts/bench_sampling.py --workload-only --toy --workload-prompts 8   # a 2-layer model: seconds on a CPU
The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from selfalign_jax.core.settings import GenConfig

CONFIG = dict(vocab_size=32000, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
              intermediate_size=1408, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
              pad_token_id=0, rms_norm_eps=1e-5, tie_word_embeddings=False)
BATCH, PROMPT, NEW = 32, 128, 128
TOY = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           intermediate_size=128)
GREEDY_STATIC = GenConfig(max_new_tokens=NEW, temperature=0.0, continuous=False)


class IdTokenizer:
    """Stand-in tokenizer for token-id prompts: decodes ids as numbers (the text is not looked at)."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


def timed(fn):
    c, t = time.process_time(), time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t
    return out, wall, (time.process_time() - c) / wall


def matmul_rate(n: int = 2048, reps: int = 2) -> tuple[float, float]:
    """(FLOP/s, FLOP per CPU-second) of a jitted fp32 n x n matmul, best of reps."""
    import jax
    import jax.numpy as jnp

    global _MM
    if "_MM" not in globals():
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        _MM = (a, jax.jit(lambda a, b: a @ b))
        _MM[1](a, a).block_until_ready()
    a, f = _MM
    best, best_cpu = 0.0, 0.0
    for _ in range(reps):
        _, wall, util = timed(lambda: f(a, a).block_until_ready())
        best, best_cpu = max(best, 2 * n ** 3 / wall), max(best_cpu, 2 * n ** 3 / (wall * util))
    return best, best_cpu


def mem_read_rate(mib: int = 512, reps: int = 3) -> float:
    """Bytes/s of a jitted sum over a mib MiB fp32 array (streaming reads, far beyond the caches), best of reps."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((mib << 18,), jnp.float32)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()
    return max((mib << 20) / timed(lambda: f(x).block_until_ready())[1] for _ in range(reps))


def torch_matmul_rate(n: int = 2048, reps: int = 3) -> float:
    """FLOP/s of torch's fp32 n x n matmul (its BLAS), best of reps."""
    import torch

    a = torch.randn(n, n)
    a @ a
    return max(2 * n ** 3 / timed(lambda: a @ a)[1] for _ in range(reps))


def matmul_params(cfg) -> int:
    """Weights a decode step multiplies each token by: every layer's projections and the LM head."""
    D, H, N, K, F, V = cfg.hidden, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.intermediate, cfg.vocab_size
    return cfg.n_layers * (D * N * H * 2 + 2 * D * K * H + 3 * D * F) + V * D


def decode_flops(cfg, batch: int, prompt: int, first: int, last: int) -> float:
    """FLOPs of decode steps first..last-1 (step s feeds the token at position prompt - 1 + s, the last prompt
    token at s = 0, whose query sees prompt + s keys): per token 2 x matmul params + 4 x N x H x keys per layer."""
    mm, NH = matmul_params(cfg), cfg.n_heads * cfg.head_dim
    return float(sum(batch * (2 * mm + cfg.n_layers * 4 * NH * (prompt + s)) for s in range(first, last)))


def matmul_only_loop(p_dec, B: int):
    """jitted f(x_BxD, n): n steps of the decode's weight matmuls alone (Llama layout, InOut weights)."""
    import jax
    import jax.numpy as jnp

    Ws = [(lp.q.w, lp.k.w, lp.v.w, lp.o.w, lp.gate.w, lp.up.w, lp.down.w) for lp in p_dec.layers]

    @jax.jit
    def f(Ws, head, x_BxD, n):
        def body(_, x):
            for q, k, v, o, g, u, d in Ws:
                x = x + (x @ q) @ o + 1e-6 * ((x @ k).sum(-1, keepdims=True) + (x @ v).sum(-1, keepdims=True))
                x = x + (jax.nn.silu(x @ g) * (x @ u)) @ d
            return x + 1e-6 * (x @ head)[:, :x.shape[1]]
        return jax.lax.fori_loop(0, n, body, x_BxD)

    x = jnp.full((B, p_dec.layers[0].q.w.shape[0]), 0.01, jnp.float32)
    f(Ws, p_dec.lm_head.w, x, 1).block_until_ready()
    return lambda n: f(Ws, p_dec.lm_head.w, x, n).block_until_ready()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--reps", type=int, default=2, help="timed runs of ours (best is reported)")
    ap.add_argument("--skip-ref", action="store_true", help="skip transformers (no ratio)")
    ap.add_argument("--model-dir", type=Path, default=None, help="where to write the random checkpoint")
    ap.add_argument("--workload-prompts", type=int, default=256, help="prompts of the ISARA-shaped workload (0: skip)")
    ap.add_argument("--workload-batch", type=int, default=16, help="our batch size / slots in the workload")
    ap.add_argument("--workload-only", action="store_true", help="only the workload (with --skip-ref: ours only)")
    ap.add_argument("--ref-batch-sizes", default="4,16", help="transformers batch sizes tried in the workload")
    ap.add_argument("--shrink-from", type=int, default=None,
                    help="core.generate.continuous.SHRINK_FROM: prompt slots from which continuous batching shrinks "
                         "its cache (a huge value: never)")
    ap.add_argument("--ref-device", default="cpu", help="torch device of the transformers side (cuda on a GPU)")
    ap.add_argument("--toy", action="store_true", help="a 2-layer hidden-64 model (quick CPU runs)")
    args = ap.parse_args()
    if args.toy:
        CONFIG.update(TOY)

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    import jax

    from selfalign_jax.core import checkpoint, model as M
    from selfalign_jax.core.generate import cache, continuous, steps
    from selfalign_jax.core.generate import generate

    if args.shrink_from is not None:
        continuous.SHRINK_FROM = args.shrink_from
    tmp = None
    model_dir = args.model_dir
    if model_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_sampling_")
        model_dir = Path(tmp.name)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).float().eval()
    hf.save_pretrained(str(model_dir), safe_serialization=True)
    hf = hf.to(args.ref_device)
    cfg, params = checkpoint.load(model_dir, dtype="float32")
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, CONFIG["vocab_size"], (BATCH, PROMPT)).astype(np.int32)
    tok = IdTokenizer()
    print(f"threads: torch {torch.get_num_threads()}, XLA intra-op pool = all {os.cpu_count()} cores "
          f"(affinity {len(os.sched_getaffinity(0))}); jax {jax.__version__} {jax.devices()[0].platform}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    if args.workload_only:
        print(json.dumps(workload(args, hf, params, cfg, tok, torch)))
        return

    def ours():
        return generate(params, cfg, tok, [p.tolist() for p in prompts], GREEDY_STATIC, stop=(), ignore_eos=True,
                        batch_size=BATCH)

    res, first, _ = timed(ours)
    runs = [timed(ours) for _ in range(args.reps)]
    _, ours_s, ours_util = min(runs, key=lambda r: r[1])
    compile_s = max(0.0, first - ours_s)
    n_new = sum(len(r.token_ids) for r in res)
    assert n_new == BATCH * NEW, n_new
    print(f"ours: first call {first:.2f}s (compile ~{compile_s:.2f}s), steady {ours_s:.2f}s, "
          f"{n_new / ours_s:.0f} new tok/s, cpu util {ours_util:.2f}")

    # decode loop alone (the jitted while_loop, the same compiled functions as generate), in chunks of 32
    # steps, each right after a matmul measurement: both see the same machine load
    p_dec = M.inference_layout(params) if jax.default_backend() == "cpu" else params
    lens = np.full((BATCH,), PROMPT, np.int32)
    keys = steps.row_keys(jax.random.key(0), np.arange(BATCH, dtype=np.uint32))
    one, zero_i = np.ones(BATCH, np.float32), np.zeros(BATCH, np.int32)
    kw = dict(cfg=cfg, ngram=0, eos=(), pad=0)
    Tp, Tn = cache.prompt_bucket(PROMPT - 1), cache.new_tokens_bucket(NEW)
    padded = np.zeros((BATCH, Tp + 1), np.int32)
    padded[:, Tp + 1 - PROMPT:] = prompts
    fr, fr_cpu, dec_s, dec_cpu, pre_s, peak = [], [], 0.0, 0.0, [], 0.0
    mm_only, fr_mm, mm_step_flops = matmul_only_loop(p_dec, BATCH), [], 2 * matmul_params(cfg) * BATCH

    def prefill():
        return steps.prefill(p_dec, M.init_cache(cfg, BATCH, Tp + Tn), padded, lens, keys,
                             np.full(BATCH, NEW, np.int32), one * 0, zero_i, one, one, cfg=cfg)

    # warm-up: generate's calls pass other static arguments (place, ...), so these compile anew, untimed
    jax.block_until_ready(steps.decode(p_dec, prefill(), np.int32(NEW), np.zeros(BATCH, bool), **kw))
    traces = sum(steps.TRACES.values())
    for _ in range(args.reps):
        st, t_pre, _ = timed(lambda: jax.block_until_ready(prefill()))
        pre_s.append(t_pre)
        step = 0  # the prefill takes prompt tokens 0..126; decode step 0 feeds token 127 and chooses new token 0
        while step < NEW:
            until = min(step + 32, NEW)
            mm, mm_cpu = matmul_rate()
            peak = max(peak, mm)
            st, wall, util = timed(lambda: jax.block_until_ready(
                steps.decode(p_dec, st, np.int32(until), np.zeros(BATCH, bool), **kw)))
            fl = decode_flops(cfg, BATCH, PROMPT, step, until)
            fr.append(fl / wall / mm)
            fr_cpu.append(fl / (wall * util) / mm_cpu)
            _, wall_mm, _ = timed(lambda: mm_only(until - step))
            fr_mm.append(mm_step_flops * (until - step) / wall_mm / mm)
            dec_s += wall / args.reps
            dec_cpu += wall * util / args.reps
            step = until
        assert int(st.step) == NEW
    assert sum(steps.TRACES.values()) == traces, "the timed prefill / decode compiled"
    dflops = decode_flops(cfg, BATCH, PROMPT, 0, NEW)
    roof, roof_cpu, roof_mm = float(np.median(fr)), float(np.median(fr_cpu)), float(np.median(fr_mm))
    bw = mem_read_rate()
    kv_step = BATCH * M.cache_row_bytes(cfg, Tp + Tn)  # keys, values and slot positions of every layer
    step_bytes = 4 * matmul_params(cfg) + kv_step  # fp32 weights and the cache, read once a step
    mem_frac = step_bytes * NEW / dec_s / bw
    step_flops = dflops / NEW  # the bound: weight matmuls at their measured fraction, the cache at bw
    bound = step_flops / (mm_step_flops / (roof_mm * peak) + kv_step / bw) / peak
    pre_best = min(pre_s)
    ours_dec_tok_s = BATCH * NEW / dec_s
    print(f"ours: prefill {pre_best:.2f}s, decode {dec_s:.2f}s ({dec_s / NEW * 1e3:.1f} ms/step, "
          f"{ours_dec_tok_s:.0f} tok/s, {dflops / dec_s / 1e9:.1f} GFLOP/s, cpu util {dec_cpu / dec_s:.2f}); "
          f"jitted fp32 2048^3 matmul up to {peak / 1e9:.1f} GFLOP/s; roofline fraction (median over "
          f"{len(fr)} interleaved chunks) {roof:.2f}, per CPU-second {roof_cpu:.2f}; the decode's weight matmuls "
          f"alone {roof_mm:.2f} (decode / matmuls alone {roof / roof_mm:.2f})")
    print(f"memory: streaming reads {bw / 1e9:.1f} GB/s; the decode reads {step_bytes / 2**20:.0f} MiB a step "
          f"({kv_step / 2**20:.0f} MiB of it KV cache), {mem_frac:.2f} of that bandwidth; roofline fraction if the "
          f"weight matmuls ran as alone and the cache read at full bandwidth, the rest free: {bound:.2f}")

    out = dict(ours_tok_s=round(n_new / ours_s, 1), ref_tok_s=None, ratio=None, roofline_frac=round(roof, 3),
               roofline_frac_cpu=round(roof_cpu, 3), matmul_only_frac=round(roof_mm, 3),
               decode_vs_matmul_only=round(roof / roof_mm, 3), roofline_frac_bound=round(bound, 3),
               mem_read_gbs=round(bw / 1e9, 1), decode_mem_frac=round(mem_frac, 3),
               ours_decode_tok_s=round(ours_dec_tok_s, 1), ref_decode_tok_s=None, decode_ratio=None,
               compile_s=round(compile_s, 2), ours_s=round(ours_s, 2), ours_prefill_s=round(pre_best, 2),
               ours_decode_s=round(dec_s, 2), decode_gflops=round(dflops / dec_s / 1e9, 1),
               matmul_gflops=round(peak / 1e9, 1), ours_cpu_util=round(ours_util, 2),
               ours_decode_cpu_util=round(dec_cpu / dec_s, 2), threads=args.threads, batch=BATCH, prompt=PROMPT,
               new=NEW)
    if not args.skip_ref:
        ids = torch.tensor(prompts, dtype=torch.long, device=args.ref_device)
        mask = torch.ones_like(ids)
        gen = dict(do_sample=False, pad_token_id=0)
        with torch.no_grad():
            hf.generate(input_ids=ids[:4, :16], attention_mask=mask[:4, :16], max_new_tokens=4, **gen)  # warm-up
            ref, ref_s, ref_util = timed(lambda: hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW,
                                                             min_new_tokens=NEW, **gen))
            _, ref1_s, _ = timed(lambda: hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1,
                                                     min_new_tokens=1, **gen))
        ref_new = ref[:, PROMPT:].cpu().numpy()
        assert ref_new.shape == (BATCH, NEW)
        ours_ids = np.array([r.token_ids for r in res])
        agree16 = float(np.mean((ours_ids[:, :16] == ref_new[:, :16]).all(1)))
        same = float(np.mean(ours_ids == ref_new))
        ref_tok_s = BATCH * NEW / ref_s
        ref_dec = BATCH * (NEW - 1) / max(ref_s - ref1_s, 1e-9)
        print(f"transformers: generate {ref_s:.2f}s ({ref_tok_s:.1f} new tok/s, cpu util {ref_util:.2f}), "
              f"prefill+1 {ref1_s:.2f}s, decode {ref_dec:.1f} tok/s; greedy agreement: first 16 tokens of "
              f"{agree16:.0%} rows identical, {same:.1%} of all tokens")
        out.update(ref_tok_s=round(ref_tok_s, 1), ratio=round(n_new / ours_s / ref_tok_s, 2),
                   ref_decode_tok_s=round(ref_dec, 1), decode_ratio=round(ours_dec_tok_s / ref_dec, 2),
                   ref_s=round(ref_s, 2), ref_prefill_s=round(ref1_s, 2), ref_cpu_util=round(ref_util, 2),
                   greedy_rows_agree_16=agree16, greedy_token_agreement=round(same, 4))
        tm = torch_matmul_rate()
        out.update(ref_matmul_gflops=round(tm / 1e9, 1), ref_matmul_vs_ours=round(tm / peak, 2))
        print(f"torch fp32 2048^3 matmul up to {tm / 1e9:.1f} GFLOP/s ({tm / peak:.2f} of XLA's): the machine's BLAS "
              f"weighs in the ratio")
    if args.workload_prompts > 0:
        out.update(workload(args, hf, params, cfg, tok, torch))
    out["loadavg_1m"] = os.getloadavg()[0]
    if tmp is not None:
        tmp.cleanup()
    print(json.dumps(out))


def workload_inputs(n: int, vocab: int, seed: int = 1):
    """n prompts of 300-1500 random tokens and long-tailed new-token limits (mean ~40, max 200)."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(300, 1501, n)
    prompts = [rng.integers(3, vocab, k).tolist() for k in lens]
    limits = np.clip(np.round(rng.lognormal(np.log(24.0), 1.0, n)), 2, 200).astype(int)
    limits[int(np.argmax(limits))] = 200
    return prompts, [int(x) for x in limits]


def workload(args, hf, params, cfg, tok, torch) -> dict:
    from selfalign_jax.core.generate import generate, steps

    prompts, limits = workload_inputs(args.workload_prompts, CONFIG["vocab_size"])
    useful = sum(limits)
    B = args.workload_batch
    print(f"workload: {len(prompts)} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens "
          f"(mean {np.mean([len(p) for p in prompts]):.0f}), limits mean {np.mean(limits):.1f}, max {max(limits)}, "
          f"{useful} useful tokens; batch {B}")

    def ours(continuous):
        gen = dataclasses.replace(GREEDY_STATIC, continuous=continuous)
        res = generate(params, cfg, tok, prompts, gen, per_prompt={"max_new_tokens": limits}, stop=(), ignore_eos=True,
                       batch_size=B)
        assert [len(r.token_ids) for r in res] == limits
        return res

    out = {}
    for name, cont in (("static", False), ("ours", True)):
        ours(cont)  # compiles (every prompt bucket / insertion size)
        _, wall, util = timed(lambda: ours(cont))
        out[f"workload_{name}_tok_s"] = round(useful / wall, 1)
        out[f"workload_{name}_s"] = round(wall, 1)
        print(f"workload {'continuous' if cont else 'static'}: {wall:.1f}s, {useful / wall:.1f} useful tok/s, "
              f"cpu util {util:.2f}")
    steps.PROFILE = collections.Counter()
    ours(True)
    prof, steps.PROFILE = dict(steps.PROFILE), None
    out.update(workload_ours_prefill_s=round(prof["prefill"], 1), workload_ours_decode_s=round(prof["decode"], 1))
    print(f"workload continuous, each call waited for: prefill {prof['prefill']:.1f}s, decode {prof['decode']:.1f}s")
    out["workload_vs_static"] = round(out["workload_ours_tok_s"] / out["workload_static_tok_s"], 2)
    if not args.skip_ref:
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))

        def ref(bs, idx):
            n_tok = 0
            for b0 in range(0, len(idx), bs):
                rows = idx[b0:b0 + bs]
                T = max(len(prompts[i]) for i in rows)
                ids = torch.zeros((len(rows), T), dtype=torch.long)
                mask = torch.zeros_like(ids)
                for r, i in enumerate(rows):
                    ids[r, T - len(prompts[i]):] = torch.tensor(prompts[i])
                    mask[r, T - len(prompts[i]):] = 1
                ids, mask = ids.to(args.ref_device), mask.to(args.ref_device)
                m = max(limits[i] for i in rows)
                with torch.no_grad():
                    hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=m, min_new_tokens=m,
                                do_sample=False, pad_token_id=0)
                n_tok += sum(limits[i] for i in rows)
            return n_tok

        sizes = [int(s) for s in args.ref_batch_sizes.split(",")]
        trial = order[:max(sizes)]
        rates = {}
        for bs in sizes:
            n_tok, wall, _ = timed(lambda: ref(bs, trial))
            rates[bs] = n_tok / wall
        best = max(rates, key=rates.get)
        print("transformers batch sizes tried on the first prompts: "
              + ", ".join(f"{bs}: {r:.1f} tok/s" for bs, r in rates.items()) + f" -> {best}")
        _, wall, util = timed(lambda: ref(best, order))
        out.update(workload_ref_tok_s=round(useful / wall, 1), workload_ref_s=round(wall, 1), workload_ref_batch=best,
                   workload_vs_ref=round(out["workload_ours_tok_s"] * wall / useful, 2))
        print(f"workload transformers (batch {best}): {wall:.1f}s, {useful / wall:.1f} useful tok/s, "
              f"cpu util {util:.2f}")
    out.update(workload_prompts=len(prompts), workload_batch=B, workload_useful_tokens=useful)
    return out


if __name__ == "__main__":
    main()
