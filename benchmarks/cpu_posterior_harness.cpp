// Standalone timing of the CPU posterior kernel (csrc/cpu/posterior.cpp), one thread, thread CPU time
// (CLOCK_THREAD_CPUTIME_ID, min over repeats) so that other load on the machine barely moves the numbers.
// Built by benchmarks/cpu_posterior_harness.sh against any version of the kernel source (old vs new).
// Prints: d M N  ms  ns/pair  GFLOP/s (4d flops per pair, the bench roofline's count)  checksum.
#include <omp.h>
#include <time.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include POSTERIOR_SRC

static double thread_seconds() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

static double normal(uint64_t& s) {          // Box–Muller on a 64-bit LCG: reproducible data, no <random> variance
  auto u = [&] { s = s * 6364136223846793005ULL + 1442695040888963407ULL; return ((s >> 11) + 0.5) * 0x1p-53; };
  const double a = u(), b = u();
  return std::sqrt(-2 * std::log(a)) * std::cos(6.283185307179586 * b);
}

// Revisions since the screened kernel also read the data row-major (Cloud::y); older ones have no such member.
template <typename C>
void set_rows(C& c, const float* y) {
  if constexpr (requires { c.y; }) c.y = y;
}

int main(int argc, char** argv) {
  if (argc < 5) { std::fprintf(stderr, "usage: %s d M N reps [sigma]\n", argv[0]); return 2; }
  const int64_t d = std::atoll(argv[1]), M = std::atoll(argv[2]), N = std::atoll(argv[3]);
  const int reps = std::atoi(argv[4]);
  const double sigma = argc > 5 ? std::atof(argv[5]) : 0.5, alpha = 0.9;
  omp_set_num_threads(1);
  uint64_t s = 12345 + d;
  std::vector<float> y(N * d), yT(d * N), x(M * d), D(M * d), L(M);
  for (auto& v : y) v = static_cast<float>(normal(s));
  for (int64_t j = 0; j < N; ++j)
    for (int64_t k = 0; k < d; ++k) yT[k * N + j] = y[j * d + k];
  for (int64_t i = 0; i < M; ++i)
    for (int64_t k = 0; k < d; ++k) x[i * d + k] = static_cast<float>(alpha * y[(i * 7 % N) * d + k] + sigma * normal(s));
  fastdiff::cpu::Cloud<float> c{yT.data(), nullptr, N, d, 0.0};
  set_rows(c, y.data());
  double best = 1e300;
  for (int r = 0; r < reps; ++r) {
    const double t0 = thread_seconds();
    fastdiff::cpu::posterior<float>(c, x.data(), M, &alpha, &sigma, false, D.data(), L.data());
    best = std::min(best, thread_seconds() - t0);
  }
  double sum = 0;
  for (int64_t i = 0; i < M; ++i) sum += L[i] + D[i * d];
  const double pairs = double(M) * N;
  std::printf("d=%-5lld M=%-5lld N=%-6lld %9.2f ms %8.3f ns/pair %7.2f GFLOP/s  check %.6e\n", (long long)d,
              (long long)M, (long long)N, best * 1e3, best * 1e9 / pairs, 4.0 * d * pairs / best * 1e-9, sum);
  return 0;
}
