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
# A part stops starting new cases after $TIME_LIMIT seconds (default 480; set it higher where no 10-minute
# limit applies) and still writes its report; the cases that carry the issues' targets run first in every
# suite; a case still running 90 s after the limit is stopped (SIGTERM) and the report written. A crashed or killed part keeps
# results.json up to its last finished case: `python -m fastdiff.bench.report <folder>` rewrites its report.
# Needs torch with CUDA; fastdiff importable (pip install --no-build-isolation -e . builds fastdiff._C with
# the CUDA kernels; without it the `cuda` backend is skipped with a note) and triton for the Triton backend.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif command -v python3 >/dev/null && python3 -c 'import torch' 2>/dev/null; then PY=python3
else PY=python; fi
if ! "$PY" -c 'import fastdiff' 2>/dev/null; then
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1

DEST=${BENCH_RESULTS:-${OUT:-benchmarks/results}}
LIMIT=${TIME_LIMIT:-480}
PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && PARTS=(1 2 3)

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "run_gpu.sh: torch sees no CUDA device ($PY)" >&2
    exit 2
fi
GPU=$("$PY" -c 'import torch; from fastdiff.bench import _slug; print(_slug(torch.cuda.get_device_name(0)))') || exit 2
STAMP=$(date +%Y%m%d-%H%M)
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv 2>/dev/null || true
"$PY" -m fastdiff info 2>&1 || true

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
    # TERM (turned into a clean stop that writes the report) 90 s after the time limit, KILL 20 s later:
    # with the default limit both come before a lent machine's 10-minute limit per command
    timeout --signal=TERM --kill-after=20 $((LIMIT + 90)) \
        "$PY" -m fastdiff.bench $suites --device cuda --time-limit "$LIMIT" --out "$out" 2>&1 | tee "$out/run.log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then
        echo "run_gpu.sh: part $part exited with $rc; rewriting its report from results.json" >&2
        "$PY" -m fastdiff.bench.report "$out" 2>&1 | tail -3 || true
        status=$rc
    fi
done
exit $status
