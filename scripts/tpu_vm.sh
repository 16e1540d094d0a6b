#!/usr/bin/env bash
# ISARA on a single-host Cloud TPU VM (e.g. v5litepod-8 = v5e-8): venv, install with the [tpu] extra,
# check that JAX sees the TPU, plan the memory, run with the v5e-8 preset.
#
#   MODEL=/path/to/hf-model-dir SEEDS=seeds.jsonl RUN_DIR=runs/v5e bash scripts/tpu_vm.sh
#
# Environment (defaults in brackets): MODEL (HF directory) [required], SEEDS [required], RUN_DIR [runs/tpu],
# CONFIG [configs/tpu-v5e-8.json], LORA_RANK (e.g. 16 for an 8B model, which does not fit full
# fine-tuning on a v5e-8: `selfalign plan` says so) [the preset's], VENV [.venv-tpu], PYTHON [python3],
# EXTRA_ARGS (more `selfalign run` flags) [].
#
# Several hosts (a pod slice such as v5litepod-32): every worker runs the same command; JAX finds the
# other hosts itself on a TPU pod (jax.distributed auto-detection), and only process 0 writes files.
# Copy the repository to every worker, then from your workstation:
#
#   gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all \
#     --command="cd selfalign-jax && MODEL=/mnt/models/llama SEEDS=seeds.jsonl RUN_DIR=/mnt/runs/x \
#                EXTRA_ARGS='--distributed' bash scripts/tpu_vm.sh"
#
# (The model directory, the seeds and RUN_DIR must be at the same path on every worker, e.g. a shared disk;
# only process 0 writes, the others read what it wrote.)
set -euo pipefail

cd "$(dirname "$0")/.."
: "${MODEL:?set MODEL to a Hugging Face model directory}"
: "${SEEDS:?set SEEDS to a seeds JSONL file}"
RUN_DIR=${RUN_DIR:-runs/tpu}
CONFIG=${CONFIG:-configs/tpu-v5e-8.json}
VENV=${VENV:-.venv-tpu}
PYTHON=${PYTHON:-python3}
EXTRA_ARGS=${EXTRA_ARGS:-}
PLAN_LORA=() RUN_LORA=()
if [ -n "${LORA_RANK:-}" ]; then PLAN_LORA=(--lora-rank "$LORA_RANK"); RUN_LORA=(--sft.lora-rank "$LORA_RANK"); fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --upgrade pip
fi
# the [tpu] extra pins jax[tpu] to our JAX, which brings the matching libtpu
"$VENV/bin/pip" install -e ".[tpu]"

# device check: fail plainly when the TPU is missing or JAX fell back to the CPU
"$VENV/bin/python" - <<'EOF'
import sys
import jax
devs = jax.devices()
kind = devs[0].platform
print(f"JAX {jax.__version__}: {len(devs)} {kind} device(s): {devs[0].device_kind}; "
      f"{jax.process_count()} process(es)")
if kind != "tpu":
    sys.exit("no TPU: JAX runs on the CPU (is libtpu installed, or is another process holding the TPU?)")
EOF

# memory plan before anything compiles (exit 2 with the change to make when it does not fit)
"$VENV/bin/selfalign" plan --model "$MODEL" --config "$CONFIG" "${PLAN_LORA[@]}"

# shellcheck disable=SC2086
"$VENV/bin/selfalign" run --model "$MODEL" --seeds "$SEEDS" --run-dir "$RUN_DIR" --config "$CONFIG" "${RUN_LORA[@]}" $EXTRA_ARGS
echo "report: $RUN_DIR/report.md"
