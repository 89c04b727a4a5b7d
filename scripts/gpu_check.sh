#!/usr/bin/env bash
# The GPU check: one command on a bare GPU machine (Python, torch, triton, nvcc, ninja, pybind11, pytest;
# pytest-xdist and pytest-timeout used when present; no package registry) that ends within 480 s:
#
#   bash scripts/gpu_check.sh              # OUT=DIR to choose where the results go (default build/gpu-check)
#   bash scripts/gpu_check.sh --dry-run    # the same flow without CUDA: skips, tiny sizes, the same files (CI)
#
# Phases, each with its own time budget (seconds, overridable by the variable named):
#   env      toolchain and device checks, in the background            GPU_CHECK_ENV_S     60
#   build    fastdiff._C with the CUDA kernels on every core, in the
#            background, into build/gpu-check-ext, then moved into
#            fastdiff/ in one rename (the dry run only imports the
#            extension already built: it never rebuilds)                GPU_CHECK_BUILD_S   240
#   triton   tests/test_triton.py and the per-op files' triton cases on CUDA, started at once, beside
#            the build (pytest-xdist when present)                      GPU_CHECK_TRITON_S  150
#   cuda     the `gpu`-marked tests of every other file (the CUDA C++
#            kernels, CUDA graphs), after the build                     GPU_CHECK_CUDA_S    100
#   bench    the issues' speed targets at reduced repetitions:
#            fastdiff bench posterior step sample --targets-only
#            --brief (posterior d=2 and d=3072, affine_step bandwidth,
#            pointcloud_sample swiss roll, the MLP loop; then issue 4's
#            GPU comparisons while time is left)                        GPU_CHECK_BENCH_S   260
#   distributed  python -m fastdiff.bench.distributed --device cuda
#            --quick: the sharded point cloud on NCCL (one rank per
#            GPU; more ranks than GPUs are skipped with a note) and
#            the cloud streamed from a .npy through pinned buffers,
#            with CUDA-synchronised times and peak GPU memory (~30 s
#            on an H200; kept from the bench's time when the run is
#            short, see the bench phase below); the dry run: gloo on
#            the CPU, --smoke sizes, a 90 s default budget             GPU_CHECK_DISTRIBUTED_S 40
# and the whole run within GPU_CHECK_TOTAL_S (480). A phase over its budget gets SIGINT (pytest and the
# bench stop cleanly, print their summaries and write their files), then SIGKILL GPU_CHECK_GRACE_S (15) s
# later; a phase's budget is cut to what is left of the total less that grace and 5 s for the summary, and
# a phase with under 5 s left is not started. SIGINT or SIGTERM to this script passes SIGINT to the running
# phases, starts no other, writes the summary and exits 130 / 143.
#
# Writes into $OUT as it goes, so a kill at any moment leaves every finished result (8 files, at most what a
# lent machine returns: so the phases after the build share one log, and the benches write JSON alone):
#   summary.txt         one screen: each phase's status and counts, failed tests, the targets measured,
#                       the measured backend order (rewritten atomically whenever a phase starts or ends,
#                       by scripts/gpu_check_summary.py from the files below)
#   env.txt             nvidia-smi, versions, toolchain checks, a Triton JIT check
#   build.log           the build, then what fastdiff._C was built with (`fastdiff info`)
#   phases.log          the output of the triton, cuda, bench and distributed phases, each after a line
#                       '=== gpu_check phase NAME: ...' (pytest -v line by line; the benches' progress)
#   triton.xml cuda.xml junit XML of each pytest phase (written when pytest ends, also on SIGINT)
#   bench/results.json  every measurement, the targets and the backend order (rewritten after every case;
#                       `python -m fastdiff.bench.report DIR` writes the CSV, report and plots from it)
#   distributed/results.json  the sharded and streamed rows, each marked with its device (rewritten after each
#                       rank count and streamed case; `python -m fastdiff.bench.distributed --report DIR`
#                       writes report.md, `--readme README.md --results CPU_DIR GPU_DIR` the README's tables)
# Exit status: 0 when every phase passed, 1 when one failed or ran out of time, 130 / 143 when interrupted.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$arg' (use --dry-run or --help)" >&2; exit 2 ;;
    esac
