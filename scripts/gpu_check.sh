#!/usr/bin/env bash
# Everything that needs a GPU, in one go (for a session lent an H100/H200): build the extension for the
# machine's torch, run the GPU-marked tests (CUDA C++ and Triton kernels at full size, graph capture),
# then the full GPU benchmark run. Logs and results go to ${OUT:-gpu-check}/.
# Usage: bash scripts/gpu_check.sh [--no-bench]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python}
{
  nvidia-smi || true
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
} > "$OUT/env.txt" 2>&1
FASTDIFF_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} "$PY" -m pip install -q --no-build-isolation --no-deps -e . \
  > "$OUT/build.log" 2>&1 || { echo "build failed, see $OUT/build.log"; tail -30 "$OUT/build.log"; exit 1; }
"$PY" -m fastdiff info > "$OUT/info.txt" 2>&1
# the kernel test files in full (with a GPU, test_triton runs every case on CUDA, not the interpreter),
# then every other GPU-marked test
"$PY" -m pytest -q -rs tests/test_triton.py tests/test_kernels.py tests/test_graphs.py > "$OUT/gpu-tests.log" 2>&1
echo "kernel tests exit $?: $(tail -1 "$OUT/gpu-tests.log")"
"$PY" -m pytest -q -m gpu -rs tests >> "$OUT/gpu-tests.log" 2>&1
echo "gpu tests exit $?: $(tail -1 "$OUT/gpu-tests.log")"
if [ "${1:-}" != "--no-bench" ]; then
  bash benchmarks/run_gpu.sh > "$OUT/bench.log" 2>&1
  echo "bench exit $?"
  cp -r benchmarks/results "$OUT/" 2>/dev/null || true
fi
