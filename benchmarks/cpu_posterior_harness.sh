#!/usr/bin/env bash
# Old vs new single-thread timing of the CPU posterior kernel, independent of machine load (thread CPU time).
#   benchmarks/cpu_posterior_harness.sh [REV]    REV: the git revision to compare against (default HEAD)
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${1:-HEAD}
tmp=$(mktemp -d)
git archive "$rev" csrc | tar -x -C "$tmp"      # the kernel and its headers as of REV
flags="-O3 -std=c++20 -fopenmp -fno-trapping-math -fno-math-errno -fno-wrapv -march=${FASTDIFF_CPU_ARCH-native}"
case "$(uname -m)" in x86_64|amd64) flags="$flags -mprefer-vector-width=512" ;; esac   # as setup.py builds
g++ $flags -DPOSTERIOR_SRC="\"$tmp/csrc/cpu/posterior.cpp\"" benchmarks/cpu_posterior_harness.cpp -o "$tmp/old"
g++ $flags -DPOSTERIOR_SRC="\"$PWD/csrc/cpu/posterior.cpp\"" benchmarks/cpu_posterior_harness.cpp -o "$tmp/new"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
# M: about one thread's share of the bench shapes (2 threads). Old and new alternate ROUNDS times; the
# minimum of each is kept (the load of other processes only ever adds time).
for shape in "2 256 16384" "5 256 8192" "8 256 8192" "16 256 8192" "64 1024 8192" "784 128 2048" "3072 64 1024"; do
  for bin in old new; do
    best=""
    for _ in $(seq "${ROUNDS:-3}"); do
      line=$("$tmp/$bin" $shape ${REPS:-3})
      ms=$(awk '{for (i = 1; i <= NF; i++) if ($i == "ms") print $(i - 1)}' <<<"$line")
      if [[ -z "$best" ]] || awk -v a="$ms" -v b="$best_ms" 'BEGIN { exit !(a < b) }'; then best=$line; best_ms=$ms; fi
    done
    printf '%-4s %s\n' "$bin" "$best"
  done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
rm -rf "$tmp"
