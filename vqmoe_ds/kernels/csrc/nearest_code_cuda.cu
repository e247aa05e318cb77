// CUDA kernel of vqmoe_ds::nearest_code_kernel (same contract as the CPU kernel: nearest_code.h).
//
// One pass over the codebook per block of 128 tokens (one token per thread):
//   for each tile of KC codes:   the tile (W = -2V or -V/|V|, fp32) is staged through shared memory
//     in chunks of DC features, together with the block's x chunk (coalesced, transposed); each thread
//     accumulates KC fp32 dot products in registers (explicit __fmaf_rn), adds ||v||^2 (l2), and
//     updates its running minimum and its list of near-tie candidates (<= kMaxCand).
//   then each thread settles its token: one candidate => done; several => exact fp64 re-check
//     (sequential over d with __dadd_rn/__dmul_rn, which are never contracted into FMAs, so the bits
//     equal the CPU kernel's and the torch path's); too many candidates, unsafe scale or NaN/inf =>
//     the token is flagged and a second kernel evaluates its full row exactly (one block per token).
// Extra memory: O(T) (flags, norms) + O(K d) for the prepared codebook; the T x K matrix never exists.
// Any K and d: codes and features are tiled, tails are masked.  x may have any strides and be
// fp32/bf16/fp16 (upcast on load).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <math_constants.h>

#include <cfloat>
#include <limits>
#include <tuple>

#include "nearest_code.h"

