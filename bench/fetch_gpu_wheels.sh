#!/usr/bin/env bash
# Downloads (here, with network) the wheels that the lent GPU machine lacks into .whl/ (git-ignored),
# for bench/gpu_check.sh. That machine has Python 3.12 with CUDA jax, flax, optax, orbax, opencv,
# timm and torch, but not grain, array-record, ml-collections or portpicker.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  grain==0.2.18 array-record==0.8.6 ml-collections==1.1.0 portpicker==1.6.0
ls -la .whl
