// Steps of the point-cloud sampler, shared by pointcloud_step (one step) and pointcloud_sample (every row of a
// step table): the posterior mean D of each row, then the affine update with in-kernel noise, D never stored.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "../common/table.h"
#include "kernels.h"
#include "posterior_blocked.h"
#include "posterior_row.h"
#include "posterior_screened.h"
#include "update_row.h"

namespace fastdiff::cpu {

// The multistep terms of a row after its one-step update: x += B1 D_{k−1}, then x += B2 D_{k−2} (each in double,
// rounded once, in the order of fastdiff/reference/pointcloud_sample.py). A zero coefficient adds nothing and
// reads nothing (the history of the first rows is unset), so one-step rows keep their bits.
template <typename T>
inline void add_history(T* x, int64_t d, const double* row, const T* H1, const T* H2) {
  const double b[2] = {row[kColB1], row[kColB2]};
  const T* H[2] = {H1, H2};
  for (int j = 0; j < 2; ++j) {
    if (b[j] == 0.0) continue;
    const T* h = H[j];
#pragma omp simd
    for (int64_t e = 0; e < d; ++e) x[e] = static_cast<T>(static_cast<double>(x[e]) + b[j] * static_cast<double>(h[e]));
  }
}

// D history of `depth` (0..2) past steps for one row or group: `cur` receives the step's D; after the step,
// rotate() makes it D_{k−1} (and the old D_{k−1} D_{k−2}); buffers are swapped, never copied.
template <typename T>
struct History {
  std::vector<T> cur, h1, h2;
  int depth;
  History(int64_t n, int depth_) : cur(n), h1(depth_ >= 1 ? n : 0), h2(depth_ >= 2 ? n : 0), depth(depth_) {}
  void rotate() {
    if (depth >= 2) std::swap(h2, h1);
    if (depth >= 1) std::swap(h1, cur);
  }
};

// Steps k = k0 .. k1 − 1 of rows [M, d]: D at row k − k0 of `table` ([k1 − k0, kTableWidth], csrc/common/table.h),
// then x ← A x + B0 D + C z(seed, sample_offset + row, noise step k), then the multistep terms B1 D_{k−1} and
// B2 D_{k−2} (D's of the earlier rows of this call, kept per row: add_history). The first step reads x_in, every
// step writes x_out, later steps read x_out; x_out may be x_in (each row, or group of rows, is read before it is
// written). traj: [k1 − k0 + 1, M, d] (x_in first) or nullptr. The glue refuses tables whose first rows use
// history from before k0 (first_row_before_history).
template <typename T>
void run_steps(const Cloud<T>& c, const T* x_in, T* x_out, int64_t M, const double* table, int64_t k0, int64_t k1,
               uint64_t seed, uint64_t sample_offset, T* traj) {
  const int64_t d = c.d;
  const auto row_of = [&](int64_t k) { return table + (k - k0) * kTableWidth; };
  const auto source = [&](int64_t k) -> const T* { return k == k0 ? x_in : x_out; };
  const auto record = [&](int64_t state, int64_t i, const T* xi) {   // traj[state][i] = xi (state 0: x_in)
    if (traj) std::copy(xi, xi + d, traj + (state * M + i) * d);
  };
  const int depth = history_depth(table, k1 - k0);
  if (use_blocked(d)) {
    const int64_t G = group_rows(M);
    const LargeCloud<T> lc(c);
#pragma omp parallel
    {
      LargeWork<T> w(lc, G);
      GroupRows<T> rows(G, d);
      History<T> hist(G * d, depth);   // hist.cur: the group's D
      std::vector<double> z(d + 4);
#pragma omp for schedule(static)
      for (int64_t i0 = 0; i0 < M; i0 += G) {
        const int64_t g = std::min(G, M - i0);
        for (int64_t r = 0; r < g; ++r) record(0, i0 + r, x_in + (i0 + r) * d);
        for (int64_t k = k0; k < k1; ++k) {
          const double* step = row_of(k);
          const T* src = source(k);
          const int64_t gp = rows.fill(g, [&](int64_t r, const T*& xr, T*& Dr, T*& Lr, double& a, double& s) {
            xr = src + (i0 + r) * d; Dr = hist.cur.data() + r * d; Lr = nullptr; a = step[kColAlpha];
            s = step[kColSigma];
          });
          posterior_rows(lc, gp, rows.x.data(), rows.alpha.data(), rows.sigma.data(), rows.D.data(), rows.L.data(), w);
          for (int64_t r = 0; r < g; ++r) {   // after the whole group: x_out may alias x_in
            const int64_t i = i0 + r;
            update_row(src + i * d, hist.cur.data() + r * d, x_out + i * d, d, step[kColA], step[kColB0],
                       step[kColC], seed, static_cast<uint32_t>(k), sample_offset + i, z.data());
            if (depth) add_history(x_out + i * d, d, step, hist.h1.data() + r * d, hist.h2.data() + r * d);
            record(k - k0 + 1, i, x_out + i * d);
          }
          hist.rotate();
        }
      }
    }
    return;
  }
#pragma omp parallel
  {
    std::vector<T> buf(kTile);
    History<T> hist(d, depth);   // hist.cur: the row's D
    std::vector<double> acc(d), z(d + 4);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < M; ++i) {
      record(0, i, x_in + i * d);
      for (int64_t k = k0; k < k1; ++k) {
        const double* step = row_of(k);
        const T* xi = source(k) + i * d;
        posterior_row(c, xi, step[kColAlpha], step[kColSigma], buf.data(), acc.data(),
                      hist.cur.data(), static_cast<T*>(nullptr));
        update_row(xi, hist.cur.data(), x_out + i * d, d, step[kColA], step[kColB0], step[kColC], seed,
                   static_cast<uint32_t>(k), sample_offset + i, z.data());
        if (depth) add_history(x_out + i * d, d, step, hist.h1.data(), hist.h2.data());
        record(k - k0 + 1, i, x_out + i * d);
        hist.rotate();
      }
    }
  }
}

}  // namespace fastdiff::cpu
