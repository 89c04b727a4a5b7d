// Whole point-cloud trajectories on CUDA: every row of a step table (csrc/common/table.h), x updated in place;
// churned and two-stage rows run both posteriors of their step in the same launch (d <= 64) or queue (larger d).
#include <utility>

#include "../common/table.h"
#include "common.cuh"
#include "steps.cuh"

namespace fastdiff::cuda {
namespace {

// x += B1 D_{k−1}, then x += B2 D_{k−2}, in T as the affine step (the large-d path's multistep terms, after the
// step's affine update; a zero coefficient reads nothing: the first rows' history is unset).
template <typename T>
__global__ void add_history_kernel(T* x, const T* H1, const T* H2, int64_t n, T b1, T b2, bool use1, bool use2) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= n) return;
  T v = x[g];
  if (use1) v = v + b1 * H1[g];
  if (use2) v = v + b2 * H2[g];
  x[g] = v;
}

template <typename T>
cudaError_t launch_add_history(T* x, const T* H1, const T* H2, int64_t n, double B1, double B2, cudaStream_t st) {
  if (B1 == 0.0 && B2 == 0.0) return cudaSuccess;
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>((n + threads - 1) / threads);
  FD_LAUNCH(blocks, threads, 0, st, add_history_kernel<T>)(x, H1, H2, n, static_cast<T>(B1), static_cast<T>(B2),
                                                           B1 != 0.0, B2 != 0.0);
  return cudaGetLastError();
}

// out = a x + b D + bu Du + c w, w = rho z(stage_step) + √(1 − rho²) z(noise_step), formed in double and rounded
// once (the churn, the stage point and the update of a churned or two-stage row at large d, as the d <= 64 kernel
// forms them in registers); a zero coefficient reads and draws nothing. One thread per (row, quad); out may alias x.
struct Combination {
  double a, b, bu, c, rho;
  uint32_t noise_step, stage_step;
};

template <typename T>
__global__ void combine_kernel(const T* x, const T* D, const T* Du, T* out, int64_t M, int64_t d, Combination co,
                               uint64_t seed, uint64_t sample_offset) {
  const int64_t quads = (d + 3) / 4;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= M * quads) return;
  const int64_t i = g / quads, q = g % quads;
  const uint64_t sample = sample_offset + static_cast<uint64_t>(i);
  double z[4] = {0.0, 0.0, 0.0, 0.0}, zs[4] = {0.0, 0.0, 0.0, 0.0};
  if (co.c != 0.0) {
    normals4<double>(seed, sample, co.noise_step, static_cast<uint32_t>(q), z);
    if (co.rho != 0.0) normals4<double>(seed, sample, co.stage_step, static_cast<uint32_t>(q), zs);
  }
  const double keep = sqrt(1.0 - co.rho * co.rho);
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int64_t j = i * d + 4 * q + e;
    if (4 * q + e >= d) continue;
    double v = co.a * static_cast<double>(x[j]);
    if (co.b != 0.0) v += co.b * static_cast<double>(D[j]);
    if (co.bu != 0.0) v += co.bu * static_cast<double>(Du[j]);
    if (co.c != 0.0) v += co.c * (co.rho != 0.0 ? co.rho * zs[e] + keep * z[e] : z[e]);
    out[j] = static_cast<T>(v);
  }
}

template <typename T>
cudaError_t launch_combine(const T* x, const T* D, const T* Du, T* out, int64_t M, int64_t d, const Combination& co,
                           uint64_t seed, uint64_t off, cudaStream_t st) {
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>((M * ((d + 3) / 4) + threads - 1) / threads);
  FD_LAUNCH(blocks, threads, 0, st, combine_kernel<T>)(x, D, Du, out, M, d, co, seed, off);
  return cudaGetLastError();
}

// One churned or two-stage row at large d, x in place (row: the device row, whose alphas and sigmas the posteriors
// read; host: the same row on the host): x^ = P x + Cchurn z_churn (in x), D at x^, for a staged row the stage
// point U and D_u at it (Du), then x ← A x^ + B0 D + BU D_u + C w. Queued on the stream like the one-step rows.
template <typename T>
cudaError_t launch_staged_row(const Cloud<T>& c, T* x, int64_t M, const double* row, const double* host, uint32_t k,
                              uint64_t seed, uint64_t off, T* D, T* L, T* U, T* Du, cudaStream_t st) {
  const int64_t d = c.d;
  cudaError_t e = cudaSuccess;
  if (row_churns(host))
    e = launch_combine<T>(x, nullptr, nullptr, x, M, d, {host[kColP], 0.0, 0.0, host[kColCchurn], 0.0,
                                                          kChurnStepBase + k, 0u}, seed, off, st);
  if (e == cudaSuccess) e = launch_posterior<T>(c, x, M, row + kColAlpha, row + kColSigma, false, D, L, st);
  const bool staged = row_is_staged(host);
  if (e == cudaSuccess && staged)
    e = launch_combine<T>(x, D, nullptr, U, M, d, {host[kColUx], host[kColUD], 0.0, host[kColUz], 0.0,
                                                   kStageStepBase + k, 0u}, seed, off, st);
  if (e == cudaSuccess && staged)
    e = launch_posterior<T>(c, U, M, row + kColAlphaU, row + kColSigmaU, false, Du, L, st);
  if (e == cudaSuccess)
    e = launch_combine<T>(x, D, Du, x, M, d, {host[kColA], host[kColB0], staged ? host[kColBU] : 0.0, host[kColC],
                                              host[kColRho], k, kStageStepBase + k}, seed, off, st);
  return e;
}