done

OUT=${OUT:-build/gpu-check}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || { echo "gpu_check.sh: cannot create OUT=$OUT" >&2; exit 2; }
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"    # the checkout's fastdiff, installed or not
if [ "$DRY" = 1 ]; then
    export CUDA_VISIBLE_DEVICES=""                      # the dry run never touches a GPU, even where one exists
fi

TOTAL=${GPU_CHECK_TOTAL_S:-480}
GRACE=${GPU_CHECK_GRACE_S:-15}
RESERVE=5                                               # seconds kept for the last summary
NCPU=$(nproc 2>/dev/null || echo 2)
START=$SECONDS
INTERRUPTED=""

PHASES=(env build triton cuda bench distributed)
declare -A STATUS SECS DETAIL NOTE T0 PID              # per phase; PID: its `timeout` process
for p in "${PHASES[@]}"; do STATUS[$p]=pending; SECS[$p]=""; DETAIL[$p]=""; NOTE[$p]=""; PID[$p]=""; done

# ------------------------------------------------------------------------------------------- summary
write_summary() {
    local table="" p
    for p in "${PHASES[@]}"; do
        table+="$p|${STATUS[$p]}|${SECS[$p]}|${DETAIL[$p]}"$'\n'
    done
    GC_TABLE="$table" GC_ELAPSED=$((SECONDS - START)) GC_TOTAL=$TOTAL GC_DRY=$DRY GC_INTERRUPTED=$INTERRUPTED \
        GC_ROOT=$ROOT "$PY" "$ROOT/scripts/gpu_check_summary.py" "$OUT" || echo "gpu_check.sh: could not write summary.txt" >&2
}

# ------------------------------------------------------------------------------------------- phases
# seconds a phase may still be given: its SIGKILL (limit + grace) must come before the total runs out
left() { echo $(( TOTAL - RESERVE - GRACE - (SECONDS - START) )); }

# start_phase NAME BUDGET LOG NOTE CMD...: runs CMD in the background under `timeout` (SIGINT at the limit,
# SIGKILL GRACE seconds later), output appended to LOG; the limit is the budget or what is left of the total.
# NOTE goes into the phase's summary line when it ends.
start_phase() {
    local name=$1 budget=$2 log=$3 note=$4; shift 4
    local limit room; limit=$(left); room=$limit
    [ "$budget" -lt "$limit" ] && limit=$budget
    if [ -n "$INTERRUPTED" ] || [ "$room" -lt 5 ] || [ "$limit" -lt 1 ]; then
        STATUS[$name]=skipped
        DETAIL[$name]=$([ -n "$INTERRUPTED" ] && echo "not started: interrupted" || echo "not started: no time left")
        PID[$name]=""
        write_summary
        return 1
    fi
    T0[$name]=$SECONDS
    STATUS[$name]=running
    DETAIL[$name]="limit ${limit} s"
    NOTE[$name]=$note
    timeout --signal=INT --kill-after="$GRACE" "$limit" "$@" >> "$log" 2>&1 &
    PID[$name]=$!
    write_summary
    echo "[$(( SECONDS - START ))s] $name: started (limit $limit s)"
}

