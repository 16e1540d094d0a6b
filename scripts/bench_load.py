"""Checkpoint loading benchmark: load seconds and peak RSS relative to the checkpoint size.

Builds a ~500 MB random fp32 Llama checkpoint (safetensors), then in fresh subprocesses loads it
(a) with selfalign_jax.core.checkpoint.load and (b) naively (safetensors.numpy.load_file of the whole
file, then device_put), measuring RSS just before loading (runtime baseline, JAX initialised) and the
process's peak RSS. `peak_rss_over_checkpoint` = (peak RSS - baseline RSS) / checkpoint bytes.
Last line: JSON.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import jax, jax.numpy as jnp, numpy as np
jnp.zeros(1).block_until_ready()
import transformers, safetensors.numpy  # libraries imported before the baseline: both sides pay them
from selfalign_jax.core import checkpoint
transformers.CONFIG_MAPPING["llama"]
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
base = rss()
t = time.perf_counter()
if sys.argv[2] == "ours":
    cfg, params = checkpoint.load(sys.argv[1], dtype="float32")
    leaves = jax.tree.leaves(params)
else:
    from safetensors.numpy import load_file
    host = load_file(sys.argv[1] + "/model.safetensors")
    leaves = [jnp.asarray(v) for v in host.values()]
    del host
jax.block_until_ready(leaves)
dt = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": dt, "baseline_rss": base, "peak_rss": peak,
                  "param_bytes": sum(x.nbytes for x in leaves)}))
"""


def build(path: Path, hidden=1024, layers=8, inter=2816, vocab=32000):
    import numpy as np
    from selfalign_jax.core import checkpoint, model as M

    cfg = M.Config(family="llama", vocab_size=vocab, hidden=hidden, n_layers=layers, n_heads=16,
                   n_kv_heads=4, head_dim=hidden // 16, intermediate=inter, max_pos=2048, bos_id=1,
                   eos_ids=(2,), pad_id=0)
    rng = np.random.default_rng(0)
    specs = M.param_specs(cfg)
    import jax
    names = jax.tree.leaves(checkpoint.hf_names(cfg))
    items = [(n, (0.02 * rng.standard_normal(s.shape, dtype=np.float32)))
             for n, s in zip(names, jax.tree.leaves(specs, is_leaf=M.is_spec))]
    path.mkdir(parents=True, exist_ok=True)
    checkpoint._write_safetensors(path / "model.safetensors", items, "float32")
    (path / "config.json").write_text(json.dumps(checkpoint.config_to_hf(cfg)))
    return (path / "model.safetensors").stat().st_size


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default=None, help="where to build the checkpoint (default: a temp dir)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(args.dir or tmp) / "bench-ckpt"
        t = time.perf_counter()
        size = build(d)
        print(f"built {size / 1e6:.0f} MB checkpoint in {time.perf_counter() - t:.1f}s at {d}")
        res = {}
        for kind in ("ours", "naive"):
            out = subprocess.run([sys.executable, "-c", CHILD, str(d), kind], capture_output=True,
                                 text=True, check=True, env={**os.environ})
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["peak_rss_over_checkpoint"] = (r["peak_rss"] - r["baseline_rss"]) / size
            res[kind] = r
            print(f"{kind:>6}: load {r['seconds']:.2f}s  baseline RSS {r['baseline_rss'] / 1e6:.0f} MB  "
                  f"peak RSS {r['peak_rss'] / 1e6:.0f} MB  (peak-baseline)/checkpoint "
                  f"{r['peak_rss_over_checkpoint']:.2f}")
    o, n = res["ours"], res["naive"]
    print(json.dumps({"checkpoint_mb": round(size / 1e6, 1), "load_s": round(o["seconds"], 3),
                      "peak_rss_over_checkpoint": round(o["peak_rss_over_checkpoint"], 3),
                      "naive_load_s": round(n["seconds"], 3),
                      "naive_peak_rss_over_checkpoint": round(n["peak_rss_over_checkpoint"], 3),
                      "target": 1.5, "ok": o["peak_rss_over_checkpoint"] <= 1.5}))


if __name__ == "__main__":
    main()
