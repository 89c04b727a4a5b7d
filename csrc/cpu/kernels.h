// Torch-free CPU kernels (raw pointers, int64 indexing). Glue lives in csrc/ops/.
#pragma once
#include <cstdint>

namespace fastdiff::cpu {

// One point cloud: the data as given, y [N, d] row-major (the large-d kernels read it directly: screening and
// exact rescoring read whole rows, and the blocked kernel packs its tiles from it), and for d <= 4 also
// transposed to yT [d, N] (the small-d loops run over contiguous points; null for d > 4, where a transposed copy
// of the whole cloud per call cost more than the screened posterior itself).
template <typename T>
struct Cloud {
  const T* yT;           // [d, N] (d <= 4) or nullptr
  const T* log_w;        // [N] or nullptr (uniform weights)
  int64_t N;
  int64_t d;
  double bandwidth;      // v >= 0
  const T* y;            // [N, d]
  T at(int64_t j, int64_t k) const { return y[j * d + k]; }   // point j, coordinate k
};

// The AMX screen of the large-d posterior (posterior_amx.h): why this process cannot use it (nullptr: it can), and
// the switch that turns it off (FASTDIFF_CPU_AMX=0 at start-up, or set_amx_enabled(false)).
const char* amx_unavailable();
bool amx_enabled();
void set_amx_enabled(bool on);
// Whether this build has the 16-query screen's int8 engine (posterior_amx.h: AVX-512 with VBMI2 and VNNI), which
// runs from d = 16 wherever AMX is not in use.
bool int8_screen_built_in();

// D [M, d] and L [M] for queries x [M, d]; alpha/sigma have length M (per row) or 1.
template <typename T>
void posterior(const Cloud<T>& cloud, const T* x, int64_t M, const double* alpha, const double* sigma,
               bool per_row, T* D, T* L);

// The multistep history of one affine step: D_{k−1}, D_{k−2} ([M, d] like D, null when unused) and their
// coefficients.
template <typename T>
struct AffineHistory {
  const T* D1 = nullptr;
  double B1 = 0.0;
  const T* D2 = nullptr;
  double B2 = 0.0;
};

// out = A x + B D + C z(seed, sample_offset + row, step, col), then out += B1 D1, then out += B2 D2 (a zero
// coefficient reads nothing); out may alias x.
template <typename T>
void affine_step(const T* x, const T* D, T* out, int64_t M, int64_t d, double A, double B, double C,
                 uint64_t seed, uint32_t step, uint64_t sample_offset, const AffineHistory<T>& history = {});

// The fused step: D of the point cloud at (alpha, sigma), then the affine update, D never stored.
template <typename T>
void pointcloud_step(const Cloud<T>& cloud, const T* x, T* out, int64_t M, double alpha, double sigma,
                     double A, double B, double C, uint64_t seed, uint32_t step, uint64_t sample_offset);

// Every row of a step table (float64 [K, kTableWidth] row-major, csrc/common/table.h; host memory): x [M, d]
// updated in place, step k with noise step index k; traj [K+1, M, d] or nullptr. B1/B2 must be 0 (the glue
// refuses tables that use them: the kernel does not read those columns yet).
template <typename T>
void pointcloud_sample(const Cloud<T>& cloud, T* x, int64_t M, int64_t K, const double* table, uint64_t seed,
                       uint64_t sample_offset, T* traj);

// The smallest and largest of v[0..n), n >= 1 (NaN at both ends when v holds a NaN): the ops' value checks.
template <typename T>
void value_ends(const T* v, int64_t n, double* lo, double* hi);

}  // namespace fastdiff::cpu
