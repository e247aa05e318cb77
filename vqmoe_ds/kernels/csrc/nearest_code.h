// Shared definitions of the nearest-code kernels (CPU and CUDA).
//
// The contract (see vqmoe_ds/kernels/nearest_code.py for the full story):
//   * The reference distance of token x to code v is evaluated in fp64, summing over the feature
//     dimension j = 0..d-1 strictly in order, with no fused multiply-add:
//       l2:     D = sum_j (double(x_j) - double(v_j))^2
//       cosine: D = 1 - c,  c = dot / (|x| * |v|)  (c = 0 when |x| == 0 or |v| == 0),
//               dot = sum_j double(x_j) * double(v_j),  |x| = sqrt(sum_j double(x_j)^2).
//   * The chosen code is torch.argmin over the row of D: the first NaN if the row holds one,
//     otherwise the lowest index among the minima.
//   * Kernels rank codes with a fast fp32 score (a matmul) and re-check every code whose fp32 score
//     lies within a proven rounding bound of the best one with the fp64 formula above.  Because the
//     fp64 formula is evaluated in the same order here and in the torch path, the results are
//     bitwise identical, ties included.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define VQ_HD __host__ __device__ __forceinline__
#else
#define VQ_HD inline
#endif

namespace vqmoe {

// Unit roundoff of fp32 (round to nearest): 2^-24.
constexpr double kUnitRoundoff = 5.9604644775390625e-08;
// Smallest normal fp32 (2^-126): bounds the absolute error a product can lose to underflow, even
// with flush-to-zero.
constexpr double kMinNormal = 1.1754943508222875e-38;
// Tokens (or codebooks) whose scale could push an fp32 score near overflow skip the fast path and are
// evaluated exactly against every code.  FLT_MAX is 3.4e38; 1e36 leaves two orders of margin.
constexpr double kScaleLimit = 1e36;
// Candidates kept per token on the fast path; more than this many near-ties send the token to the
// exact full-row path (always correct, only slower).
constexpr int kMaxCand = 8;

enum Mode : int64_t { kL2 = 0, kCosine = 1 };

// Rounding-error bound on the fast fp32 score of a token.  For l2 the score is
//   s_k = fl(||v_k||^2) + fl(x . (-2 v_k)),  and |s_k - S_k| <= 2(d+4) u (|x| + max|v|)^2
// (dot-product bound gamma_d |x||v| for any summation order / FMA use, plus the roundings of
// ||v||^2 and of the final add); for cosine the score is fl(x . (-v_k/|v_k|)) and
// |s_k - S_k| <= (d+4) u |x|.  We return twice that (safety for the fp32 rounding of |x| and of the
// threshold itself) plus an absolute term covering underflow of all d products.
VQ_HD double score_error_bound(int64_t mode, double nx, double vmax, int64_t d) {
  const double rel = 4.0 * static_cast<double>(d + 4) * kUnitRoundoff;
  const double abs_term = 8.0 * static_cast<double>(d + 2) * kMinNormal;
  if (mode == kL2) {
    const double a = nx + vmax;
    return rel * a * a + abs_term;
  }
  return rel * nx + abs_term;
}

// True when the fast fp32 path is numerically safe for a token with norm nx (fp64).
VQ_HD bool fast_path_ok(int64_t mode, double nx, double vmax) {
  if (!(nx <= kScaleLimit)) return false;  // also catches NaN / inf
  if (mode == kL2) {
    const double a = nx + vmax;
    return a * a <= kScaleLimit;
  }
  return true;
}

// torch.argmin's update rule for one more element: NaN wins (first NaN kept), else strictly smaller.
// Returns true when the scan can stop (a NaN was found).
VQ_HD bool argmin_update(double value, int64_t k, double& best, int64_t& best_k) {
  if (value != value) {
    best = value;
    best_k = k;
    return true;
  }
  if (value < best) {
    best = value;
    best_k = k;
  }
  return false;
}

}  // namespace vqmoe