# record_end NAME RC: the status, time and summary line of a phase that has ended.
record_end() {
    local name=$1 rc=$2 note=${NOTE[$1]}
    SECS[$name]=$(( SECONDS - ${T0[$name]} ))
    case "$rc" in
        0) STATUS[$name]=ok ;;
        124) STATUS[$name]="time limit" ;;
        137) STATUS[$name]=killed ;;
        *) STATUS[$name]=$([ -n "$INTERRUPTED" ] && echo interrupted || echo "FAILED") ;;
    esac
    [ "$name" = env ] && note="$(grep -c -e MISSING -e WRONG "$OUT/env.txt" 2>/dev/null) problem(s)${note:+ ($note)}"
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        note="${DETAIL[$name]} reached${note:+; $note}"
    elif [ "$rc" != 0 ]; then
        note="exit $rc${note:+; $note}"
    fi
    DETAIL[$name]=$note
    write_summary
    echo "[$(( SECONDS - START ))s] $name: ${STATUS[$name]} after ${SECS[$name]} s${note:+ ($note)}"
}

# reap: record every running phase whose process has ended (bash reaps its children as they exit, so
# kill -0 fails from then on and `wait` returns the stored status).
reap() {
    local p pid rc
    for p in "${PHASES[@]}"; do
        pid=${PID[$p]:-}
        [ -n "$pid" ] && [ "${STATUS[$p]}" = running ] || continue
        kill -0 "$pid" 2>/dev/null && continue
        wait "$pid" 2>/dev/null; rc=$?
        record_end "$p" "$rc"
    done
}

# finish_phase NAME: waits until the phase has ended, recording the others as they end meanwhile (so each
# time is its own and the summary follows the run). Polls: a trapped signal is handled within half a second.
finish_phase() {
    [ -z "${PID[$1]:-}" ] && return 0
    while [ "${STATUS[$1]}" = running ]; do
        reap
        [ "${STATUS[$1]}" = running ] && sleep 0.5
    done
    return 0
}

on_signal() {
    INTERRUPTED=$1
    local p pid
    for p in "${PHASES[@]}"; do
        pid=${PID[$p]:-}
        [ "${STATUS[$p]}" = running ] && [ -n "$pid" ] && kill -INT "$pid" 2>/dev/null   # timeout passes it on
    done
}
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM

have() { "$PY" -c "import $1" >/dev/null 2>&1; }
XDIST=()
if [ "$NCPU" -ge 4 ] && have xdist; then
    n=$(( NCPU / 2 )); [ "$n" -gt 8 ] && n=8
    XDIST=(-n "$n")
fi
PT_TIMEOUT=()
have pytest_timeout && PT_TIMEOUT=(--timeout=120)       # one hung test fails alone instead of eating the phase

# -------------------------------------------------------------------------- env (background)
env_check() {
    echo "gpu_check.sh $([ "$DRY" = 1 ] && echo --dry-run) at $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $NCPU CPU cores"
    if [ "$DRY" = 1 ]; then
        echo "dry run: CUDA_VISIBLE_DEVICES is empty; nothing touches a GPU"
    else
        nvidia-smi || echo "nvidia-smi: MISSING"
    fi
    command -v nvcc >/dev/null && nvcc --version | tail -2
    # what the build and Triton's JIT need (no registry to fetch them from): setuptools, a C compiler and
    # Python.h (Triton compiles its launcher on first use), nvcc, ninja, pybind11; then one real Triton kernel
    # The probe runs from a file: Triton reads a kernel's source with inspect, which fails for stdin.
    local probe rc
    probe=$(mktemp --suffix=.py) || return 1
    cat > "$probe" <<'PYEOF'
import importlib.util, os, platform, shutil, sysconfig
import torch
dry = os.environ["GC_DRY"] == "1"
dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU only)"
try:
    import triton
    tv = triton.__version__
except Exception as exc:
    triton, tv = None, f"MISSING ({exc})"
print(f"device: {dev}")
print(f"versions: python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {tv}")
for mod in ("setuptools", "ninja", "pybind11", "pytest", "xdist", "pytest_timeout", "numpy"):
    print(f"{mod}: {'ok' if importlib.util.find_spec(mod) else ('absent' if mod in ('xdist', 'pytest_timeout') else 'MISSING')}")
