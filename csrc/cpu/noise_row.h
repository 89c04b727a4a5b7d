// Standard normals of one sample row from the noise contract: Box–Muller in double from the exact float
// uniforms, as fastdiff/noise.py does, so CPU results match the reference to the last float32 bit
// (up to the libm's last-ulp differences in log/cos/sin in double).
#pragma once
#include <cmath>
#include <cstdint>

#include "../common/philox.h"

namespace fastdiff::cpu {

inline void normal_row(uint64_t seed, uint64_t sample, uint32_t step, int64_t d, double* z) {
  constexpr double two_pi = 6.283185307179586476925286766559;
  for (int64_t q = 0; 4 * q < d; ++q) {
    const Philox4 w = noise_words(seed, sample, step, static_cast<uint32_t>(q));
    for (int pair = 0; pair < 2; ++pair) {
      const double u_r = philox_uniform(w.r[2 * pair]);
      const double u_a = philox_uniform(w.r[2 * pair + 1]);
      const double radius = std::sqrt(-2.0 * std::log(u_r));
      const double angle = two_pi * u_a;
      z[4 * q + 2 * pair] = radius * std::cos(angle);
      z[4 * q + 2 * pair + 1] = radius * std::sin(angle);
    }
  }
}

}  // namespace fastdiff::cpu
