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
#include "posterior_large.h"
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

// Per-thread buffers of the churned and two-stage rows (csrc/common/table.h) for `rows` rows: x^, the stage
// point u, its D_u, and the stage draws (d + 4 doubles a row). Empty for tables of one-step rows only.
template <typename T>
struct StageRows {
  std::vector<T> xh, u, Du;
  std::vector<double> zs;
  int64_t d;
  StageRows(bool used, int64_t rows, int64_t d_)
      : xh(used ? rows * d_ : 0), u(used ? rows * d_ : 0), Du(used ? rows * d_ : 0), zs(used ? rows * (d_ + 4) : 0),
        d(d_) {}
  T* xh_row(int64_t r) { return xh.data() + r * d; }
  T* u_row(int64_t r) { return u.data() + r * d; }
  T* Du_row(int64_t r) { return Du.data() + r * d; }
  double* zs_row(int64_t r) { return zs.data() + r * (d + 4); }
};

// Whether a row draws its stage noise: for u (Uz != 0) or for the correlated step noise (rho != 0).
inline bool row_draws_stage_noise(const double* row) {
  return (row_is_staged(row) && row[kColUz] != 0.0) || row[kColRho] != 0.0;
}

// Steps k = k0 .. k1 − 1 of rows [M, d]: each row of `table` ([k1 − k0, kTableWidth], csrc/common/table.h) as
// the table executor runs it: churn x^ = P x + Cchurn z_churn, D at x^, for a staged row the stage point u and
// D_u, then x ← A x^ + B0 D + BU D_u + C w (w = z(seed, sample_offset + row, noise step k), correlated with the
// stage draw when rho != 0), then the multistep terms B1 D_{k−1} and B2 D_{k−2} (D's of the earlier rows of this
// call, kept per row: add_history). One-step rows (row_is_one_step) run update_row exactly as before the stage
// columns existed. The first step reads x_in, every step writes x_out, later steps read x_out; x_out may be x_in
// (each row, or group of rows, is read before it is written). traj: [k1 − k0 + 1, M, d] (x_in first) or nullptr.
// The glue refuses tables whose first rows use history from before k0 (first_row_before_history).
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
  const bool stages = table_has_stages(table, k1 - k0);
  if (use_blocked(d)) {
    const int64_t G = group_rows(M);
    const LargeCloud<T> lc(c);
#pragma omp parallel
    {
      LargeWork<T> w(lc, G);
      GroupRows<T> rows(G, d);
      History<T> hist(G * d, depth);   // hist.cur: the group's D
      StageRows<T> st(stages, G, d);
      std::vector<double> z(d + 4);
      std::vector<const T*> xh(G);     // each row's x^: its state, or its churned copy
#pragma omp for schedule(static)
      for (int64_t i0 = 0; i0 < M; i0 += G) {
        const int64_t g = std::min(G, M - i0);
        for (int64_t r = 0; r < g; ++r) record(0, i0 + r, x_in + (i0 + r) * d);
        for (int64_t k = k0; k < k1; ++k) {
          const double* step = row_of(k);
          const T* src = source(k);
          const auto k32 = static_cast<uint32_t>(k);
          const bool churns = row_churns(step), staged = row_is_staged(step), zs = row_draws_stage_noise(step);
          for (int64_t r = 0; r < g; ++r) {
            xh[r] = src + (i0 + r) * d;
            if (churns) {
              churn_row(xh[r], st.xh_row(r), d, step, seed, k32, sample_offset + i0 + r, z.data());
              xh[r] = st.xh_row(r);
            }
          }
          int64_t gp = rows.fill(g, [&](int64_t r, const T*& xr, T*& Dr, T*& Lr, double& a, double& s) {
            xr = xh[r]; Dr = hist.cur.data() + r * d; Lr = nullptr; a = step[kColAlpha]; s = step[kColSigma];
          });
          posterior_rows(lc, gp, rows.x.data(), rows.alpha.data(), rows.sigma.data(), rows.D.data(), rows.L.data(), w);
          for (int64_t r = 0; zs && r < g; ++r)
            normal_row(seed, sample_offset + i0 + r, kStageStepBase + k32, d, st.zs_row(r));
          if (staged) {   // the second posterior of the step, at every row's stage point
            for (int64_t r = 0; r < g; ++r)
              stage_point(xh[r], hist.cur.data() + r * d, st.u_row(r), d, step,
                          step[kColUz] != 0.0 ? st.zs_row(r) : nullptr);
            gp = rows.fill(g, [&](int64_t r, const T*& xr, T*& Dr, T*& Lr, double& a, double& s) {
              xr = st.u_row(r); Dr = st.Du_row(r); Lr = nullptr; a = step[kColAlphaU]; s = step[kColSigmaU];
            });
            posterior_rows(lc, gp, rows.x.data(), rows.alpha.data(), rows.sigma.data(), rows.D.data(), rows.L.data(),
                           w);
          }
          for (int64_t r = 0; r < g; ++r) {   // after the whole group: x_out may alias x_in
            const int64_t i = i0 + r;
            if (row_is_one_step(step))
              update_row(xh[r], hist.cur.data() + r * d, x_out + i * d, d, step[kColA], step[kColB0], step[kColC],
                         seed, k32, sample_offset + i, z.data());
            else
              update_row_staged(xh[r], hist.cur.data() + r * d, staged ? st.Du_row(r) : nullptr, x_out + i * d, d,
                                step, seed, k32, sample_offset + i, zs ? st.zs_row(r) : nullptr, z.data());
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
    StageRows<T> st(stages, 1, d);
    std::vector<double> acc(d), z(d + 4);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < M; ++i) {
      record(0, i, x_in + i * d);
      for (int64_t k = k0; k < k1; ++k) {
        const double* step = row_of(k);
        const auto k32 = static_cast<uint32_t>(k);
        const T* xi = source(k) + i * d;
        if (row_is_one_step(step)) {
          posterior_row(c, xi, step[kColAlpha], step[kColSigma], buf.data(), acc.data(),
                        hist.cur.data(), static_cast<T*>(nullptr));
          update_row(xi, hist.cur.data(), x_out + i * d, d, step[kColA], step[kColB0], step[kColC], seed, k32,
                     sample_offset + i, z.data());
        } else {
          const bool staged = row_is_staged(step), zs = row_draws_stage_noise(step);
          if (row_churns(step)) {
            churn_row(xi, st.xh_row(0), d, step, seed, k32, sample_offset + i, z.data());
            xi = st.xh_row(0);
          }
          posterior_row(c, xi, step[kColAlpha], step[kColSigma], buf.data(), acc.data(), hist.cur.data(),
                        static_cast<T*>(nullptr));
          if (zs) normal_row(seed, sample_offset + i, kStageStepBase + k32, d, st.zs_row(0));
          if (staged) {
            stage_point(xi, hist.cur.data(), st.u_row(0), d, step, step[kColUz] != 0.0 ? st.zs_row(0) : nullptr);
            posterior_row(c, st.u_row(0), step[kColAlphaU], step[kColSigmaU], buf.data(), acc.data(), st.Du_row(0),
                          static_cast<T*>(nullptr));
          }
          update_row_staged(xi, hist.cur.data(), staged ? st.Du_row(0) : nullptr, x_out + i * d, d, step, seed, k32,
                            sample_offset + i, zs ? st.zs_row(0) : nullptr, z.data());
        }
        if (depth) add_history(x_out + i * d, d, step, hist.h1.data(), hist.h2.data());
        record(k - k0 + 1, i, x_out + i * d);
        hist.rotate();
      }
    }
  }
}

}  // namespace fastdiff::cpu
