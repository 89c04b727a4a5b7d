// Far queries (issue 11, defect 8): the point-cloud posterior of a query far from every data point, recomputed
// with double-double logits. Shared by the CPU and CUDA kernels (host and device functions, torch-free).
//
// Why: the weights depend on logit *differences* l_j − l_k = O(1..40) for the points that matter, but each
// logit l_j = lw_j − |x − αy_j|²/(2c) is formed from a distance part p_j = |x − αy_j|²/(2c) that is large for a
// far query (577σ away: p ≈ 1.7e5). Rounding x − αy_j (u relative), summing the squares over d and rounding
// the logit each err by ≈ u·p_j, so the weights move by ≈ u·p·few: 1e-2 in float (D off by 2e-2·max|y| in
// the case), 1e-11 in double. Every working-precision formulation (the torch reference's too) has this
// error; the fast kernels keep it (their hot loops stay as they are) and, for the rows it matters on, compute
// again here where it is ≈ u_double² · p (x − αy_j, its square and the sum over d exact to double-double via
// TwoSum/TwoProd; the logit too), so the weights are exact to ≈ 2u_double of e^{l − m} and D, L to the final
// rounding to T plus the weighted sums (compensated, ≤ 2u_double·max|y|).
//
// Which rows: far ⟺ m < lw_max − far_logit(d), where m is the row's largest logit (from the fast pass) and
// lw_max the largest log-weight (0 without weights); then every point's logit is below lw_max − (d + 16) (without
// weights: every distance part is > d + 16; with them, those of the heaviest points). A row from
// the diffusion's own marginal has p ≈ χ²_d/2 ≈ d/2 at its nearest point, so it is redone with probability
// P(χ²_d > 2d + 32) < 1e-8 for every d: the hot loops' speed is unchanged in sampling. The CPU screens a far
// row's points in plain double first and runs double-double only on those within 80 nats of its best
// (csrc/cpu/posterior_row.h, posterior_row_far).
// Rows that are not far keep the fast kernels' bound (their distance part ≤ d + 16 + 40 for every point of
// weight ≥ e^-40): a logit error ≤ (kDimBlock + 3)·u·(d + 56) (posterior_blocked.h, posterior_row.h).
//
// No FMA contraction can break the error-free transforms: two_sum has no products, two_prod uses fma itself.
#pragma once
#include <math.h>

#include <cstdint>

#if defined(__CUDACC__)
#define FD_FAR_HD __host__ __device__ __forceinline__
#else
#define FD_FAR_HD inline
#endif

namespace fastdiff::far {

struct DD {   // hi + lo, |lo| ≤ ulp(hi)/2 after normalise
  double hi, lo;
};

FD_FAR_HD DD two_sum(double a, double b) {   // a + b = s + e exactly (Knuth)
  const double s = a + b;
  const double bb = s - a;
  return {s, (a - (s - bb)) + (b - bb)};
}
FD_FAR_HD DD two_prod(double a, double b) {  // a·b = p + e exactly
  const double p = a * b;
  return {p, ::fma(a, b, -p)};
}
FD_FAR_HD DD normalise(double hi, double lo) {
  const double s = hi + lo;
  return {s, lo - (s - hi)};
}

// The distance part of a far row's rule: redo the row when its largest logit m is below lw_max − far_logit(d).
FD_FAR_HD double far_logit(int64_t d) { return static_cast<double>(d) + 16.0; }
FD_FAR_HD bool is_far(double m, double lw_max, int64_t d) { return m < lw_max - far_logit(d); }

// x − αy as (x − c1·y) + c2·y (the kernels' alpha split, c2 kept in double), in double-double.
struct Diff {
  double c1, c2;
  FD_FAR_HD explicit Diff(double alpha) : c1(alpha >= 0.5 ? 1.0 : 0.0), c2(alpha >= 0.5 ? 1.0 - alpha : -alpha) {}
  FD_FAR_HD DD operator()(double x, double y) const {
    const DD s = two_sum(x, -c1 * y);          // c1 ∈ {0, 1}: c1·y exact
    const DD p = two_prod(c2, y);
    const DD h = two_sum(s.hi, p.hi);
    return {h.hi, h.lo + s.lo + p.lo};         // the low parts are ≤ u·|diff| each: their sum's rounding is u²
  }
};

// Σ_k diff_k² accumulated in double-double (sq_add per dimension).
FD_FAR_HD void sq_add(DD& acc, DD diff) {
  const DD q = two_prod(diff.hi, diff.hi);
  const DD t = two_sum(acc.hi, q.hi);
  acc.hi = t.hi;
  acc.lo += t.lo + q.lo + 2.0 * diff.hi * diff.lo;
}

// The logit lw − dist·inv2c in double-double, with the shared numeric rule 2: a finite-weight point keeps a
// logit ≥ −floor (−max_finite of the working type) even when its distance overflowed (hi not finite).
FD_FAR_HD DD far_logit_of(double lw, DD dist, double inv2c, double floor) {
  if (!(lw > -INFINITY)) return {-INFINITY, 0.0};
  const DD p = two_prod(dist.hi, inv2c);
  const DD l = two_sum(lw, -p.hi);
  const DD r = normalise(l.hi, l.lo - (p.lo + dist.lo * inv2c));
  return (r.hi < -floor || !(r.hi == r.hi) || !(dist.hi < INFINITY)) ? DD{-floor, 0.0} : r;
}
FD_FAR_HD bool dd_greater(DD a, DD b) { return a.hi > b.hi || (a.hi == b.hi && a.lo > b.lo); }
// e^{l − m} for l ≤ m (differences of nearby values: l.hi − m.hi is exact when they are within a factor 2).
FD_FAR_HD double dd_exp_diff(DD l, DD m) { return exp((l.hi - m.hi) + (l.lo - m.lo)); }

// Neumaier's compensated sum: value + comp, error ≤ 2u·Σ|terms| + O(n u²).
FD_FAR_HD void comp_add(double& sum, double& comp, double v) {
  const double t = sum + v;
  comp += fabs(sum) >= fabs(v) ? (sum - t) + v : (v - t) + sum;
  sum = t;
}

}  // namespace fastdiff::far