print("cc:", shutil.which("gcc") or shutil.which("cc") or "MISSING", " nvcc:", shutil.which("nvcc") or "MISSING")
print("Python.h:", "ok" if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else "MISSING")
if not dry:
    if not torch.cuda.is_available():
        print("CUDA: MISSING (torch sees no device)")
    elif triton is not None:
        import triton.language as tl

        @triton.jit
        def _twice(x_ptr, n, B: tl.constexpr):
            i = tl.program_id(0) * B + tl.arange(0, B)
            tl.store(x_ptr + i, 2 * tl.load(x_ptr + i, mask=i < n), mask=i < n)
        x = torch.arange(1000, device="cuda", dtype=torch.float32)
        _twice[(4,)](x, 1000, B=256)
        ok = bool((x == 2 * torch.arange(1000, device="cuda")).all())
        print("triton JIT on the GPU:", "ok" if ok else "WRONG")
PYEOF
    GC_DRY=$DRY "$PY" "$probe"; rc=$?
    rm -f "$probe"
    return $rc
}
export -f env_check 2>/dev/null
export DRY PY NCPU
start_phase env "${GPU_CHECK_ENV_S:-60}" "$OUT/env.txt" "env.txt" bash -c env_check

# -------------------------------------------------------------------------- build (background)
BUILD_DIR=$ROOT/build/gpu-check-ext
build_ext() {
    if [ "$DRY" = 1 ]; then
        # CI built the extension already: import it, never rebuild it (a rebuild would replace the .so
        # other processes may have loaded)
        "$PY" -c "import fastdiff._C as m; print('dry run: no build; using', m.__file__)" || exit 3
    else
        FASTDIFF_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-$NCPU} "$PY" setup.py build_ext \
            --build-lib "$BUILD_DIR/lib" --build-temp "$BUILD_DIR/temp" || exit 1
        so=$(ls "$BUILD_DIR"/lib/fastdiff/_C*.so) || exit 1
        # one rename: a test process importing fastdiff._C sees the old file or the whole new one
        cp "$so" "fastdiff/.$(basename "$so").tmp" && mv -f "fastdiff/.$(basename "$so").tmp" "fastdiff/$(basename "$so")" \
            || exit 1
        echo "installed fastdiff/$(basename "$so")"
    fi
    echo "--- fastdiff info"
    "$PY" -m fastdiff info
}
export -f build_ext 2>/dev/null
export BUILD_DIR
start_phase build "${GPU_CHECK_BUILD_S:-240}" "$OUT/build.log" "build.log" bash -c build_ext

# -------------------------------------------------------------------------- triton tests (now)
pytest_phase() {
    local name=$1 budget=$2; shift 2
    echo "=== gpu_check phase $name: pytest $*" >> "$OUT/phases.log"
    start_phase "$name" "$budget" "$OUT/phases.log" "" "$PY" -m pytest -v -rfEs -p no:cacheprovider \
        "${XDIST[@]}" "${PT_TIMEOUT[@]}" --junitxml="$OUT/$name.xml" "$@"
}
if [ "$DRY" = 1 ]; then
    TRITON_SEL=(-m gpu)            # without CUDA every gpu test skips: the flow runs, nothing is measured
else
    TRITON_SEL=()
fi
# the Triton-only tests, and the Triton cases of the per-op files (each parametrised over every backend; their
# triton ids carry "triton"); they need no extension, so they run while it builds
PER_OP=(tests/test_posterior.py tests/test_affine_step.py tests/test_pointcloud_step.py tests/test_pointcloud_sample.py)
PER_OP_TRITON="triton and (test_posterior.py or test_affine_step.py or test_pointcloud_step.py or test_pointcloud_sample.py)"
pytest_phase triton "${GPU_CHECK_TRITON_S:-150}" tests/test_triton.py "${PER_OP[@]}" -k "test_triton.py or ($PER_OP_TRITON)" \
    "${TRITON_SEL[@]}"
