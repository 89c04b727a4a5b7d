#!/usr/bin/env bash
# The committed full CPU run: every suite, written to benchmarks/results/<date>-cpu-<model>-<threads>t/
# (about 12-15 minutes with 2 threads on an idle 2-core machine, up to ~20 with 1 thread;
# `python -m fastdiff.bench --list` shows the cases).
#
# THREADS: the CPU targets of issue 4 are stated for two cores, so the default is 2 on an idle machine.
# With more OpenMP threads than idle cores every parallel region waits for a descheduled thread (a
# scheduler tick each: whole sampling runs then take minutes instead of seconds, and the timings measure
# the scheduler, not fastdiff), so when the 1-minute load average is 1 or more the default drops to 1
# and says so. Set THREADS=2 (or any count) to force it. The load average at the start and end of the
# run is recorded in results.json and report.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONUNBUFFERED=1
LOAD=$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo 0)
if [ -z "${THREADS:-}" ]; then
    if awk "BEGIN { exit !($LOAD < 1.0) }"; then
        THREADS=2
    else
        THREADS=1
        echo "run_cpu.sh: load average $LOAD: the machine is busy, running with 1 thread (THREADS=2 forces two)" >&2
    fi
fi
NAME="$(date +%Y%m%d)-cpu-$("$PY" -c 'from fastdiff.bench.timing import _cpu_model as m; from fastdiff.bench import _slug; print(_slug(m()))')-${THREADS}t"
uptime
OMP_NUM_THREADS="$THREADS" "$PY" -m fastdiff.bench all --device cpu --threads "$THREADS" --out "benchmarks/results/$NAME" "$@"
uptime
