"""Train-step benchmark: our jitted SFT step vs a PyTorch step (transformers LlamaForCausalLM + AdamW).

Bench config (as the sampler benchmark): Llama, 8 layers, hidden 512, 8 heads, 2 KV heads,
intermediate 1408, vocab 32000; batch 8 x 512 tokens, fp32, loss on the last 448 tokens of each row
(the first 64 are "prompt"). Same weights (a random transformers model saved as safetensors, loaded
by `checkpoint.load` on our side and `from_pretrained` on the torch side), same batch, same
optimizer recipe (AdamW 0.9/0.95, clip 1.0, warm-up + cosine), torch threads = the cores XLA uses.

Each side runs in its own fresh subprocess (so peak RSS is per side: `ru_maxrss`, plus the RSS just
before the model is loaded), warm-up steps first, then timed steps; the sides alternate for
`--rounds` rounds and each side's best round (lowest median step time) counts, which damps noise from
other processes on a shared machine. Step CPU time (process_time) is reported too: it is less
sensitive to other processes than wall time.

MFU = model FLOPs per step / step time / peak, with model FLOPs = 6 * (parameters except the input
embedding) * tokens + 12 * layers * hidden * seq * tokens (PaLM appendix B), and the peak measured
here: the best of several jitted 2048^3 fp32 matmuls.

Ours runs as the `selfalign` command runs it: with glibc's huge-page tunable where it applies
(`selfalign_jax.core.hostmem`: XLA:CPU maps its per-step temporaries afresh each call; 2 MiB pages
instead of 4 KiB ones save most of the page-fault time). It also runs with plain 4 KiB pages
(`ours_4k_*`, `ratio_4k`), and torch runs with its default (the tunable made its step slower here).
Page faults per step are reported for every side.

On an accelerator (`--model 1b --dtype bfloat16 --torch-device cuda`): Llama-3.2-1B's shape (16 layers, hidden
2048, 32 heads, 8 KV heads, intermediate 8192, vocab 128256, tied), our step computing in bf16 (fp32 masters and
Adam), torch's under bf16 autocast (fp32 masters, AdamW), the peak a jitted bf16 `--peak-n`^3 matmul (best of 10).
`--model toy` is a 2-layer model for quick CPU runs (scripts/device_check.sh --cpu).

Last line: JSON with ours_tok_s, ref_tok_s, ratio, mfu (and more).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIG = dict(vocab_size=32000, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
              intermediate_size=1408, max_position_embeddings=1024, rms_norm_eps=1e-5, bos_token_id=1,
              eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
MODELS = {"bench": dict(CONFIG),
          "1b": dict(CONFIG, vocab_size=128256, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, intermediate_size=8192, max_position_embeddings=4096,
                     tie_word_embeddings=True, rope_theta=500000.0),
          "toy": dict(CONFIG, vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128)}
B, T, PROMPT = 8, 512, 64
LR, TOTAL_STEPS = 2e-5, 1000

COMMON = r"""
import json, os, resource, sys, time
import numpy as np
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
d, warmup, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = np.load(os.path.join(d, "batch.npz"))
seq = data["seq"]                                   # [B, T + 1]
inputs, targets = seq[:, :-1], seq[:, 1:]
weights = data["weights"]                           # [B, T] 0 on the prompt, 1 on answer tokens
def report(times, cpus, losses, base, extra):
    print(json.dumps({"times": times, "cpu": cpus, "losses": losses, "baseline_rss": base,
                      "faults": faults, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      **extra}))
faults = []
def minflt():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
"""

OURS = COMMON + r"""
import jax, jax.numpy as jnp
jnp.zeros(1).block_until_ready()
from selfalign_jax.core import checkpoint, train as T
base = rss()
cfg, params = checkpoint.load(d, dtype="float32")
tc = T.TrainConfig(lr=float(sys.argv[4]), batch_size=inputs.shape[0], grad_accum=1, max_length=inputs.shape[1],
                   dtype=sys.argv[7])
tr = T.Trainer(cfg, tc, total_steps=int(sys.argv[5]))
state, frozen = tr.init_state(params)
del params
batch = {"tokens": inputs[None], "targets": targets[None], "weights": weights[None].astype(np.float32),
         "pos": np.broadcast_to(np.arange(inputs.shape[1], dtype=np.int32), inputs.shape)[None].copy()}
times, cpus, losses = [], [], []
for i in range(warmup + steps):
    t, c, f = time.perf_counter(), time.process_time(), minflt()
    state, m = tr.step(state, frozen, batch)
    loss = float(m["loss"])                          # blocks until the step is done
    if i >= warmup:
        times.append(time.perf_counter() - t); cpus.append(time.process_time() - c); faults.append(minflt() - f)
    losses.append(loss)
report(times, cpus, losses, base, {"threads": os.cpu_count(), "jax": jax.__version__,
                                   "device": jax.devices()[0].device_kind})
