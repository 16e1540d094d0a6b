#!/usr/bin/env bash
# One command for the GPU machine (see the developers' guide): the image's own JAX and torch, the project from
# this working tree on PYTHONPATH (nothing resolved against our pins), and the packages the image lacks installed
# with `pip install --no-deps --no-index` from .device-wheels/ (scripts/device_wheels.sh fetches them here; carry
# that folder) into a folder of their own. Then, each step bounded so the whole stays within 8 minutes:
#   env      versions, devices, and whether the image's versions fall in pyproject.toml's ranges
#   decode   scripts/bench_decode.py: the bench model and a random ~1B Llama (bf16) at batch 1/16/64/256:
#            decode and prefill tok/s, the fraction of the measured HBM read bandwidth, transformers beside it
#   train    scripts/bench_train.py: the SFT step of the ~1B model (bf16 compute), MFU against a measured bf16
#            matmul peak, torch + AdamW on the same step
#   workload scripts/bench_sampling.py --workload-only: continuous vs static vs transformers, same GPU
#   demo     scripts/bench_demo.py: the real demo's stages on random weights of SmolLM2-135M's shape
#   pytest   the GPU-relevant tests (families parity, sampler, beam, train step)
# Logs go to $OUT/<step>.log, the summary to $OUT/summary.json, and the last line printed is that JSON.
#
#   bash scripts/device_check.sh          on the GPU machine (run with .device-wheels carried)
#   bash scripts/device_check.sh --cpu    the same steps at toy sizes on the CPU (CI: tests/test_device_check.py)
set -uo pipefail
cd "$(dirname "$0")/.."
mode=gpu
[ "${1:-}" = "--cpu" ] && mode=cpu
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
work=$(mktemp -d)
start=$(date +%s)
budget=${DEVICE_CHECK_BUDGET:-$([ $mode = gpu ] && echo 470 || echo 300)}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
if [ $mode = cpu ]; then
  export JAX_PLATFORMS=cpu
else
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.6}  # torch shares the GPU in-process
fi