namespace vqmoe {
namespace {

constexpr int kThreads = 128;  // tokens per block
constexpr int KC = 32;         // codes per register tile
constexpr int DC = 32;         // features per shared-memory chunk

template <typename T>
__device__ __forceinline__ float ld(const T* p) {
  return static_cast<float>(*p);
}

// ---- exact fp64 distances: sequential over d, IEEE round-to-nearest intrinsics (no contraction) ----
template <typename T>
__device__ double l2_exact(const T* x, int64_t sx, const float* v, int64_t d) {
  double acc = 0.0;
  for (int64_t j = 0; j < d; ++j) {
    const double t = __dsub_rn(static_cast<double>(ld(x + j * sx)), static_cast<double>(v[j]));
    acc = __dadd_rn(acc, __dmul_rn(t, t));
  }
  return acc;
}

template <typename T>
__device__ double dot_exact(const T* x, int64_t sx, const float* v, int64_t d) {
  double acc = 0.0;
  for (int64_t j = 0; j < d; ++j)
    acc = __dadd_rn(acc, __dmul_rn(static_cast<double>(ld(x + j * sx)), static_cast<double>(v[j])));
  return acc;
}

template <typename T>
__device__ double norm_exact(const T* x, int64_t sx, int64_t d) {
  double acc = 0.0;
  for (int64_t j = 0; j < d; ++j) {
    const double t = static_cast<double>(ld(x + j * sx));
    acc = __dadd_rn(acc, __dmul_rn(t, t));
  }
  return __dsqrt_rn(acc);
}

template <typename T>
__device__ double exact_dist(const T* x, int64_t sx, double nx, const float* v, double nv, int64_t d,
                             int64_t mode) {
  if (mode == kL2) return l2_exact(x, sx, v, d);
  const double dot = dot_exact(x, sx, v, d);
  const double c = (nx == 0.0 || nv == 0.0) ? 0.0 : __ddiv_rn(dot, __dmul_rn(nx, nv));
  return __dsub_rn(1.0, c);
}

__device__ __forceinline__ float round_up_to_float(double t) {
  return __double2float_ru(t);  // smallest float >= t
}

// Exact |v_k| per code (sequential fp64), one thread per code.
__global__ void code_norms_kernel(const float* __restrict__ v, int64_t K, int64_t d, double* __restrict__ nv) {
  const int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (k < K) nv[k] = norm_exact(v + k * d, 1, d);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
fused_kernel(const T* __restrict__ x, int64_t sx0, int64_t sx1, int64_t Ttok, int64_t d,
             const float* __restrict__ w, const float* __restrict__ bias, const float* __restrict__ v,
             const double* __restrict__ nv, int64_t K, double vmax, int64_t mode, bool want_dist,
             int64_t* __restrict__ idx_out, float* __restrict__ dist_out, uint8_t* __restrict__ flag_out) {
  __shared__ float xs[DC][kThreads + 1];
  __shared__ float ws[KC][DC + 1];
  const int tid = threadIdx.x;
  const int64_t t0 = blockIdx.x * static_cast<int64_t>(kThreads);
  const int64_t tok = t0 + tid;
  const bool active = tok < Ttok;
  const T* xrow = x + (active ? tok : 0) * sx0;

  // Bound inputs: |x| with 4 fp64 lanes (only an upper-bound estimate; the exact norm comes later).
  double nx = 0.0;
  if (active) {
    double a[4] = {0, 0, 0, 0};
    for (int64_t j = 0; j < d; ++j) {
      const double t = static_cast<double>(ld(xrow + j * sx1));
      a[j & 3] += t * t;
    }
    nx = sqrt((a[0] + a[1]) + (a[2] + a[3]));
  }
  bool overflow = !active || !fast_path_ok(mode, nx, vmax);
  const double err2 = 2.0 * score_error_bound(mode, nx, vmax, d);
  float best = CUDART_INF_F;
  int count = 0;
  float cand_s[kMaxCand];
  int64_t cand_k[kMaxCand];

  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    float acc[KC];
#pragma unroll
    for (int c = 0; c < KC; ++c) acc[c] = 0.f;
    for (int64_t j0 = 0; j0 < d; j0 += DC) {
      __syncthreads();
      // x chunk: rows t0..t0+127, features j0..j0+DC-1 (consecutive threads read consecutive features).
      for (int e = tid; e < kThreads * DC; e += kThreads) {
        const int r = e / DC, j = e % DC;
        const int64_t tr = t0 + r, jj = j0 + j;
        xs[j][r] = (tr < Ttok && jj < d) ? ld(x + tr * sx0 + jj * sx1) : 0.f;
      }
      for (int e = tid; e < KC * DC; e += kThreads) {
        const int c = e / DC, j = e % DC;
        const int64_t kk = k0 + c, jj = j0 + j;
        ws[c][j] = (kk < K && jj < d) ? w[kk * d + jj] : 0.f;
      }
      __syncthreads();
#pragma unroll 4
      for (int j = 0; j < DC; ++j) {
        const float xv = xs[j][tid];
#pragma unroll
        for (int c = 0; c < KC; ++c) acc[c] = __fmaf_rn(xv, ws[c][j], acc[c]);
      }
    }
    if (overflow) continue;  // still takes part in the block's loads and barriers
    const int kc = K - k0 < KC ? static_cast<int>(K - k0) : KC;
    float m = CUDART_INF_F;
#pragma unroll
    for (int c = 0; c < KC; ++c) {
      if (c < kc) {
        if (bias != nullptr) acc[c] = __fadd_rn(bias[k0 + c], acc[c]);
        m = fminf(m, acc[c]);
      }
    }
    if (m < best) best = m;
    const float thr = round_up_to_float(static_cast<double>(best) + err2);
    if (m > thr) continue;
    int kept = 0;
    for (int c = 0; c < count; ++c)
      if (cand_s[c] <= thr) {
        cand_s[kept] = cand_s[c];
        cand_k[kept++] = cand_k[c];
      }
    count = kept;
#pragma unroll
    for (int c = 0; c < KC; ++c) {
      if (c < kc && acc[c] <= thr && !overflow) {
        if (count == kMaxCand) {
          overflow = true;
        } else {
          cand_s[count] = acc[c];
          cand_k[count++] = k0 + c;
        }
      }
    }
  }
  if (!active) return;
  if (overflow) {
    flag_out[tok] = 1;
    return;
  }
  flag_out[tok] = 0;
  const bool needs_exact = count != 1 || want_dist;
  const double nxe = (mode == kCosine && needs_exact) ? norm_exact(xrow, sx1, d) : 0.0;
  int64_t best_k = cand_k[0];
  double best_d = 0.0;
  if (count == 1) {
    if (want_dist) best_d = exact_dist(xrow, sx1, nxe, v + best_k * d, nv[best_k], d, mode);
  } else {
    for (int c = 0; c < count; ++c) {  // candidates are in increasing code order: '<' keeps lowest
      const double dd = exact_dist(xrow, sx1, nxe, v + cand_k[c] * d, nv[cand_k[c]], d, mode);
      if (c == 0 || dd < best_d) {
        best_d = dd;
        best_k = cand_k[c];
      }
    }
  }
  idx_out[tok] = best_k;
  if (want_dist) dist_out[tok] = static_cast<float>(best_d);
}

// Full-row exact argmin with torch.argmin semantics, one block per flagged token.
struct Best {
  double val;
  int64_t k;
  bool nan;
};

__device__ __forceinline__ bool better(const Best& a, const Best& b) {  // is a preferred over b?
  if (a.nan || b.nan) return a.nan && (!b.nan || a.k < b.k);
  return a.val < b.val || (a.val == b.val && a.k < b.k);
}

template <typename T>
__global__ void full_row_kernel(const T* __restrict__ x, int64_t sx0, int64_t sx1, int64_t d,
                                const int64_t* __restrict__ rows, const float* __restrict__ v,
                                const double* __restrict__ nv, int64_t K, int64_t mode, bool want_dist,
                                int64_t* __restrict__ idx_out, float* __restrict__ dist_out) {
  __shared__ Best red[256];
  const int64_t tok = rows[blockIdx.x];
  const T* xrow = x + tok * sx0;
  const double nx = mode == kCosine ? norm_exact(xrow, sx1, d) : 0.0;
  Best b{CUDART_INF, K, false};
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const double dd = exact_dist(xrow, sx1, nx, v + k * d, nv[k], d, mode);
    Best c{dd, k, dd != dd};
    if (b.k == K || better(c, b)) b = c;  // first element of the thread, or an improvement
  }
  red[threadIdx.x] = b;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      const Best o = red[threadIdx.x + s];
      if (o.k < K && (red[threadIdx.x].k == K || better(o, red[threadIdx.x]))) red[threadIdx.x] = o;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    // An all-inf row: 'better' never fires between equal infs except by index, so k is the lowest.
    idx_out[tok] = red[0].k;
    if (want_dist) dist_out[tok] = static_cast<float>(red[0].val);
  }
}