"""

TORCH = COMMON + r"""
import math, torch, transformers
torch.set_num_threads(int(sys.argv[6]))
dev, amp = sys.argv[8], sys.argv[7] == "bfloat16"
sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
base = rss()
m = transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa").to(dev).train()
lr, total = float(sys.argv[4]), int(sys.argv[5])
warm = math.ceil(0.03 * total)
opt = torch.optim.AdamW(m.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: s / max(1, warm) if s < warm else
                                          0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
x = torch.tensor(inputs, dtype=torch.long, device=dev)
labels = torch.tensor(np.where(weights > 0, targets, -100), dtype=torch.long, device=dev)  # already shifted
times, cpus, losses = [], [], []
for i in range(warmup + steps):
    t, c, f = time.perf_counter(), time.process_time(), minflt()
    with torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=amp):
        h = m.model(input_ids=x).last_hidden_state
        logits = m.lm_head(h)
    loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1),
                                             ignore_index=-100)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
    sync()
    if i >= warmup:
        times.append(time.perf_counter() - t); cpus.append(time.process_time() - c); faults.append(minflt() - f)
    losses.append(float(loss))
report(times, cpus, losses, base, {"threads": torch.get_num_threads(), "torch": torch.__version__})
"""

PEAK = r"""
import sys, time, jax, jax.numpy as jnp
n, dt = int(sys.argv[1]), jnp.dtype(sys.argv[2])
a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dt)
b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dt)
f = jax.jit(lambda a, b: a @ b)
f(a, b).block_until_ready()
best = 0.0
for _ in range(10):
    t = time.perf_counter(); f(a, b).block_until_ready(); best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
print(best)
"""


def build(d: Path) -> dict:
    import numpy as np
    import torch
    import transformers

    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).float()
    m.save_pretrained(str(d), safe_serialization=True)
    n_params = sum(p.numel() for p in m.parameters())
    rng = np.random.default_rng(0)
    seq = rng.integers(4, CONFIG["vocab_size"], (B, T + 1)).astype(np.int32)
    weights = np.ones((B, T), np.float32)
    weights[:, :PROMPT - 1] = 0.0  # targets 0..PROMPT-2 are prompt tokens
    np.savez(d / "batch.npz", seq=seq, weights=weights)
    # tied: the one table is also the LM head, whose FLOPs count
    embed = 0 if CONFIG["tie_word_embeddings"] else CONFIG["vocab_size"] * CONFIG["hidden_size"]
    return {"params": n_params, "embed": embed}


def plan_step_gib(model_dir: Path, dtype: str) -> float:
    """`selfalign plan`'s bytes for the bench step (ours: B x T, no accumulation, no remat), in GiB."""
    from selfalign_jax.core import checkpoint, plan

    cfg = checkpoint.config_from_hf(checkpoint.read_config(model_dir), "float32")
    ts = plan.TrainSettings(batch_size=B, max_length=T, dtype=dtype, grad_accum=1)
    return plan.train_bytes(cfg, ts)["total"] / plan.GIB