install_wheels() {
  local site=$work/site wheels=.device-wheels
  if ! ls $wheels/*.whl >/dev/null 2>&1; then
    echo "no $wheels/: the environment's own packages are used"
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    return 0
  fi
  local keep=()
  for w in $wheels/*.whl; do
    case $(basename "$w") in
      typing_extensions-*)  # only where the image's is older than typeguard needs
        $PY -c 'import sys, importlib.metadata as m; v = tuple(map(int, m.version("typing_extensions").split(".")[:2]))
sys.exit(0 if v >= (4, 14) else 1)' 2>/dev/null && continue ;;
    esac
    keep+=("$w")
  done
  $PY -m pip install -q --no-deps --no-index --no-compile --no-cache-dir --target "$site" "${keep[@]}" || return 1
  for s in $wheels/*.tar.gz; do  # a source distribution (annoy): built here with the image's compiler
    [ -e "$s" ] || continue
    $PY -m pip install -q --no-deps --no-index --no-build-isolation --no-cache-dir --target "$site" "$s" || return 1
  done
  export PYTHONPATH=$PWD:$site
  echo "installed into $site: ${keep[*]} $(ls $wheels/*.tar.gz 2>/dev/null)"
}

# step NAME LIMIT_S CMD...: runs CMD (logged to $OUT/NAME.log) for at most LIMIT_S or what is left of the budget
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((budget - ($(date +%s) - start)))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 5 ]; then
    echo "{\"step\": \"$name\", \"rc\": null, \"s\": 0, \"skipped\": \"no time left\"}" >>"$work/steps.jsonl"
    return
  fi
  echo "== $name (at most ${limit}s): $*"
  local t0=$(date +%s)
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "{\"step\": \"$name\", \"rc\": $rc, \"s\": $(($(date +%s) - t0)), \"limit\": $limit}" >>"$work/steps.jsonl"
}

ENV_PY='
import importlib.metadata as md, json, platform, sys, tomllib
from packaging.requirements import Requirement
import jax, torch
names = ["jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "torch", "transformers", "tokenizers", "flax",
         "optax", "orbax-checkpoint", "numpy", "safetensors", "matplotlib", "tyro", "gguf", "annoy", "pytest"]
def ver(n):
    try:
        return md.version(n)
    except md.PackageNotFoundError:
        return None
vers = {n: ver(n) for n in names}
reqs = [Requirement(r) for r in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]]
out_of_range = {r.name: vers.get(r.name, ver(r.name)) for r in reqs
                if ver(r.name) is None or not r.specifier.contains(ver(r.name), prereleases=True)}
devs = jax.devices()
info = dict(python=platform.python_version(), versions=vers, out_of_range=out_of_range,
            jax_devices=[f"{d.platform}:{d.device_kind}" for d in devs],
            torch_cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            hbm_gib=round((devs[0].memory_stats() or {}).get("bytes_limit", 0) / 2**30, 1))
import selfalign_jax, tyro, gguf, annoy  # noqa: F401 - the carried packages and the working tree import
info["selfalign_jax"] = selfalign_jax.__file__
print(json.dumps(info))
'

echo "device_check ($mode): OUT=$OUT, budget ${budget}s"
install_wheels 2>&1 | tee "$work/install.log"
[ $mode = gpu ] && { nvidia-smi -L 2>&1 || true; }
step env 60 $PY -c "$ENV_PY"
if [ $mode = gpu ]; then
  step decode 170 $PY scripts/bench_decode.py --models bench,1b --batches 1,16,64,256 --dtype bfloat16 \
    --torch-device cuda --reps 3
  step train 90 $PY scripts/bench_train.py --model 1b --dtype bfloat16 --batch 8 --seq 1024 --torch-device cuda \
    --rounds 1 --warmup 2 --steps 5 --peak-n 8192 --skip-4k
  step workload 70 $PY scripts/bench_sampling.py --workload-only --ref-device cuda --workload-prompts 128 \
    --ref-batch-sizes 16,64
  step demo 70 $PY scripts/bench_demo.py --out "$work/demo" --iterations 1 --timeout 55
  step pytest 120 $PY -m pytest -q -x -p no:cacheprovider tests/test_families.py tests/test_generate_sampler.py \
    tests/test_generate_beam.py tests/test_train.py
else
  step decode 50 $PY scripts/bench_decode.py --models toy --batches 2 --prompt 16 --new 32 --dtype float32 \
    --torch-device cpu --reps 1 --bw-mib 64
  step train 80 $PY scripts/bench_train.py --model toy --batch 2 --seq 64 --rounds 1 --warmup 1 --steps 1 --skip-4k
  step workload 80 $PY scripts/bench_sampling.py --workload-only --toy --workload-prompts 2 --workload-batch 2 \
    --ref-batch-sizes 2
  step demo 30 $PY scripts/bench_demo.py --out "$work/demo" --iterations 1 --timeout 8 --toy
  step pytest 40 $PY -m pytest -q --collect-only -p no:cacheprovider tests/test_families.py \
    tests/test_generate_sampler.py tests/test_generate_beam.py tests/test_train.py
fi

SUMMARY_PY='
import json, sys
out, work, mode, wall = sys.argv[1:5]
steps = {}
for line in open(f"{work}/steps.jsonl"):
    s = json.loads(line)
    name = s.pop("step")
    s["result"] = None
    try:
        for text in reversed(open(f"{out}/{name}.log", errors="replace").read().splitlines()):
            if text.startswith("{"):
                s["result"] = json.loads(text)
                break
            if name == "pytest" and text.strip():
                s["result"] = text.strip()  # pytest summary line
                break
    except (OSError, ValueError):
        pass
    steps[name] = s
env = (steps.get("env") or {}).get("result") or {}
summary = dict(mode=mode, wall_s=int(wall), device=(env.get("jax_devices") or [None])[0],
               ok=all(s["rc"] == 0 for s in steps.values()), steps=steps)
open(f"{out}/summary.json", "w").write(json.dumps(summary, indent=1))
print(json.dumps(summary))
'
$PY -c "$SUMMARY_PY" "$OUT" "$work" "$mode" "$(($(date +%s) - start))"
rm -rf "$work"
