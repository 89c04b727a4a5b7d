// The large-d posterior of a group of rows (d >= 5), shared by the posterior, pointcloud_step and pointcloud_sample
// kernels: each block of rows is screened (float, no log-weights, from d = 16: posterior_amx.h, on AMX where the
// CPU has it, else with its int8 engine on AVX-512 with VNNI; otherwise posterior_screened.h from d = 32); the rows
// a screen finds dense go through the dot form where it is as accurate (float, from d = 32: posterior_dense.h), and
// those it refuses, and every row at smaller d, through the register-blocked kernel of direct differences
// (posterior_blocked.h). The reasoning and the error bounds are in those files.
#pragma once
#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "posterior_amx.h"
#include "posterior_blocked.h"
#include "posterior_dense.h"
#include "posterior_screened.h"

namespace fastdiff::cpu {

// State shared by the threads of one call: the cloud, its lazily packed layouts, the largest log-weight.
template <typename T>
struct LargeCloud {
  const Cloud<T>& c;
  PackedCloud<T> packed;                    // the blocked kernel's tiles (posterior_blocked.h)
  std::unique_ptr<AmxCloud> amx;            // the 16-query screen's cloud (AMX, int8 or float), or null
                                            // (screen_engine)
  std::unique_ptr<ScreenCloud<T>> screen;   // the AVX-512 screen's layout (also for AMX's coarse rows): null below
                                            // kScreenMinD and past kScreenMaxPoints
  double lw_max;                            // for the far-row test (0 without log-weights)
  std::unique_ptr<DotCloud> dot;            // the dot form's centred cloud (float, d >= kDotMinD, a screen to
                                            // find dense rows, the cloud packed once), or null
  explicit LargeCloud(const Cloud<T>& c_)
      : c(c_), packed(c_), amx(make_amx(c_)),
        screen(use_screening(c_.d, c_.N) ? new ScreenCloud<T>(c_) : nullptr),
        lw_max(c_.log_w ? max_log_weight(c_.log_w, c_.N) : 0.0) {
    if constexpr (std::is_same_v<T, float>)
      if (c.d >= kDotMinD && (amx || screen) && packed.packed()) dot.reset(new DotCloud(c, packed.nt));
  }

