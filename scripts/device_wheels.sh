#!/usr/bin/env bash
# Downloads into .device-wheels/ (ignored by git) what scripts/device_check.sh installs on the GPU machine, whose
# image (Python 3.12, JAX 0.11 + CUDA 13, torch, transformers, flax, optax, orbax, safetensors, tokenizers, numpy,
# matplotlib, pytest) lacks: tyro (with docstring-parser and typeguard), gguf, annoy, and typing-extensions (newer
# than typeguard needs, installed there only when the image's is older), at the versions of constraints.txt.
# annoy has no wheel: its source is fetched, and built here into a cp312 wheel when a python3.12 is at hand
# (else device_check.sh builds the source there). The folder stays under the 64 MiB a device call carries.
#
#   bash scripts/device_wheels.sh [DIR]        (default DIR: .device-wheels)
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.device-wheels}
mkdir -p "$dest"
pin() { grep -i "^$1==" constraints.txt | head -n 1; }
py=${PYTHON:-python3}
wheels=()
for name in tyro docstring-parser typeguard gguf typing-extensions; do
  spec=$(pin "$name")
  [ -n "$spec" ] || { echo "device_wheels: $name is not in constraints.txt" >&2; exit 2; }
  wheels+=("$spec")
done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform any -d "$dest" "${wheels[@]}"
annoy=$(pin annoy)
if ! ls "$dest"/annoy-*.whl >/dev/null 2>&1; then
  "$py" -m pip download -q --no-deps --no-binary=:all: -d "$dest" "$annoy"
  for py312 in "${PYTHON312:-}" python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
    if [ -n "$py312" ] && "$py312" -m pip --version >/dev/null 2>&1; then
      "$py312" -m pip wheel -q --no-deps -w "$dest" "$dest"/annoy-*.tar.gz && rm -f "$dest"/annoy-*.tar.gz
      break
    fi
  done
fi
ls -l "$dest"
total=$(du -sk "$dest" | cut -f1)
echo "device_wheels: $(ls "$dest" | wc -l) files, ${total} KiB in $dest"
[ "$total" -lt 65536 ] || { echo "device_wheels: over the 64 MiB a device call carries" >&2; exit 1; }
