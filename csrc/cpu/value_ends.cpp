// The value scan of the ops' input checks (fastdiff/_checks.py minmax): the smallest and largest element of a
// float array, NaN at both ends when it holds a NaN (as torch.aminmax reports it).
// Why not torch.aminmax: the checks read every input of a call once, and at d = 3072 (the bench's 512 × 3072
// cloud) two aminmax calls, their stack and the host copy took a quarter of a posterior call (0.26 of 1.1 ms).
// One pass here runs at the read bandwidth and returns plain numbers.
#include <algorithm>
#include <cstdint>
#include <limits>

#include "kernels.h"

namespace fastdiff::cpu {

namespace {
constexpr int64_t kEndsChunk = int64_t{1} << 16;   // elements per task: below two chunks, no thread is started
}

template <typename T>
void value_ends(const T* v, int64_t n, double* lo, double* hi) {
  T mn = std::numeric_limits<T>::infinity(), mx = -std::numeric_limits<T>::infinity();
  int nan = 0;
  const int64_t chunks = (n + kEndsChunk - 1) / kEndsChunk;
#pragma omp parallel for schedule(static) reduction(min : mn) reduction(max : mx) reduction(| : nan) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const T* p = v + c * kEndsChunk;
    const int64_t m = std::min(kEndsChunk, n - c * kEndsChunk);
    T a = mn, b = mx;
    int u = 0;
    // min and max skip a NaN (a comparison with it is false), so NaN is looked for on its own
#pragma omp simd reduction(min : a) reduction(max : b) reduction(| : u)
    for (int64_t i = 0; i < m; ++i) {
      a = p[i] < a ? p[i] : a;
      b = p[i] > b ? p[i] : b;
      u |= p[i] != p[i];
    }
    mn = std::min(mn, a);
    mx = std::max(mx, b);
    nan |= u;
  }
  const double q = std::numeric_limits<double>::quiet_NaN();
  *lo = nan ? q : static_cast<double>(mn);
  *hi = nan ? q : static_cast<double>(mx);
}

template void value_ends<float>(const float*, int64_t, double*, double*);
template void value_ends<double>(const double*, int64_t, double*, double*);

}  // namespace fastdiff::cpu