 private:
  static AmxCloud* make_amx(const Cloud<T>& c) {
    if constexpr (std::is_same_v<T, float>) {
      const Engine e = screen_engine(c);
      if (e != Engine::none) return new AmxCloud(c, e);
    }
    return nullptr;
  }
};

// Per-thread scratch for groups of up to `rows` rows.
template <typename T>
struct LargeWork {
  const LargeCloud<T>& lc;
  int64_t rows;
  std::unique_ptr<BlockedWork<T>> blocked_;   // made on first use (its sums are rows·d doubles)
  std::unique_ptr<DotWork> dot_;             // made on first use, with its own tiles' scratch
  std::unique_ptr<BlockedWork<T>> dot_blocked_;
  std::unique_ptr<AmxWork> amx;
  std::unique_ptr<ScreenWork<T>> screen;
  GroupRows<T> dense;                       // the rows a screen leaves to the blocked kernel
  std::vector<int64_t> dense_rows, coarse_rows, open_rows, refused;
  RowParams<T> prm[std::max(kScreenRows, kAmxRows)];
  LargeWork(const LargeCloud<T>& lc, int64_t rows)
      : lc(lc), rows(rows), amx(lc.amx ? new AmxWork(*lc.amx) : nullptr),
        screen(lc.screen ? new ScreenWork<T>(lc.c) : nullptr), dense(rows, lc.c.d) {}
  BlockedWork<T>& blocked() {
    if (!blocked_) blocked_.reset(new BlockedWork<T>(lc.c.d, rows, !lc.packed.packed()));
    return *blocked_;
  }
  DotWork& dot() {
    if (!dot_) dot_.reset(new DotWork(rows, dot_blocked().dp));
    return *dot_;
  }
  BlockedWork<T>& dot_blocked() {
    if (!dot_blocked_) dot_blocked_.reset(new BlockedWork<T>(lc.c.d, rows, false, lc.dot->nt, 2 * kRows));
    return *dot_blocked_;
  }
};

// A screen's block: up to R of the call's rows, picked by index, with their parameters in prm.
template <typename T, int R>
struct PickedRows {
  const T* x[R];
  double alpha[R], sigma[R];
  T* D[R];
  T* L[R];
  int64_t row[R];
  template <typename RowOf>
  PickedRows(const Cloud<T>& c, int nr, RowOf row_of, const T* const* xs, const double* a, const double* s,
             T* const* Ds, T* const* Ls, RowParams<T>* prm) {
    for (int r = 0; r < nr; ++r) {
      const int64_t i = row[r] = row_of(r);
      x[r] = xs[i]; alpha[r] = a[i]; sigma[r] = s[i]; D[r] = Ds[i]; L[r] = Ls[i];
      prm[r] = row_params(c, alpha[r], sigma[r]);
    }
  }
};

// D and L of g rows (g a multiple of kRows; pad with copies of a row, as GroupRows does). L[r] may be nullptr.
// With a screen (AMX: kAmxRows rows at a time; AVX-512 from d = kScreenMinD: kScreenRows), the rows it finds dense
// go through the blocked kernel afterwards; without one, every row does.
template <typename T>
void posterior_rows(const LargeCloud<T>& lc, int64_t g, const T* const* xs, const double* alpha, const double* sigma,
                    T* const* D, T* const* L, LargeWork<T>& w) {
  if (!lc.amx && !lc.screen) return posterior_group(lc.c, g, xs, alpha, sigma, D, L, lc.packed, w.blocked());
  w.dense_rows.clear();
  w.coarse_rows.clear();
  bool listed = lc.amx != nullptr;   // whether the AVX-512 screen takes w.coarse_rows (else every row)
  if constexpr (std::is_same_v<T, float>) {
    // rows spread enough for the dot form go there before any screening
    const auto spread = [&](int64_t i, const RowParams<T>& p) {
      return lc.dot && dot_spread_row(lc.c, *lc.dot, xs[i], alpha[i], p.inv2c);
    };
    if (!lc.amx && lc.dot) {
      for (int64_t i = 0; i < g; ++i)
        (spread(i, row_params(lc.c, alpha[i], sigma[i])) ? w.dense_rows : w.coarse_rows).push_back(i);
      listed = true;
    }
    if (lc.amx) {
      // rows spread enough for the blocked kernel go there before any dot product, and the 16-row blocks are
      // formed from the others: a sweep costs as much for one open row as for 16 (row invariance: a row's result
      // never depends on the rows that share its block)
      w.open_rows.clear();
      for (int64_t i = 0; i < g; ++i) {
        const RowParams<T> p = row_params(lc.c, alpha[i], sigma[i]);
        (spread(i, p) || amx_spread_row(lc.c, *lc.amx, xs[i], alpha[i], p) ? w.dense_rows : w.open_rows).push_back(i);
      }
      const int64_t n_open = static_cast<int64_t>(w.open_rows.size());
      for (int64_t b = 0; b < n_open; b += kAmxRows) {
        const int nr = static_cast<int>(std::min<int64_t>(kAmxRows, n_open - b));
        const PickedRows<T, kAmxRows> p(lc.c, nr, [&](int r) { return w.open_rows[b + r]; }, xs, alpha, sigma, D, L,
                                        w.prm);
        unsigned coarse = 0;
        const unsigned dense = amx_screen_block(lc.c, *lc.amx, nr, p.x, p.alpha, p.sigma, w.prm, lc.lw_max, *w.amx,
                                                p.D, p.L, coarse);
        for (int r = 0; r < nr; ++r) {
          if (dense >> r & 1u) w.dense_rows.push_back(p.row[r]);
          else if (coarse >> r & 1u) (lc.screen ? w.coarse_rows : w.dense_rows).push_back(p.row[r]);
        }
      }
    }
  }
  // the AVX-512 screen: without AMX every row (but the dot form's spread ones), with it AMX's coarse rows
  const int64_t n_screen = listed ? static_cast<int64_t>(w.coarse_rows.size()) : g;
  for (int64_t b = 0; b < n_screen; b += kScreenRows) {
    const int nr = static_cast<int>(std::min<int64_t>(kScreenRows, n_screen - b));
    const PickedRows<T, kScreenRows> p(lc.c, nr, [&](int r) { return listed ? w.coarse_rows[b + r] : b + r; }, xs,
                                       alpha, sigma, D, L, w.prm);
    const unsigned dense = screen_block(lc.c, *lc.screen, nr, p.x, p.alpha, p.sigma, w.prm, lc.lw_max, *w.screen,
                                        p.D, p.L);
    for (int r = 0; r < nr; ++r)
      if (dense >> r & 1u) w.dense_rows.push_back(p.row[r]);
  }
  if (w.dense_rows.empty()) return;
  std::sort(w.dense_rows.begin(), w.dense_rows.end());   // the blocked kernel's groups in row order
  const auto fill_dense = [&]() {
    return w.dense.fill(static_cast<int64_t>(w.dense_rows.size()),
                        [&](int64_t r, const T*& xr, T*& Dr, T*& Lr, double& a, double& s) {
      const int64_t i = w.dense_rows[r];
      xr = xs[i]; Dr = D[i]; Lr = L[i]; a = alpha[i]; s = sigma[i];
    });
  };
  if constexpr (std::is_same_v<T, float>) {
    if (lc.dot) {   // the dot form first; the rows its test refuses go direct
      const int64_t gp = fill_dense();
      w.refused.clear();
      dot_group(lc.c, gp, static_cast<int64_t>(w.dense_rows.size()), w.dense.x.data(), w.dense.alpha.data(),
                w.dense.sigma.data(), w.dense.D.data(), w.dense.L.data(), lc.packed, *lc.dot, w.dot_blocked(), w.dot(),
                w.refused);
      if (w.refused.empty()) return;
      for (size_t r = 0; r < w.refused.size(); ++r) w.refused[r] = w.dense_rows[w.refused[r]];
      w.dense_rows.swap(w.refused);
    }
  }
  const int64_t gp = fill_dense();
  posterior_group(lc.c, gp, w.dense.x.data(), w.dense.alpha.data(), w.dense.sigma.data(), w.dense.D.data(),
                  w.dense.L.data(), lc.packed, w.blocked());
}

}  // namespace fastdiff::cpu
