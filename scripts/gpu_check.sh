#!/usr/bin/env bash
# One prepared command for a lent GPU machine (CuPy 14, numpy, pytest, torch; no
# array-api-compat). Prepare the carried folders here first: bash scripts/prepare_gpu_carry.sh
# Then run, with .whl and data carried:   bash scripts/gpu_check.sh
# Everything goes to $OUT (default ./gpu-check-out): logs, bench JSON and a summary.
# Target: under 5 minutes on an H100. Each phase runs even if an earlier one failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
summary="$OUT/summary.txt"
: > "$summary"
status=0

phase() {  # phase NAME COMMAND...: run, log to $OUT/NAME.log, record rc and seconds
  local name=$1; shift
  local start=$(date +%s)
  echo "== $name: $*" | tee -a "$summary"
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local secs=$(( $(date +%s) - start ))
  tail -n 5 "$OUT/$name.log" | sed 's/^/   /' | tee -a "$summary"
  echo "   -> rc=$rc in ${secs}s" | tee -a "$summary"
  [ $rc -eq 0 ] || status=1
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  python3 -c "import sys, numpy, cupy; print('python', sys.version.split()[0], 'numpy', numpy.__version__, 'cupy', cupy.__version__, 'cuda runtime', cupy.cuda.runtime.runtimeGetVersion())" 2>&1
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1
} | tee -a "$summary"

if compgen -G ".whl/*.whl" > /dev/null; then
  phase wheels python3 -m pip install -q --no-deps --no-index .whl/*.whl
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
phase tests python3 -m pytest -q -ra -m "not slow" -p no:cacheprovider tests
phase equivalence python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu.py
data_args=()
[ -d data/fashion-mnist ] && data_args=(--data-dir data/fashion-mnist)
phase train_gpu python3 -m xpcnn.cli train --backend gpu --dataset fashion-mnist "${data_args[@]}" \
  --epochs 1 --quiet --no-plots --out "$OUT/run-gpu"
if [ -f scripts/bench.py ]; then
  phase bench_gpu python3 scripts/bench.py --backend gpu --json "$OUT/bench-gpu.json"
fi
# PyTorch on CUDA (issue 12): agreement with NumPy and checkpoints across backends, one
# epoch with --backend torch:cuda, and xpcnn-on-torch against torch eager.
if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  phase equivalence_torch python3 -m pytest -q -s -p no:cacheprovider tests/test_torch_backend.py \
    -k "whole_steps or trainer_on_torch or checkpoint_moves"
  phase train_torch_cuda python3 -m xpcnn.cli train --backend torch:cuda --dataset fashion-mnist "${data_args[@]}" \
    --epochs 1 --quiet --no-plots --out "$OUT/run-torch-cuda"
  phase evaluate_torch_on_numpy python3 -m xpcnn.cli evaluate "$OUT/run-torch-cuda/checkpoint.npz" --backend cpu \
    "${data_args[@]}"
  phase bench_torch_cuda python3 scripts/bench.py --backend torch:cuda --json "$OUT/bench-torch-cuda.json"
fi
echo "overall: $([ $status -eq 0 ] && echo PASS || echo FAIL)" | tee -a "$summary"
exit $status
