// CPU point-cloud posterior (MATH.md §5): D [M, d] and L [M] of every query.
// d <= 4: one query at a time per thread (posterior_row.h, OpenMP over queries); d >= 5: groups of rows per
// thread through posterior_rows (posterior_large.h: screening and exact rescoring, from d = 16 on AMX or with
// 8-bit dots on AVX-512, the dense rows a screen leaves in the dot form where it is as accurate, the rest and
// smaller d through the register-blocked kernel; the reasoning and the error bounds are in posterior_amx.h,
// posterior_screened.h, posterior_dense.h and posterior_blocked.h).
#include <algorithm>
#include <vector>

#include "kernels.h"
#include "posterior_blocked.h"
#include "posterior_row.h"
#include "posterior_large.h"

namespace fastdiff::cpu {

template <typename T>
void posterior(const Cloud<T>& c, const T* x, int64_t M, const double* alpha, const double* sigma, bool per_row,
               T* D, T* L) {
  if (use_blocked(c.d)) {
    const int64_t G = group_rows(M), d = c.d;
    const LargeCloud<T> lc(c);
#pragma omp parallel
    {
      LargeWork<T> w(lc, G);
      GroupRows<T> rows(G, d);
#pragma omp for schedule(dynamic, 1)   // groups differ in cost (screened, rescored or dense rows)
      for (int64_t i0 = 0; i0 < M; i0 += G) {
        const int64_t gp = rows.fill(std::min(G, M - i0), [&](int64_t r, const T*& xr, T*& Dr, T*& Lr, double& a, double& s) {
          const int64_t i = i0 + r;
          xr = x + i * d; Dr = D + i * d; Lr = L + i;
          a = alpha[per_row ? i : 0]; s = sigma[per_row ? i : 0];
        });
        posterior_rows(lc, gp, rows.x.data(), rows.alpha.data(), rows.sigma.data(), rows.D.data(), rows.L.data(), w);
      }
    }
    return;
  }
#pragma omp parallel
  {
    std::vector<T> buf(kTile);
    std::vector<double> acc(c.d);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < M; ++i) {
      const int64_t r = per_row ? i : 0;
      posterior_row(c, x + i * c.d, alpha[r], sigma[r], buf.data(), acc.data(), D + i * c.d, L + i);
    }
  }
}

const char* amx_unavailable() { return amx_unavailable_reason(); }
bool amx_enabled() { return amx_switch().load(); }
void set_amx_enabled(bool on) { amx_switch().store(on); }
bool int8_screen_built_in() { return int8_screen_built(); }

template void posterior<float>(const Cloud<float>&, const float*, int64_t, const double*, const double*, bool, float*,
                               float*);
template void posterior<double>(const Cloud<double>&, const double*, int64_t, const double*, const double*, bool,
                                double*, double*);

}  // namespace fastdiff::cpu