std::tuple<at::Tensor, at::Tensor> nearest_code_cuda(const at::Tensor& x, const at::Tensor& codebook,
                                                     int64_t mode, bool return_distances) {
  TORCH_CHECK(x.is_cuda() && codebook.is_cuda(), "nearest_code: CUDA kernel needs CUDA tensors");
  TORCH_CHECK(x.dim() == 2 && codebook.dim() == 2, "nearest_code: x and codebook must be 2-D");
  TORCH_CHECK(x.size(1) == codebook.size(1), "nearest_code: feature sizes differ");
  TORCH_CHECK(mode == kL2 || mode == kCosine, "nearest_code: mode must be 0 (l2) or 1 (cosine)");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t T = x.size(0), d = x.size(1), K = codebook.size(0);
  TORCH_CHECK(K >= 1 && d >= 1, "nearest_code: need K >= 1 and d >= 1");
  auto idx = at::zeros({T}, x.options().dtype(at::kLong));
  auto dist = at::empty({return_distances ? T : 0}, x.options().dtype(at::kFloat));
  if (T == 0) return {idx, dist};
  auto stream = c10::cuda::getCurrentCUDAStream();

  at::Tensor v = codebook.to(at::kFloat).contiguous();
  at::Tensor nv = at::empty({K}, v.options().dtype(at::kDouble));
  code_norms_kernel<<<(K + 255) / 256, 256, 0, stream>>>(v.data_ptr<float>(), K, d, nv.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const double vmax = nv.max().item<double>();
  const bool finite = v.isfinite().all().item<bool>() && vmax * vmax <= kScaleLimit;
  at::Tensor w, bias;
  if (mode == kL2) {
    w = v * -2.0f;
    bias = (nv * nv).to(at::kFloat);
  } else {
    w = at::where(nv.unsqueeze(1) == 0, at::zeros({}, nv.options()), -v.to(at::kDouble) / nv.unsqueeze(1))
            .to(at::kFloat)
            .contiguous();
  }
  at::Tensor flags = at::ones({T}, x.options().dtype(at::kByte));
  float* pdist = return_distances ? dist.data_ptr<float>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "nearest_code_cuda", [&] {
    const scalar_t* px = x.data_ptr<scalar_t>();
    if (finite) {
      const int64_t blocks = (T + kThreads - 1) / kThreads;
      fused_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          px, x.stride(0), x.stride(1), T, d, w.data_ptr<float>(),
          mode == kL2 ? bias.data_ptr<float>() : nullptr, v.data_ptr<float>(), nv.data_ptr<double>(), K, vmax,
          mode, return_distances, idx.data_ptr<int64_t>(), pdist, flags.data_ptr<uint8_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    at::Tensor rows = flags.nonzero().select(1, 0).contiguous();
    const int64_t nrows = rows.size(0);
    if (nrows > 0) {
      full_row_kernel<scalar_t><<<nrows, 256, 0, stream>>>(px, x.stride(0), x.stride(1), d,
                                                           rows.data_ptr<int64_t>(), v.data_ptr<float>(),
                                                           nv.data_ptr<double>(), K, mode, return_distances,
                                                           idx.data_ptr<int64_t>(), pdist);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {idx, dist};
}

}  // namespace
}  // namespace vqmoe

TORCH_LIBRARY_IMPL(vqmoe_ds, CUDA, m) { m.impl("nearest_code_kernel", &vqmoe::nearest_code_cuda); }
