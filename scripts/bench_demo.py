"""The real demo's stages timed on random weights of SmolLM2-135M-Instruct's shape (its GGUF is not needed).

Writes a random Llama checkpoint of SmolLM2-135M's config (30 layers, hidden 576, 9 heads, 3 KV heads,
intermediate 1536, vocab 49152, tied; transformers' default init) with a BPE tokenizer of exactly 49152 ids
(tests/hf_fixtures.make_family_tokenizer), then runs `selfalign demo --real --model DIR` in a subprocess and stamps
each line it prints with the seconds since the start, so each stage's time is the gap between its lines.
Random weights rarely pick EOS: every generation runs to its token limit (an upper bound on the real model's work).
`--toy`: a 2-layer hidden-64 model of vocab 512, for quick CPU runs (scripts/device_check.sh --cpu).

    python scripts/bench_demo.py --out DIR [--iterations 2] [--timeout 300] [--toy]
Last line: JSON {"wall_s", "rc", "lines", "stages": [[seconds, line], ...]}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
               intermediate_size=1536, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
               tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
TOY = dict(SMOLLM2, vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, intermediate_size=128, max_position_embeddings=4096)


def build(d: Path, conf: dict) -> int:
    import torch
    import transformers

    sys.path.insert(0, str(ROOT / "tests"))
    import hf_fixtures

    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**conf)).float().eval()
    m.save_pretrained(str(d), safe_serialization=True)
    hf_fixtures.make_family_tokenizer(d, "llama", conf["vocab_size"])
    return sum(p.numel() for p in m.parameters())


def run_stamped(cmd: list[str], timeout: float, env: dict) -> tuple[int, list]:
    """(exit code, [[seconds, line], ...]) of cmd's merged stdout / stderr; killed after timeout (code 124)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1)
    lines = []
    for line in p.stdout:
        dt = time.perf_counter() - t0
        lines.append([round(dt, 2), line.rstrip()[:300]])
        print(f"[{dt:7.1f}s] {line.rstrip()}", flush=True)
        if dt > timeout:
            p.kill()
            break
    try:
        rc = p.wait(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
    except subprocess.TimeoutExpired:
        p.kill()
        rc = 124
    return (124 if rc and time.perf_counter() - t0 > timeout else rc), lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="where the checkpoint and the run directory go")
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--toy", action="store_true")
    args = ap.parse_args()
    model, run = args.out / "model", args.out / "run"
    model.mkdir(parents=True, exist_ok=True)
    n = build(model, TOY if args.toy else SMOLLM2)
    print(f"random {'toy' if args.toy else 'SmolLM2-135M-shaped'} model: {n / 1e6:.1f}M parameters", flush=True)
    cmd = [sys.executable, "-m", "selfalign_jax.cli", "demo", "--real", "--model", str(model), "--run-dir", str(run),
           "--iterations", str(args.iterations)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    rc, lines = run_stamped(cmd, args.timeout, env)
    wall = time.perf_counter() - t0
    print(json.dumps({"wall_s": round(wall, 1), "rc": rc, "params_m": round(n / 1e6, 1), "lines": len(lines),
                      "stages": lines[-40:]}))


if __name__ == "__main__":
    main()