def run(code: str, *args, env=None) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                         env=dict(os.environ) if env is None else env)
    if out.returncode:
        raise SystemExit(f"child failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median(x):
    x = sorted(x)
    return x[len(x) // 2] if len(x) % 2 else 0.5 * (x[len(x) // 2 - 1] + x[len(x) // 2])


def main():
    global B, T
    from selfalign_jax.core import hostmem

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2, help="alternating ours/torch rounds (best counts)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--dir", default=None, help="where to build the model (default: a temp dir)")
    ap.add_argument("--model", default="bench", choices=sorted(MODELS))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype, both sides")
    ap.add_argument("--batch", type=int, default=B)
    ap.add_argument("--seq", type=int, default=T)
    ap.add_argument("--torch-device", default="cpu")
    ap.add_argument("--peak-n", type=int, default=2048, help="matmul size of the measured peak (in --dtype)")
    ap.add_argument("--skip-4k", action="store_true", help="no 4 KiB-page run of ours")
    args = ap.parse_args()
    B, T = args.batch, args.seq
    CONFIG.clear()
    CONFIG.update(MODELS[args.model])
    threads = os.cpu_count()
    plain_env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    huge = hostmem.applies(plain_env)
    # ours as the `selfalign` command runs it (hostmem: huge pages where they apply), ours with 4 KiB
    # pages, and torch as it runs by default (torch is slower with the tunable on a 2-core CPU: 7.4-7.7 vs 6.7-7.1 s)
    sides = [("ours", OURS, hostmem.env(plain_env) if huge else plain_env)]
    if huge and not args.skip_4k:
        sides.append(("ours_4k", OURS, plain_env))
    sides.append(("torch", TORCH, plain_env))
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(args.dir or tmp) / "bench-train"
        d.mkdir(parents=True, exist_ok=True)
        info = build(d)
        plan_gib = plan_step_gib(d, args.dtype)
        print(f"model: {info['params'] / 1e6:.1f}M parameters; batch {B} x {T}; threads {threads}; "
              f"huge pages for ours: {huge}", flush=True)
        peaks, res = [], {name: [] for name, _, _ in sides}
        for r in range(args.rounds):
            peaks.append(float(run(PEAK, args.peak_n, args.dtype)))
            for side, code, env in sides:
                x = run(code, d, args.warmup, args.steps, LR, TOTAL_STEPS, threads, args.dtype, args.torch_device,
                        env=env)
                x["median"], x["cpu_median"] = median(x["times"]), median(x["cpu"])
                res[side].append(x)
                print(f"round {r + 1} {side:>7}: step {x['median']:.3f}s (cpu {x['cpu_median']:.2f}s)  "
                      f"{B * T / x['median']:.0f} tok/s  page faults/step {median(x['faults']):.0f}  "
                      f"peak RSS {x['peak_rss'] / 2**30:.2f} GiB (before model {x['baseline_rss'] / 2**30:.2f} GiB)  "
                      f"losses {', '.join(f'{v:.4f}' for v in x['losses'][:3])}", flush=True)
        peaks.append(float(run(PEAK, args.peak_n, args.dtype)))
    best = {side: min(v, key=lambda x: x["median"]) for side, v in res.items()}
    o, t = best["ours"], best["torch"]
    o4 = best.get("ours_4k", o)
    peak = max(peaks)
    tokens = B * T
    L, D = CONFIG["num_hidden_layers"], CONFIG["hidden_size"]
    flops = 6 * (info["params"] - info["embed"]) * tokens + 12 * L * D * T * tokens
    ours_tok, ref_tok, ours4_tok = tokens / o["median"], tokens / t["median"], tokens / o4["median"]
    loss_diff = abs(o["losses"][0] - t["losses"][0])
    print(f"peak jitted {args.dtype} {args.peak_n}^3 matmul: {peak / 1e9:.0f} GFLOP/s; "
          f"model FLOPs/step {flops / 1e12:.3f} T")
    print(f"ours {ours_tok:.0f} tok/s  torch {ref_tok:.0f} tok/s  ratio {ours_tok / ref_tok:.2f}  "
          f"(4 KiB pages: {ours4_tok:.0f} tok/s, ratio {ours4_tok / ref_tok:.2f}; "
          f"cpu-time ratio {t['cpu_median'] / o['cpu_median']:.2f})  MFU ours {flops / o['median'] / peak:.3f} "
          f"torch {flops / t['median'] / peak:.3f}  first-step loss diff {loss_diff:.1e}")
    print(f"peak memory: ours {o['peak_rss'] / 2**30:.2f} GiB RSS (plan of the step {plan_gib:.2f} GiB + the process "
          f"before the model {o['baseline_rss'] / 2**30:.2f} GiB), torch {t['peak_rss'] / 2**30:.2f} GiB RSS")
    print(json.dumps({
        "plan_step_gib": round(plan_gib, 3),
        "ours_tok_s": round(ours_tok, 1), "ref_tok_s": round(ref_tok, 1), "ratio": round(ours_tok / ref_tok, 3),
        "mfu": round(flops / o["median"] / peak, 3), "ref_mfu": round(flops / t["median"] / peak, 3),
        "huge_pages": huge, "ours_4k_tok_s": round(ours4_tok, 1), "ratio_4k": round(ours4_tok / ref_tok, 3),
        "mfu_4k": round(flops / o4["median"] / peak, 3),
        "cpu_time_ratio": round(t["cpu_median"] / o["cpu_median"], 3),
        "ours_step_s": round(o["median"], 3), "ours_4k_step_s": round(o4["median"], 3),
        "ref_step_s": round(t["median"], 3),
        "ours_faults_per_step": median(o["faults"]), "ours_4k_faults_per_step": median(o4["faults"]),
        "ref_faults_per_step": median(t["faults"]),
        "peak_gflops": round(peak / 1e9, 1), "model_tflops_per_step": round(flops / 1e12, 4),
        "ours_peak_rss_gib": round(o["peak_rss"] / 2**30, 3), "ours_4k_peak_rss_gib": round(o4["peak_rss"] / 2**30, 3),
        "ref_peak_rss_gib": round(t["peak_rss"] / 2**30, 3),
        "ours_rss_before_model_gib": round(o["baseline_rss"] / 2**30, 3),
        "ref_rss_before_model_gib": round(t["baseline_rss"] / 2**30, 3),
        "first_loss_diff": float(f"{loss_diff:.2e}"), "threads": threads, "batch": [B, T],
        "rounds": args.rounds, "steps": args.steps, "model": args.model, "dtype": args.dtype,
        "device": o.get("device"), "params_m": round(info["params"] / 1e6, 1)}))


if __name__ == "__main__":
    main()
