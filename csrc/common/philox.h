// The noise contract of DESIGN.md / fastdiff/noise.py, shared by the CPU and CUDA kernels.
// z for global sample i, step k, component j: Philox4x32-10 with key (seed mod 2^32, seed >> 32) and
// counter (j / 4, k, i mod 2^32, i >> 32); u = ((r >> 9) + 0.5) * 2^-23 (exact in float32);
// Box–Muller on (u0, u1) and (u2, u3); z = n[j mod 4].
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FD_HD __host__ __device__ __forceinline__
#define FD_UNROLL _Pragma("unroll")
#else
#define FD_HD inline
#define FD_UNROLL
#endif

namespace fastdiff {

struct Philox4 {
  uint32_t r[4];
};

// Ten rounds on the counter words in place (scalar references, so loops over counters vectorise).
FD_HD void philox4x32_10_rounds(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
FD_UNROLL
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

FD_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  philox4x32_10_rounds(c0, c1, c2, c3, k0, k1);
  return Philox4{{c0, c1, c2, c3}};
}

// u in [2^-24, 1 - 2^-24]: (2k + 1) * 2^-24 with k < 2^23 is exact in float32.
FD_HD float philox_uniform(uint32_t r) { return (static_cast<float>(r >> 9) + 0.5f) * 1.1920928955078125e-07f; }

// The four uniforms of counter (quad, step, sample) under `seed`.
FD_HD Philox4 noise_words(uint64_t seed, uint64_t sample, uint32_t step, uint32_t quad) {
  return philox4x32_10(quad, step, static_cast<uint32_t>(sample), static_cast<uint32_t>(sample >> 32),
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

}  // namespace fastdiff
