// CPU kernel of vqmoe_ds::nearest_code_kernel, plus the op's schema and its autograd rule.
//
// Algorithm (why: the tokens x K score matrix never exists, the dot products run at BLAS speed, and
// everything else is SIMD across tokens, so that even K=16 costs little more than the matmul):
//   for each tile of TT tokens (tiles run in parallel, one per thread):
//     for each block of KB codes:
//       S^T = W_block @ X_tile^T   (at::mm into a KB x TT fp32 scratch that stays in cache;
//                                   W = -2 V for l2, -V/|V| for cosine, so no rescale pass)
//       per token, vectorised across tokens: track the best and second-best score s1 <= s2 (bias
//       ||v||^2 added on the fly for l2) and the best code.
//     per token: if s2 > s1 + 2*error bound, the best code is provably the exact argmin (the usual
//     case).  Otherwise (near-tie, duplicate codes...) the token's scores are recomputed, every code
//     within the bound is re-checked with the exact fp64 formula of nearest_code.h (ties -> lowest
//     index); more than kMaxCand such codes, unsafe scale, or NaN/inf => exact fp64 full row.
// Extra memory per thread: KB*TT floats of scores, TT*d floats when x needs a dtype/layout
// conversion, O(TT) state; plus O(K d) for the prepared codebook.  Nothing grows with T except the
// outputs.  Measured alternative (docs/kernels.md): a per-token row scan after an X @ W^T tile was
// 2x slower than the matmul at K=16, because its scalar per-token bookkeeping (~120 cycles) was as
// long as the matmul itself.
//
// Compiled with -ffp-contract=off so the fp64 re-check is evaluated exactly as the torch path does.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <Python.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "nearest_code.h"

namespace vqmoe {
namespace {

// ---- exact fp64 reference distances (sequential over d, no FMA) ------------------------------
inline double l2_exact(const float* x, const float* v, int64_t d) {
  double acc = 0.0;
  for (int64_t j = 0; j < d; ++j) {
    const double t = static_cast<double>(x[j]) - static_cast<double>(v[j]);
    acc += t * t;
  }
  return acc;
}

inline double dot_exact(const float* x, const float* v, int64_t d) {
  double acc = 0.0;
  for (int64_t j = 0; j < d; ++j) acc += static_cast<double>(x[j]) * static_cast<double>(v[j]);
  return acc;
}

inline double norm_exact(const float* x, int64_t d) { return std::sqrt(dot_exact(x, x, d)); }

// |x|^2 for the error bound only: 8 independent fp64 lanes so it vectorises (a sequential sum is
// latency bound).  Its relative error (< 1e-14) is far inside the bound's safety factor of 2.
inline double sumsq_fast(const float* x, int64_t d) {
  constexpr int L = 8;
  double acc[L] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + L <= d; j += L)
    for (int l = 0; l < L; ++l) acc[l] += static_cast<double>(x[j + l]) * static_cast<double>(x[j + l]);
  for (; j < d; ++j) acc[0] += static_cast<double>(x[j]) * static_cast<double>(x[j]);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

inline double cosine_exact(const float* x, double nx, const float* v, double nv, int64_t d) {
  const double dot = dot_exact(x, v, d);
  const double c = (nx == 0.0 || nv == 0.0) ? 0.0 : dot / (nx * nv);
  return 1.0 - c;
}

struct Codebook {
  at::Tensor v;      // [K, d] fp32 contiguous: the codes, for the exact re-check
  at::Tensor w;      // [K, d] fp32: -2 v (l2) or -v/|v| (cosine), the fast-path operand
  at::Tensor bias;   // [K] fp32: ||v||^2 rounded (l2); undefined for cosine
  std::vector<double> norm;  // exact |v_k| (sequential fp64), for cosine
  double vmax = 0.0;         // max_k |v_k|
  bool finite = true;        // all entries finite and scale safe
  int64_t first_nan = -1;    // lowest code index holding a NaN, -1 if none
};

Codebook prepare_codebook(const at::Tensor& codebook, int64_t mode) {
  Codebook cb;
  cb.v = codebook.to(at::kFloat).contiguous();
  const int64_t K = cb.v.size(0), d = cb.v.size(1);
  const float* pv = cb.v.data_ptr<float>();
  cb.norm.resize(K);
  double vmax = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    const float* row = pv + k * d;
    bool nan_row = false, finite_row = true;
    for (int64_t j = 0; j < d; ++j) {
      nan_row |= std::isnan(row[j]);
      finite_row &= std::isfinite(row[j]);
    }
    if (nan_row && cb.first_nan < 0) cb.first_nan = k;
    cb.finite &= finite_row;
    cb.norm[k] = norm_exact(row, d);
    if (cb.norm[k] > vmax) vmax = cb.norm[k];
  }
  cb.vmax = vmax;
  if (!(vmax * vmax <= kScaleLimit)) cb.finite = false;
  if (!cb.finite) return cb;
  cb.w = at::empty({K, d}, cb.v.options());
  float* pw = cb.w.data_ptr<float>();
  if (mode == kL2) {
    cb.bias = at::empty({K}, cb.v.options());
    float* pb = cb.bias.data_ptr<float>();
    for (int64_t k = 0; k < K; ++k) {
      pb[k] = static_cast<float>(cb.norm[k] * cb.norm[k]);
      for (int64_t j = 0; j < d; ++j) pw[k * d + j] = -2.0f * pv[k * d + j];  // exact scaling
    }
  } else {
    for (int64_t k = 0; k < K; ++k) {
      const double n = cb.norm[k];
      for (int64_t j = 0; j < d; ++j)
        pw[k * d + j] = n == 0.0 ? 0.0f : static_cast<float>(-static_cast<double>(pv[k * d + j]) / n);
    }
  }
  return cb;
}

// Exact full-row argmin (torch.argmin semantics on the fp64 distance row).
inline void full_row(const float* x, const Codebook& cb, int64_t mode, int64_t d, int64_t& out_k,
                     double& out_d) {
  const int64_t K = cb.v.size(0);
  const float* pv = cb.v.data_ptr<float>();
  const double nx = mode == kCosine ? norm_exact(x, d) : 0.0;
  double best = std::numeric_limits<double>::infinity();
  int64_t best_k = 0;
  for (int64_t k = 0; k < K; ++k) {
    const double dist = mode == kL2 ? l2_exact(x, pv + k * d, d)
                                    : cosine_exact(x, nx, pv + k * d, cb.norm[k], d);
    if (k == 0) best = dist;  // argmin of an all-inf row is 0
    if (argmin_update(dist, k, best, best_k)) break;
  }
  out_k = best_k;
  out_d = best;
}

inline double exact_dist(const float* x, double nx, const Codebook& cb, int64_t k, int64_t mode,
                         int64_t d) {
  const float* v = cb.v.data_ptr<float>() + k * d;
  return mode == kL2 ? l2_exact(x, v, d) : cosine_exact(x, nx, v, cb.norm[k], d);
}

// ---- SIMD helpers: GCC vector extensions (8 lanes), lowered to SSE, AVX2 or AVX-512 by each
// target_clones version below.
typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));

