#!/usr/bin/env bash
# Everything that needs a GPU except the benchmarks, in one command that ends within ~9 minutes on an
# H100 (a lent machine allows 10 per command): checks that the machine can build and JIT, builds
# fastdiff._C with the CUDA kernels, runs the kernel tests on CUDA, then the rest of the suite.
#
#   bash scripts/gpu_check.sh
#
# Writes four files to ${OUT:-gpu-check}/ (a lent machine returns at most 8):
#   env.txt        nvidia-smi, versions, the toolchain checks, `fastdiff info`
#   build.log      the build
#   tests.log      pytest: tests/test_triton.py, test_kernels.py, test_graphs.py on CUDA, then the rest
#   _C.so          the built extension, debug info stripped (~3 MB): carry it into the benchmark calls as
#                  fastdiff/_C.<python tag>.so (python3 -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
#                  so that they need no build; benchmarks/run_gpu.sh 1, 2, 3 then take one call each.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
START=$SECONDS

{
  nvidia-smi || true
  # what the build and Triton's JIT need: setuptools/wheel (no network to fetch them), a C compiler and
  # Python.h (Triton compiles its launcher on first use), nvcc, and one real Triton kernel
  "$PY" - <<'PYEOF'
import importlib.util, os, shutil, sysconfig, torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "device", torch.cuda.get_device_name(0))
for mod in ("setuptools", "wheel", "ninja", "pybind11", "pytest", "triton"):
    print(f"{mod}: {'ok' if importlib.util.find_spec(mod) else 'MISSING'}")
print("cc:", shutil.which("gcc") or shutil.which("cc") or "MISSING", " nvcc:", shutil.which("nvcc") or "MISSING")
print("Python.h:", "ok" if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else "MISSING")
import triton, triton.language as tl
@triton.jit
def _twice(x_ptr, n, B: tl.constexpr):
    i = tl.program_id(0) * B + tl.arange(0, B)
    tl.store(x_ptr + i, 2 * tl.load(x_ptr + i, mask=i < n), mask=i < n)
x = torch.arange(1000, device="cuda", dtype=torch.float32)
_twice[(4,)](x, 1000, B=256)
print("triton", triton.__version__, "JIT:", "ok" if bool((x == 2 * torch.arange(1000, device="cuda")).all()) else "WRONG")
PYEOF
} > "$OUT/env.txt" 2>&1
echo "env checks: $(grep -c -e MISSING -e WRONG "$OUT/env.txt") problem(s), see env.txt"

FASTDIFF_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} timeout --kill-after=10 300 \
  "$PY" -m pip install -q --no-build-isolation --no-deps -e . \
  > "$OUT/build.log" 2>&1 || { echo "build failed or timed out, see build.log"; tail -30 "$OUT/build.log"; exit 1; }
echo "built in $((SECONDS - START)) s"
"$PY" -m fastdiff info >> "$OUT/env.txt" 2>&1
SO=$("$PY" -c 'import fastdiff._C as m; print(m.__file__)') && strip --strip-debug -o "$OUT/_C.so" "$SO" 2>/dev/null \
  || cp "$SO" "$OUT/_C.so"

# the kernel test files in full (with a GPU, test_triton runs every case compiled on CUDA), then the rest;
# each bounded so that the command returns with its logs
KT=$(( 540 - (SECONDS - START) )); [ "$KT" -gt 300 ] && KT=300
timeout --kill-after=10 "$KT" "$PY" -m pytest -q -rs tests/test_triton.py tests/test_kernels.py tests/test_graphs.py \
  > "$OUT/tests.log" 2>&1
echo "kernel tests exit $? after $((SECONDS - START)) s: $(tail -1 "$OUT/tests.log")"
LEFT=$(( 540 - (SECONDS - START) ))
if [ "$LEFT" -gt 30 ]; then
  timeout --kill-after=10 "$LEFT" "$PY" -m pytest -q -rs tests --ignore=tests/test_triton.py \
    --ignore=tests/test_kernels.py --ignore=tests/test_graphs.py >> "$OUT/tests.log" 2>&1
  echo "other tests exit $? after $((SECONDS - START)) s: $(tail -1 "$OUT/tests.log")"
else
  echo "other tests not run: $LEFT s left" | tee -a "$OUT/tests.log"
fi
