"""Run `selfalign demo` for several seeds (each seed: its own world sample, base model and run) and print
every seed's figures, then their mean and spread (min..max). Each seed runs in a fresh process, so its
`minutes` include pretraining unless that seed's base model is already cached (point --cache-dir at an
empty directory to time from scratch).

    python scripts/demo_seeds.py --seeds 0 1 2 --root runs/demo-seeds --cache-dir /tmp/fresh-cache

Last line: JSON {metric: {"mean", "min", "max", "values"}} plus "seeds".
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

KEYS = ("pretrained_harmful", "isara_harmful", "benign_helpful", "sft_harmful", "icl_knn_harmful",
        "icl_random_harmful", "one_round_harmful", "isara_it1_harmful", "minutes")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--root", type=Path, default=Path("runs/demo-seeds"))
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--domain", default="discrimination")
    args = ap.parse_args()
    outs = []
    for s in args.seeds:
        cmd = [sys.executable, "-m", "selfalign_jax.cli", "demo", "--run-dir", str(args.root / f"seed{s}"),
               "--seed", str(s), "--domain", args.domain]
        if args.cache_dir is not None:
            cmd += ["--cache-dir", str(args.cache_dir)]
        print("$", " ".join(cmd), flush=True)
        p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=dict(os.environ))
        if p.returncode:
            raise SystemExit(f"seed {s}: demo failed with exit {p.returncode}")
        out = json.loads(p.stdout.strip().splitlines()[-1])
        outs.append(out)
        cross = ", ".join(f"{d} {a:.2f}->{b:.2f}" for d, (a, b) in out["cross_domain_harmful"].items())
        print(f"seed {s}: " + "  ".join(f"{k} {out[k]}" for k in KEYS if k in out) + f"  cross {cross}", flush=True)
    spread = lambda v: {"mean": round(sum(v) / len(v), 4), "min": min(v), "max": max(v), "values": v}  # noqa: E731
    summary = {k: spread([o[k] for o in outs if o.get(k) is not None]) for k in KEYS
               if any(o.get(k) is not None for o in outs)}
    for d in outs[0]["cross_domain_harmful"]:
        for i, tag in ((0, "pretrained"), (1, "isara")):
            summary[f"{d}_{tag}_harmful"] = spread([o["cross_domain_harmful"][d][i] for o in outs])
    for k, v in summary.items():
        print(f"{k:>28}: mean {v['mean']:.3f}  spread {v['min']}..{v['max']}")
    print(json.dumps({"seeds": args.seeds, **summary}))


if __name__ == "__main__":
    main()