// d <= 64: one launch whose queries keep x, the last `hist` D's and (for churned or two-stage rows) the stage
// point and its D in registers (steps.cuh).
template <typename T, int DMAX, int HIST>
cudaError_t launch_small_rows(const Cloud<T>& c, T* x, int64_t M, int64_t K, const StepCoeffs& co, uint64_t seed,
                              uint64_t off, T* traj, bool stages, cudaStream_t st) {
  if (stages) return launch_steps_small<T, DMAX, HIST, true>(c, x, x, M, 0, K, co, seed, off, traj, st);
  return launch_steps_small<T, DMAX, HIST, false>(c, x, x, M, 0, K, co, seed, off, traj, st);
}

template <typename T, int DMAX>
cudaError_t launch_small_dmax(const Cloud<T>& c, T* x, int64_t M, int64_t K, const StepCoeffs& co, uint64_t seed,
                              uint64_t off, T* traj, int hist, bool stages, cudaStream_t st) {
  if (hist == 0) return launch_small_rows<T, DMAX, 0>(c, x, M, K, co, seed, off, traj, stages, st);
  if (hist == 1) return launch_small_rows<T, DMAX, 1>(c, x, M, K, co, seed, off, traj, stages, st);
  return launch_small_rows<T, DMAX, 2>(c, x, M, K, co, seed, off, traj, stages, st);
}

// (a one-step table without history launches the instantiation pointcloud_step launches: <T, DMAX, 0, false>)
template <typename T>
cudaError_t launch_small(const Cloud<T>& c, T* x, int64_t M, int64_t K, const StepCoeffs& co, uint64_t seed,
                         uint64_t off, T* traj, int hist, bool stages, cudaStream_t st) {
  if (c.d <= 4) return launch_small_dmax<T, 4>(c, x, M, K, co, seed, off, traj, hist, stages, st);
  if (c.d <= 16) return launch_small_dmax<T, 16>(c, x, M, K, co, seed, off, traj, hist, stages, st);
  return launch_small_dmax<T, 64>(c, x, M, K, co, seed, off, traj, hist, stages, st);
}

}  // namespace

template <typename T>
cudaError_t launch_pointcloud_sample(const Cloud<T>& c, T* x, int64_t M, int64_t K, const double* table,
                                     const double* table_host, uint64_t seed, uint64_t sample_offset, T* traj,
                                     T* scratch, cudaStream_t stream) {
  if (M == 0 || K == 0) return cudaSuccess;
  const size_t state_bytes = M * c.d * sizeof(T);
  if (traj) {
    cudaError_t e = cudaMemcpyAsync(traj, x, state_bytes, cudaMemcpyDeviceToDevice, stream);
    if (e != cudaSuccess) return e;
  }
  const int hist = history_depth(table_host, K);
  const bool stages = table_has_stages(table_host, K);
  if (c.d <= 64) {   // one launch: the queries stay in registers across all K steps
    const StepCoeffs co{table, nullptr, nullptr, 0.0, 0.0, 0.0};
    return launch_small<T>(c, x, M, K, co, seed, sample_offset, traj, hist, stages, stream);
  }
  // Large d: a launch pair per step (a third for the multistep terms; up to five more for a churned or two-stage
  // row: churn, posterior, stage point, posterior, update),
  // all queued on the stream (no host synchronisation); the posteriors read alpha and sigma from the device table,
  // the other coefficients are passed by value from the host rows. scratch (pointcloud_sample_scratch): D [M, d],
  // L [M], then `hist` history buffers [M, d], then the stage point U and its D_u [M, d] each; the three D buffers
  // rotate by pointer (D_k becomes D_{k−1}), so nothing is copied.
  const int64_t n = M * c.d;
  T* L = scratch + n;
  T* D = scratch;
  T* H1 = hist >= 1 ? scratch + n + M : nullptr;
  T* H2 = hist >= 2 ? scratch + 2 * n + M : nullptr;
  T* U = stages ? scratch + (1 + hist) * n + M : nullptr;
  T* Du = stages ? U + n : nullptr;
  for (int64_t k = 0; k < K; ++k) {
    const double* row = table + k * kTableWidth;
    const double* row_host = table_host + k * kTableWidth;
    const auto k32 = static_cast<uint32_t>(k);
    cudaError_t e = cudaSuccess;
    if (row_is_one_step(row_host)) {
      e = launch_posterior<T>(c, x, M, row + kColAlpha, row + kColSigma, false, D, L, stream);
      if (e == cudaSuccess)
        e = launch_affine_step<T>(x, D, x, M, c.d, row_host[kColA], row_host[kColB0], row_host[kColC], seed, k32,
                                  sample_offset, stream);
    } else {
      e = launch_staged_row<T>(c, x, M, row, row_host, k32, seed, sample_offset, D, L, U, Du, stream);
    }
    if (e == cudaSuccess && hist)
      e = launch_add_history<T>(x, H1, H2, n, row_host[kColB1], row_host[kColB2], stream);
    if (e == cudaSuccess && traj)
      e = cudaMemcpyAsync(traj + (k + 1) * n, x, state_bytes, cudaMemcpyDeviceToDevice, stream);
    if (e != cudaSuccess) return e;
    if (hist >= 2) std::swap(H2, H1);
    if (hist >= 1) std::swap(H1, D);
  }
  return cudaSuccess;
}

#define FD_INSTANTIATE(T)                                                                                   \
  template cudaError_t launch_pointcloud_sample<T>(const Cloud<T>&, T*, int64_t, int64_t, const double*,   \
                                                   const double*, uint64_t, uint64_t, T*, T*, cudaStream_t);
FD_INSTANTIATE(float)
FD_INSTANTIATE(double)
#undef FD_INSTANTIATE

}  // namespace fastdiff::cuda
