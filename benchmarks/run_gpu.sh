#!/usr/bin/env bash
# The committed full GPU run (H100 / H200), in three parts, each its own process and run folder:
#
#   bash benchmarks/run_gpu.sh 1      # posterior              (~5 min on an H100)
#   bash benchmarks/run_gpu.sh 2      # step and sample        (~5 min)
#   bash benchmarks/run_gpu.sh 3      # scaling                (~3 min)
#   bash benchmarks/run_gpu.sh        # all three, one after the other
#
# Each part writes <dest>/<date>-cuda-<gpu>-<part>/ (results.json, results.csv, report.md, plots, run.log);
# <dest> is $BENCH_RESULTS, else $OUT when set (a lent GPU machine returns what is written under $OUT: run one
# part per command there, so that each command stays under its time limit and returns at most 6 files), else
# benchmarks/results. Copy the folders into benchmarks/results/ and run
#   python benchmarks/make_readme_perf.py --readme README.md
# A part stops starting new cases after $TIME_LIMIT seconds (default 420; set it higher where no 10-minute
# limit applies) and still writes its report; the cases that carry the issues' targets run first in every
# suite; a case still running 60 s after the limit is stopped (SIGTERM) and the report written, so a part
# ends within ~9 minutes. A crashed or killed part keeps results.json up to its last finished case:
# `python -m fastdiff.bench.report <folder>` rewrites its report.
# Needs torch with CUDA and triton. fastdiff runs from this checkout; when its fastdiff._C is missing or was
# built without CUDA kernels (a bare machine), it is built in place first (FASTDIFF_BUILD_CUDA=1, every core,
# at most 300 s, taken off the default time limit; build.log beside the parts), so each call stands alone;
# RUN_GPU_BUILD=0 skips that (the
# `cuda` backend is then skipped with a note). For the issues' targets alone, at reduced repetitions, within
# one 8-minute command: scripts/gpu_check.sh (README, "On a GPU machine").
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif command -v python3 >/dev/null && python3 -c 'import torch' 2>/dev/null; then PY=python3
else PY=python; fi
# the checkout comes first on the path (python -m from the repo root does the same): its fastdiff, and a
# carried fastdiff/_C*.so, are what runs
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
export PYTHONUNBUFFERED=1

DEST=${BENCH_RESULTS:-${OUT:-benchmarks/results}}
LIMIT=${TIME_LIMIT:-420}
PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && PARTS=(1 2 3)
if [ ${#PARTS[@]} -gt 1 ] && [ -n "${OUT:-}" ]; then
    echo "run_gpu.sh: ${#PARTS[@]} parts in one command take ~$(( ${#PARTS[@]} * (LIMIT + 60) / 60 )) min; on a lent" \
         "machine (10 minutes a command) run one part per command" >&2
fi

# one interpreter start for every check: CUDA visible, the GPU's name for the folder, what fastdiff has
GPU=$("$PY" - <<'PYEOF'
import contextlib, sys, torch
if not torch.cuda.is_available():
    sys.exit("run_gpu.sh: torch sees no CUDA device")
from fastdiff.bench import _slug
from fastdiff.cli import main
with contextlib.redirect_stdout(sys.stderr):     # backends and build config; $GPU stays one word
    main(["info"])
print(_slug(torch.cuda.get_device_name(0)))
PYEOF
) || exit 2
STAMP=$(date +%Y%m%d-%H%M)
has_cuda_ext() {
    "$PY" -c 'import sys; from fastdiff import _backend; c = _backend.build_config(); sys.exit(0 if c and c["cuda"] else 1)' \
        2>/dev/null
}
if [ "${RUN_GPU_BUILD:-1}" != 0 ] && ! has_cuda_ext; then
    mkdir -p "$DEST"
    echo "== building fastdiff._C with the CUDA kernels (log: $DEST/build.log)"
    t_build=$SECONDS
    FASTDIFF_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} timeout --signal=INT --kill-after=10 300 \
        "$PY" setup.py build_ext --inplace > "$DEST/build.log" 2>&1 \
        || echo "run_gpu.sh: the build failed (see $DEST/build.log); the cuda backend will be skipped" >&2
    if [ -z "${TIME_LIMIT:-}" ]; then          # the default limit keeps a part within a 10-minute command
        LIMIT=$(( LIMIT - (SECONDS - t_build) )); [ "$LIMIT" -lt 60 ] && LIMIT=60
    fi
fi
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv 2>/dev/null || true

status=0
for part in "${PARTS[@]}"; do
    case "$part" in
        1|posterior) suites="posterior"; tag=posterior ;;
        2|step|sample) suites="step sample"; tag=step-sample ;;
        3|scaling) suites="scaling"; tag=scaling ;;
        *) echo "run_gpu.sh: unknown part '$part' (1, 2, 3)" >&2; exit 2 ;;
    esac
    out="$DEST/$STAMP-cuda-$GPU-$tag"
    mkdir -p "$out"
    echo "== part $part: $suites -> $out (time limit $LIMIT s)"
    # TERM (turned into a clean stop that writes the report) 60 s after the time limit, KILL 10 s later:
    # with the default limit both come well before a lent machine's 10-minute limit per command
    timeout --signal=TERM --kill-after=10 $((LIMIT + 60)) \
        "$PY" -m fastdiff.bench $suites --device cuda --time-limit "$LIMIT" --out "$out" 2>&1 | tee "$out/run.log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then
        echo "run_gpu.sh: part $part exited with $rc; rewriting its report from results.json" >&2
        "$PY" -m fastdiff.bench.report "$out" 2>&1 | tail -3 || true
        status=$rc
    fi
done
exit $status