inline vf8 load8(const float* p) {
  vf8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline vi8 load8i(const int32_t* p) {
  vi8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store8(float* p, vf8 v) { std::memcpy(p, &v, sizeof(v)); }
inline void store8i(int32_t* p, vi8 v) { std::memcpy(p, &v, sizeof(v)); }

int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  const long long r = std::atoll(v);
  return r > 0 ? static_cast<int64_t>(r) : fallback;
}

// The per-tile work (everything but the thread split).  target_clones compiles it, with the helpers
// inlined into it, for AVX-512, AVX2 and baseline x86-64, chosen at load time: the build stays
// portable (no -march=native) while the scans use the machine's widest vectors.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VQ_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VQ_MULTIVERSION
#endif

struct TileArgs {
  const at::Tensor* x;
  const Codebook* cb;
  int64_t mode, T, d, K, TT, KB, refine_rows;
  bool x_is_f32_contig, return_distances;
  int64_t* pidx;
  float* pdist;
};

struct TileScratch {
  at::Tensor scores;            // [KB, TTpad] fp32
  std::vector<float> s1, s2;    // best and second-best fast score per token (TTpad)
  std::vector<int32_t> am;      // code of s1
  std::vector<float> margin;    // per token: fp32 threshold margin (see below)
  std::vector<uint8_t> slow;    // token must take the exact full-row path
  std::vector<uint8_t> single;  // the fast path settled the token
  std::vector<double> nx2;      // |x|^2 estimate (bound only)
  std::vector<int64_t> refine;  // tokens with near-ties
};

// Running best/second-best over the codes of one block, 8 tokens per vector; s1, s2, am hold the
// state of the tile's tokens (padded to a multiple of 8).
inline void top2_block(const float* S, int64_t ld, int64_t kb, int64_t npad, const float* bias,
                       int32_t k0, float* s1, float* s2, int32_t* am) {
  for (int64_t t = 0; t < npad; t += 8) {
    vf8 a = load8(s1 + t), b = load8(s2 + t);
    vi8 ai = load8i(am + t);
    const float* col = S + t;
    for (int64_t k = 0; k < kb; ++k) {
      vf8 v = load8(col + k * ld);
      if (bias) v = v + bias[k];
      const vi8 lt = v < a;
      const vf8 mn = v < b ? v : b;
      b = lt ? a : mn;
      a = lt ? v : a;
      const int32_t kk = k0 + static_cast<int32_t>(k);
      ai = lt ? vi8{kk, kk, kk, kk, kk, kk, kk, kk} : ai;
    }
    store8(s1 + t, a);
    store8(s2 + t, b);
    store8i(am + t, ai);
  }
}

// Near-tie tokens: recompute their fast scores against all codes (any fp32 evaluation obeys the
// same error bound), re-check every code within the bound exactly; too many => full exact row.
inline void settle_near_ties(const TileArgs& a, const float* px, const at::Tensor& xt, int64_t t0,
                             const std::vector<int64_t>& rows, const std::vector<float>& margin) {
  const Codebook& cb = *a.cb;
  const int64_t d = a.d, K = a.K, mode = a.mode;
  const int64_t chunk = std::max<int64_t>(1, a.refine_rows);
  for (int64_t r0 = 0; r0 < static_cast<int64_t>(rows.size()); r0 += chunk) {
    const int64_t nr = std::min<int64_t>(chunk, static_cast<int64_t>(rows.size()) - r0);
    at::Tensor sel = at::from_blob(const_cast<int64_t*>(rows.data() + r0), {nr}, at::kLong);
    at::Tensor S = at::mm(xt.index_select(0, sel), cb.w.t());  // [nr, K]
    if (mode == kL2) S = cb.bias.unsqueeze(0) + S;
    S = S.contiguous();
    const float* ps = S.data_ptr<float>();
    for (int64_t i = 0; i < nr; ++i) {
      const int64_t r = rows[r0 + i];
      const float* row = ps + i * K;
      const float* xr = px + r * d;
      float m = row[0];
      for (int64_t k = 1; k < K; ++k) m = row[k] < m ? row[k] : m;
      const float thr = m + margin[r];
      int64_t cand[kMaxCand];
      int count = 0;
      bool overflow = false;
      for (int64_t k = 0; k < K && !overflow; ++k)
        if (row[k] <= thr) {
          if (count == kMaxCand) overflow = true;
          else cand[count++] = k;
        }
      int64_t best_k = 0;
      double best_d = 0.0;
      if (overflow) {
        full_row(xr, cb, mode, d, best_k, best_d);
      } else {
        const double nx = mode == kCosine ? norm_exact(xr, d) : 0.0;
        for (int c = 0; c < count; ++c) {  // increasing code order: '<' keeps the lowest index
          const double dd = exact_dist(xr, nx, cb, cand[c], mode, d);
          if (c == 0 || dd < best_d) {
            best_d = dd;
            best_k = cand[c];
          }
        }
      }
      a.pidx[t0 + r] = best_k;
      if (a.pdist) a.pdist[t0 + r] = static_cast<float>(best_d);
    }
  }
}

VQ_MULTIVERSION void process_tile(const TileArgs& a, int64_t tile, TileScratch& w) {
  const at::Tensor& x = *a.x;
  const Codebook& cb = *a.cb;
  const int64_t mode = a.mode, T = a.T, d = a.d, K = a.K, TT = a.TT, KB = a.KB;
  const int64_t t0 = tile * TT, n = std::min(TT, T - t0), npad = (n + 7) / 8 * 8;
  at::Tensor xt = x.narrow(0, t0, n);
  if (!a.x_is_f32_contig) xt = xt.to(at::kFloat).contiguous();
  const float* px = xt.data_ptr<float>();
  const float inf = std::numeric_limits<float>::infinity();

  // Per token: is the fast path safe (fast_path_ok), and the fp32 margin M such that
  // fl(s1 + M) >= s1 + 2E for the error bound E of score_error_bound.  Since |s1| <= A^2
  // (A = |x| + max|v| for l2, |x| for cosine), M >= 2E + 4u A^2 covers the rounding of that fp32
  // addition; M is >= 2^-121 (normal fp32), so rounding m(1 + 2^-20) to fp32 cannot go below m.
  // Written as branch-free loops over tokens so that they vectorise (the scalar version, with its
  // sqrt latency, cost more than the K=16 matmul).
  for (int64_t r = 0; r < n; ++r) w.nx2[r] = sumsq_fast(px + r * d, d);
  const double vmax = cb.vmax, rel = 4.0 * static_cast<double>(d + 4) * kUnitRoundoff,
               abs_term = 8.0 * static_cast<double>(d + 2) * kMinNormal;
  const bool l2 = mode == kL2, cb_ok = cb.finite;
  int64_t n_fast = 0;
  for (int64_t r = 0; r < n; ++r) {
    const double nx = std::sqrt(w.nx2[r]);
    const double A = l2 ? nx + vmax : nx;
    const double aa = A * A;
    const double err = l2 ? rel * aa + abs_term : rel * nx + abs_term;  // score_error_bound
    const double m = (2.0 * err + 4.0 * kUnitRoundoff * aa) * (1.0 + 9.5367431640625e-07);  // 1 + 2^-20
    const bool ok = cb_ok & (nx <= kScaleLimit) & (!l2 | (aa <= kScaleLimit));  // fast_path_ok
    w.margin[r] = ok ? static_cast<float>(m) : 0.0f;
    w.slow[r] = !ok;
    n_fast += ok;
  }
  const bool any_fast = n_fast > 0;
  for (int64_t r = 0; r < npad; ++r) {
    w.s1[r] = inf;
    w.s2[r] = inf;
    w.am[r] = 0;
  }
  if (any_fast) {
    for (int64_t k0 = 0; k0 < K; k0 += KB) {
      const int64_t kb = std::min(KB, K - k0);
      at::Tensor sc = w.scores.narrow(0, 0, kb).narrow(1, 0, n);
      at::mm_out(sc, cb.w.narrow(0, k0, kb), xt.t());
      const float* pb = mode == kL2 ? cb.bias.data_ptr<float>() + k0 : nullptr;
      top2_block(sc.data_ptr<float>(), sc.stride(0), kb, npad, pb, static_cast<int32_t>(k0), w.s1.data(),
                 w.s2.data(), w.am.data());
    }
  }
  // Settle: the best code is the answer when nothing else is within the margin (vectorised test);
  // the rest (near-ties, slow tokens) are rare and handled one by one.
  for (int64_t r = 0; r < n; ++r) {
    w.single[r] = (w.s2[r] > w.s1[r] + w.margin[r]) & !w.slow[r];
    a.pidx[t0 + r] = w.am[r];
  }
  w.refine.clear();
  for (int64_t r = 0; r < n; ++r) {
    if (w.single[r] && !a.pdist) continue;
    const float* xr = px + r * d;
    if (w.slow[r]) {
      int64_t k;
      double dist;
      full_row(xr, cb, mode, d, k, dist);
      a.pidx[t0 + r] = k;
      if (a.pdist) a.pdist[t0 + r] = static_cast<float>(dist);
    } else if (w.single[r]) {  // only the distance is left to compute
      const int64_t k = w.am[r];
      const double nx = mode == kCosine ? norm_exact(xr, d) : 0.0;
      a.pdist[t0 + r] = static_cast<float>(exact_dist(xr, nx, cb, k, mode, d));
    } else {
      w.refine.push_back(r);
    }
  }
  if (!w.refine.empty()) settle_near_ties(a, px, xt, t0, w.refine, w.margin);
}

std::tuple<at::Tensor, at::Tensor> nearest_code_cpu(const at::Tensor& x, const at::Tensor& codebook,
                                                    int64_t mode, bool return_distances) {
  TORCH_CHECK(x.dim() == 2 && codebook.dim() == 2, "nearest_code: x and codebook must be 2-D");
  TORCH_CHECK(x.size(1) == codebook.size(1), "nearest_code: feature sizes differ");
  TORCH_CHECK(mode == kL2 || mode == kCosine, "nearest_code: mode must be 0 (l2) or 1 (cosine)");
  const int64_t T = x.size(0), d = x.size(1), K = codebook.size(0);
  TORCH_CHECK(K >= 1 && d >= 1, "nearest_code: need K >= 1 and d >= 1");
  TORCH_CHECK(K < (int64_t(1) << 31), "nearest_code: K must be < 2^31");
  auto idx = at::zeros({T}, x.options().dtype(at::kLong));
  auto dist = at::empty({return_distances ? T : 0}, x.options().dtype(at::kFloat));
  if (T == 0) return {idx, dist};

  Codebook cb = prepare_codebook(codebook, mode);
  if (cb.first_nan >= 0) {  // every distance to that code is NaN, whatever x is
    idx.fill_(cb.first_nan);
    if (return_distances) dist.fill_(std::numeric_limits<float>::quiet_NaN());
    return {idx, dist};
  }

  // Tile shape.  TT tokens: the x tile (TT*d floats) stays in L2 while the mm sweeps the codebook
  // blocks.  KB codes: the score block (KB*TT floats) about tile_elems, so per-call overhead of
  // at::mm is amortised at small K and the scan reads from cache at large K.  VQMOE_NC_TILE_* override
  // these for tuning (bench/argmin.py --help).
  const int64_t tile_elems = env_int("VQMOE_NC_TILE_ELEMS", int64_t(1) << 18);
  const int64_t tt_default = std::max<int64_t>(64, std::min<int64_t>(4096, (int64_t(1) << 17) / d)) / 8 * 8;
  const int64_t TT = std::min<int64_t>(env_int("VQMOE_NC_TILE_TOKENS", tt_default), T);
  const int64_t KB = std::min<int64_t>(env_int("VQMOE_NC_TILE_CODES", std::max<int64_t>(8, tile_elems / TT)), K);
  const int64_t ntiles = (T + TT - 1) / TT;
  const int64_t TTpad = (TT + 7) / 8 * 8;

  const TileArgs args{&x,
                      &cb,
                      mode,
                      T,
                      d,
                      K,
                      TT,
                      KB,
                      std::max<int64_t>(1, tile_elems / K),
                      x.scalar_type() == at::kFloat && x.is_contiguous(),
                      return_distances,
                      idx.data_ptr<int64_t>(),
                      return_distances ? dist.data_ptr<float>() : nullptr};
  at::parallel_for(0, ntiles, 1, [&](int64_t tb, int64_t te) {
    TileScratch w;
    w.scores = at::empty({KB, TTpad}, x.options().dtype(at::kFloat));
    w.s1.resize(TTpad);
    w.s2.resize(TTpad);
    w.am.resize(TTpad);
    w.margin.resize(TTpad);
    w.slow.resize(TTpad);
    w.single.resize(TTpad);
    w.nx2.resize(TTpad);
    for (int64_t tile = tb; tile < te; ++tile) process_tile(args, tile, w);
  });
  return {idx, dist};
}

// Autograd rule: the op is not differentiable (integer indices; the distance is a diagnostic
// evaluated in fp64).  Running below autograd gives outputs with requires_grad=False instead of the
// "no autograd formula" error that a missing Autograd kernel would raise on backward.
std::tuple<at::Tensor, at::Tensor> nearest_code_autograd(const at::Tensor& x, const at::Tensor& codebook,
                                                         int64_t mode, bool return_distances) {
  c10::impl::ExcludeDispatchKeyGuard guard(c10::autograd_dispatch_keyset);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("vqmoe_ds::nearest_code_kernel", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 int64_t, bool)>();
  return op.call(x.detach(), codebook.detach(), mode, return_distances);
}

}  // namespace
}  // namespace vqmoe

TORCH_LIBRARY(vqmoe_ds, m) {
  m.def("nearest_code_kernel(Tensor x, Tensor codebook, int mode, bool return_distances) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vqmoe_ds, CPU, m) { m.impl("nearest_code_kernel", &vqmoe::nearest_code_cpu); }

TORCH_LIBRARY_IMPL(vqmoe_ds, Autograd, m) { m.impl("nearest_code_kernel", &vqmoe::nearest_code_autograd); }

// A Python module with no functions: importing it (setup.py build) or loading it
// (torch.utils.cpp_extension.load) runs the registrations above.  Written against the bare C API
// instead of pybind11 because torch/extension.h roughly doubles the compile time.
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _nearest_code_ext
#endif
#define VQ_STR2(x) #x
#define VQ_STR(x) VQ_STR2(x)
#define VQ_CONCAT2(a, b) a##b
#define VQ_CONCAT(a, b) VQ_CONCAT2(a, b)

static struct PyModuleDef vq_module = {PyModuleDef_HEAD_INIT, VQ_STR(TORCH_EXTENSION_NAME),
                                       "vqmoe_ds nearest-code kernels (registered as torch ops)", -1,
                                       nullptr};

PyMODINIT_FUNC VQ_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&vq_module); }
