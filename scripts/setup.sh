#!/usr/bin/env bash
# Set up a checkout: a .venv with xpcnn (editable) and its test tools, and Debian's
# Fashion-MNIST (the offline dataset) when apt-get is available.
#   bash scripts/setup.sh              # CPU
#   XPCNN_EXTRAS=dev,gpu bash scripts/setup.sh   # also CuPy (CUDA 12 wheel; see README for CUDA 13)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  sudo_cmd=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo_cmd="sudo"; else sudo_cmd="skip"; fi
  fi
  if [ "$sudo_cmd" = skip ]; then
    echo "setup: not root and no sudo: skipping 'apt-get install dataset-fashion-mnist' (use --data-dir or --dataset mnist --download)" >&2
  else
    echo "setup: installing Debian's dataset-fashion-mnist ..." >&2
    { $sudo_cmd apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null; } \
      || echo "setup: could not install dataset-fashion-mnist (use --data-dir or --dataset mnist --download)" >&2
  fi
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($python --version 2>&1) ..." >&2
  "$python" -m venv .venv
fi
echo "setup: installing xpcnn[${XPCNN_EXTRAS:-dev}] into .venv ..." >&2
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[${XPCNN_EXTRAS:-dev}]"
echo "setup: done (.venv/bin/xpcnn, .venv/bin/python -m pytest)" >&2
