// Throughput of the three AVX-512 dot-product instructions the CPU posterior's screen could use, on this CPU: the
// float FMA (VFMADD231PS, 16 multiply-adds), the bf16 pair dot (VDPBF16PS, 32) and the byte dot (VPDPBUSD, 64).
// Why the int8 engine (csrc/cpu/posterior_amx.h, int8_sweep) and not a bf16 one where AMX is not in use: on
// Sapphire Rapids VDPBF16PS issues one every ~2 cycles, VPDPBUSD and the FMA two a cycle.
//   g++ -O2 -march=native benchmarks/dot_product_rates.cpp -o /tmp/dot_rates && /tmp/dot_rates
// (needs AVX512-BF16 and AVX512-VNNI: Cooper Lake, Sapphire Rapids, Zen 4 and later). 16 independent accumulator
// chains per loop, so the rate, not the latency, is measured; ns per instruction, then multiply-adds per ns.
#include <chrono>
#include <cstdio>

// zero idioms first (eliminated at rename): operands with no denormals whatever the registers held
#define CHAINS(op)                                                                                                  \
  "vpxord %%zmm30, %%zmm30, %%zmm30\n\tvpxord %%zmm31, %%zmm31, %%zmm31\n\t"                                          \
  op " %%zmm30, %%zmm31, %%zmm0\n\t" op " %%zmm30, %%zmm31, %%zmm1\n\t" op " %%zmm30, %%zmm31, %%zmm2\n\t"            \
  op " %%zmm30, %%zmm31, %%zmm3\n\t" op " %%zmm30, %%zmm31, %%zmm4\n\t" op " %%zmm30, %%zmm31, %%zmm5\n\t"            \
  op " %%zmm30, %%zmm31, %%zmm6\n\t" op " %%zmm30, %%zmm31, %%zmm7\n\t" op " %%zmm30, %%zmm31, %%zmm8\n\t"            \
  op " %%zmm30, %%zmm31, %%zmm9\n\t" op " %%zmm30, %%zmm31, %%zmm10\n\t" op " %%zmm30, %%zmm31, %%zmm11\n\t"          \
  op " %%zmm30, %%zmm31, %%zmm12\n\t" op " %%zmm30, %%zmm31, %%zmm13\n\t" op " %%zmm30, %%zmm31, %%zmm14\n\t"         \
  op " %%zmm30, %%zmm31, %%zmm15\n\t"
#define CLOBBERS                                                                                                    \
  "xmm30", "xmm31", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",         \
      "xmm11", "xmm12", "xmm13", "xmm14", "xmm15"

template <typename Body>
double ns_per_instruction(Body body) {
  constexpr long kLoops = 20000000;
  double best = 1e30;
  for (int round = 0; round < 3; ++round) {   // the best of three: other processes only ever add time
    const auto t0 = std::chrono::steady_clock::now();
    asm volatile(   // the accumulators start at zero (no denormals); nothing between here and the loop uses them
        "vpxord %%zmm0, %%zmm0, %%zmm0\n\tvmovdqa64 %%zmm0, %%zmm1\n\tvmovdqa64 %%zmm0, %%zmm2\n\t"
        "vmovdqa64 %%zmm0, %%zmm3\n\tvmovdqa64 %%zmm0, %%zmm4\n\tvmovdqa64 %%zmm0, %%zmm5\n\t"
        "vmovdqa64 %%zmm0, %%zmm6\n\tvmovdqa64 %%zmm0, %%zmm7\n\tvmovdqa64 %%zmm0, %%zmm8\n\t"
        "vmovdqa64 %%zmm0, %%zmm9\n\tvmovdqa64 %%zmm0, %%zmm10\n\tvmovdqa64 %%zmm0, %%zmm11\n\t"
        "vmovdqa64 %%zmm0, %%zmm12\n\tvmovdqa64 %%zmm0, %%zmm13\n\tvmovdqa64 %%zmm0, %%zmm14\n\t"
        "vmovdqa64 %%zmm0, %%zmm15" ::: CLOBBERS);
    for (long i = 0; i < kLoops; ++i) body();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = s < best ? s : best;
  }
  return best / kLoops / 16 * 1e9;
}

int main() {
  const double fma = ns_per_instruction([] { asm volatile(CHAINS("vfmadd231ps") ::: CLOBBERS); });
  const double bf16 = ns_per_instruction([] { asm volatile(CHAINS("vdpbf16ps") ::: CLOBBERS); });
  const double byte = ns_per_instruction([] { asm volatile(CHAINS("vpdpbusd") ::: CLOBBERS); });
  std::printf("%-12s %8s %18s\n", "instruction", "ns", "multiply-adds/ns");
  std::printf("%-12s %8.3f %18.1f\n", "vfmadd231ps", fma, 16 / fma);
  std::printf("%-12s %8.3f %18.1f\n", "vdpbf16ps", bf16, 32 / bf16);
  std::printf("%-12s %8.3f %18.1f\n", "vpdpbusd", byte, 64 / byte);
}
