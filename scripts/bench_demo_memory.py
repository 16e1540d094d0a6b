"""Memory and time of the real demo's heaviest stages, each alone in this process (run it under
`/usr/bin/time -v` for the kernel's peak RSS too).

    python scripts/bench_demo_memory.py sft --run-dir RUN [--streams N] [--rows R] [--remat on|off]
        iteration 1's SFT of a real demo run directory (its seeds.jsonl + iter_1/kept.jsonl, the demo's SFT
        settings, auto_fit as the demo runs it; --rows / --remat: micro-batches of R rows (default 4), remat as
        given, auto_fit off), trained from the model's directory
    python scripts/bench_demo_memory.py generate
        one iteration-1 question stage (64 prompts), then the RSS after hostmem.release() and after
        jax.clear_caches(), and the same stage again cold and warm

The model is the demo's converted SmolLM2 in the cache (`selfalign demo --real` makes it). Last line: JSON
with peak_rss_gib (ru_maxrss) and the figures of the mode.
"""

import argparse
import dataclasses
import gc
import json
import resource
import sys
import threading
import time
from pathlib import Path

import jax

from selfalign_jax.app import isara
from selfalign_jax.core import hostmem, train
from selfalign_jax.core.loaded import LoadedModel
from selfalign_jax.core.template import Template
from selfalign_jax.demos import real


def gib(n: float) -> float:
    return round(n / 2**30, 2)


def sft(model_dir: Path, run_dir: Path, streams: int, rows: int, remat: str) -> dict:
    pairs = [(r["question"], r["answer"]) for f in ("seeds.jsonl", "iter_1/kept.jsonl")
             for r in map(json.loads, open(run_dir / f))]
    built: list = []
    orig = train.StepFns.__init__

    def record(self, spec):
        orig(self, spec)
        built.append(self)
    train.StepFns.__init__ = record
    train._make_step.cache_clear()
    top = [0.0]

    def sample():  # the largest RSS seen while training (ru_maxrss also counts the model load)
        while True:
            top[0] = max(top[0], hostmem.rss_bytes())
            time.sleep(0.05)
    threading.Thread(target=sample, daemon=True).start()
    tcfg = dataclasses.replace(real.REAL.sft, seed=1, streams=streams)  # isara.sft's seed for seed 0, iteration 1
    if rows or remat != "auto":
        rows = rows or train.CPU_MICRO_ROWS
        tcfg = dataclasses.replace(tcfg, batch_size=rows, grad_accum=tcfg.effective_batch // rows,
                                   remat=remat == "on", auto_fit=False)
    steps: list[float] = []
    t0 = time.perf_counter()
    train.finetune(model_dir, pairs, out_dir=None, train_cfg=tcfg, template=Template(real.REAL.template),
                   progress=False, on_step=lambda s, m: steps.append(round(m["seconds"], 1)))
    return {"mode": "sft", "pairs": len(pairs), "streams": streams, "rows": rows or "auto", "remat": remat,
            "wall_s": round(time.perf_counter() - t0, 1),
            "step_s": steps, "train_peak_rss_gib": gib(top[0]),
            "compiled": [list(map(list, b.traced_shapes)) for b in built]}


def generate(model_dir: Path) -> dict:
    seeds, helpful, _ = real.load_assets()
    m = LoadedModel.load(model_dir, "auto")
    out = {"mode": "generate", "loaded_gib": gib(hostmem.rss_bytes())}

    def stage(name):
        t = time.perf_counter()
        isara.write_questions(m, [seeds + helpful], 1, real.REAL)
        out[f"{name}_s"] = round(time.perf_counter() - t, 1)
    stage("first")
    out["after_stage_gib"] = gib(hostmem.rss_bytes())
    hostmem.release()
    out["after_release_gib"] = gib(hostmem.rss_bytes())
    jax.clear_caches()
    gc.collect()
    hostmem.release()
    out["after_clear_caches_gib"] = gib(hostmem.rss_bytes())
    stage("cold")
    stage("warm")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("sft", "generate"))
    ap.add_argument("--run-dir", type=Path, help="a real demo run directory (sft)")
    ap.add_argument("--model", type=Path, default=None, help="default: the demo's converted SmolLM2 in the cache")
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--rows", type=int, default=0, help="sft: rows per micro-batch (auto_fit off)")
    ap.add_argument("--remat", choices=("auto", "on", "off"), default="auto", help="sft: remat (auto_fit off)")
    a = ap.parse_args()
    model_dir = a.model or real.default_cache_dir() / real.MODEL_NAME
    if not (model_dir / "config.json").is_file():
        sys.exit(f"bench_demo_memory: {model_dir}: no converted model; run `selfalign demo --real` or pass --model")
    if a.mode == "sft":
        if a.run_dir is None or not (a.run_dir / "iter_1" / "kept.jsonl").is_file():
            sys.exit(f"bench_demo_memory: --run-dir {a.run_dir}: no iter_1/kept.jsonl (a real demo run directory)")
        out = sft(Path(model_dir), a.run_dir, a.streams, a.rows, a.remat)
    else:
        out = generate(Path(model_dir))
    out["peak_rss_gib"] = gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