finish_phase triton
finish_phase env
[ "${STATUS[build]}" = running ] && echo "[$(( SECONDS - START ))s] waiting for the build"
finish_phase build

# -------------------------------------------------------------------------- cuda tests
pytest_phase cuda "${GPU_CHECK_CUDA_S:-100}" -m gpu tests --ignore=tests/test_triton.py -k "not ($PER_OP_TRITON)"
finish_phase cuda

# -------------------------------------------------------------------------- bench targets
if [ "$DRY" = 1 ]; then
    BENCH_ARGS=(--device cpu --quick)
else
    BENCH_ARGS=(--device cuda)
fi
# The distributed phase's time comes out of the bench's only when the run is short of time. The bench takes its
# whole budget when what is left of the total also holds the distributed budget after it (the usual case: on the
# H200, 3448f58, the phases before the bench took 95 s, leaving 365 s for bench 260 + distributed 40); otherwise
# the bench's limit is cut so that the distributed budget stays, as long as the bench keeps 60 s: its targets
# come first, and below that the distributed phase gets only what the bench leaves. (A bench that also needs its
# grace period leaves the distributed phase up to GRACE seconds less.) The dry run gives the distributed phase a
# longer default budget: on a shared CI machine process start-up dominates (two spawned rank groups and a fresh
# process per streamed case, ~15 s on 2 idle cores).
DIST_BUDGET=${GPU_CHECK_DISTRIBUTED_S:-$([ "$DRY" = 1 ] && echo 90 || echo 40)}
budget=${GPU_CHECK_BENCH_S:-260}
limit=$(left); [ $(( limit - DIST_BUDGET )) -ge 60 ] && limit=$(( limit - DIST_BUDGET ))
[ "$budget" -lt "$limit" ] && limit=$budget
# stop starting cases a minute before the limit (one case can take that long); SIGINT at the limit still
# writes results.json with what was measured
soft=$(( limit > 90 ? limit - 60 : limit / 2 )); [ "$soft" -lt 1 ] && soft=1
echo "=== gpu_check phase bench: fastdiff bench posterior step sample ${BENCH_ARGS[*]}" >> "$OUT/phases.log"
start_phase bench "$limit" "$OUT/phases.log" "bench/results.json" "$PY" -m fastdiff.bench posterior step sample \
    "${BENCH_ARGS[@]}" --targets-only --brief --json-only --time-limit "$soft" --out "$OUT/bench"
finish_phase bench

# -------------------------------------------------------------------------- distributed bench
# A GPU row for the README's distributed tables (issue 16): NCCL with one rank per GPU (a 1-GPU machine runs
# ranks=1 and notes that 2 was not run), the streamed cloud through pinned buffers. The dry run: the same
# command on gloo CPU ranks at --smoke sizes.
if [ "$DRY" = 1 ]; then
    DIST_ARGS=(--device cpu --smoke)
else
    DIST_ARGS=(--device cuda --quick)
fi
limit=$(left); [ "$DIST_BUDGET" -lt "$limit" ] && limit=$DIST_BUDGET
soft=$(( limit > 24 ? limit - 12 : limit / 2 )); [ "$soft" -lt 1 ] && soft=1     # start no case after this
echo "=== gpu_check phase distributed: fastdiff.bench.distributed ${DIST_ARGS[*]}" >> "$OUT/phases.log"
start_phase distributed "$limit" "$OUT/phases.log" "distributed/results.json" "$PY" -m fastdiff.bench.distributed \
    "${DIST_ARGS[@]}" --ranks 1,2 --json-only --time-limit "$soft" --out "$OUT/distributed"
finish_phase distributed

write_summary
cat "$OUT/summary.txt"
if [ -n "$INTERRUPTED" ]; then
    [ "$INTERRUPTED" = TERM ] && exit 143
    exit 130
fi
for p in "${PHASES[@]}"; do
    case "${STATUS[$p]}" in ok) ;; *) exit 1 ;; esac
done
exit 0
