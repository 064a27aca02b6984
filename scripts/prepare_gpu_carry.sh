#!/usr/bin/env bash
# Prepare the git-ignored folders that travel to a lent GPU machine with scripts/gpu_check.sh:
#   .whl/   pure-Python wheels the GPU machine lacks (it has CuPy, numpy, pytest, torch)
#   data/fashion-mnist/   the dataset for the 1-epoch GPU training run (30 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl \
  array-api-compat array-api-strict hypothesis attrs sortedcontainers tqdm threadpoolctl
mkdir -p data/fashion-mnist
cp /usr/share/datasets/fashion-mnist/*.gz data/fashion-mnist/
du -sh .whl data
