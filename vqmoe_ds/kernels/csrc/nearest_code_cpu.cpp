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
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
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
    bool finite_row = true;
    for (int64_t j = 0; j < d; ++j) finite_row &= std::isfinite(row[j]);
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
// Everything called from process_tile is force-inlined: a helper left out of line is compiled for
// baseline x86-64 only (target_clones applies to process_tile's body), which made the 8x8 transpose
// 3x slower than the matmul.
#define VQ_INLINE inline __attribute__((always_inline))

typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));

VQ_INLINE vf8 load8(const float* p) {
  vf8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
VQ_INLINE vi8 load8i(const int32_t* p) {
  vi8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
VQ_INLINE void store8(float* p, vf8 v) { std::memcpy(p, &v, sizeof(v)); }
VQ_INLINE void store8i(int32_t* p, vi8 v) { std::memcpy(p, &v, sizeof(v)); }

// Upper bound on |x|^2, as an fp32 number, for the error bound only (the exact norm is computed
// where it matters).  fp32 with 16 lanes: this pass is the first touch of the x tile and was the
// largest cost after the matmul at K=16.  All terms are >= 0, so the fp32 sum is within relative
// (d+1)u of the truth; `inflate` = 1 + 2(d+4)u covers that and the final multiply.  If the sum
// could have underflowed or overflowed it is redone in fp64 and rounded upwards (at least to
// 2^-126; inf when beyond fp32, NaN input included).
VQ_INLINE float sumsq_bound(const float* x, int64_t d, float inflate) {
  const vf8 z = {0, 0, 0, 0, 0, 0, 0, 0};
  vf8 a0 = z, a1 = z;
  int64_t j = 0;
  for (; j + 16 <= d; j += 16) {
    const vf8 u = load8(x + j), v = load8(x + j + 8);
    a0 += u * u;
    a1 += v * v;
  }
  a0 += a1;
  float s = ((a0[0] + a0[1]) + (a0[2] + a0[3])) + ((a0[4] + a0[5]) + (a0[6] + a0[7]));
  for (; j < d; ++j) s += x[j] * x[j];
  if (s >= 0x1p-100f && s <= 0x1p100f) return s * inflate;
  double acc = 0.0;  // tiny, huge, or non-finite: fp64 has the range
  for (int64_t i = 0; i < d; ++i) acc += static_cast<double>(x[i]) * static_cast<double>(x[i]);
  acc *= 1.0 + 1e-6;
  if (!(acc <= 3.0e38)) return std::numeric_limits<float>::infinity();
  return acc < 0x1p-126 ? 0x1p-126f : static_cast<float>(acc);
}

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

// Hand-written alternative to at::mm for the score block, kept to measure the choice (select with
// VQMOE_NC_GEMM=hand; docs/kernels.md has the numbers).  S^T[k, t] = sum_j W[k, j] * XT[j, t] for a
// block of kb codes and npad tokens (XT = the x tile transposed, zero-padded), register-blocked 4 codes x
// 16 tokens.  Compiled with FMA contraction (the score error bound allows any fp32 evaluation) and
// for x86-64-v4/v3 (FMA) or baseline; it is a separate, never-inlined function so that contraction
// cannot reach the exact fp64 re-check.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VQ_GEMM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), \
                                     optimize("fp-contract=fast"), noinline))
#else
#define VQ_GEMM_CLONES
#endif
VQ_GEMM_CLONES void hand_scores(const float* W, int64_t kb, int64_t d, const float* XT, int64_t npad, float* S) {
  int64_t k = 0;
  for (; k + 4 <= kb; k += 4) {
    const float* w0 = W + k * d;
    for (int64_t t = 0; t < npad; t += 16) {
      const bool two = t + 16 <= npad;
      vf8 acc[4][2] = {};
      for (int64_t j = 0; j < d; ++j) {
        const vf8 x0 = load8(XT + j * npad + t);
        const vf8 x1 = two ? load8(XT + j * npad + t + 8) : vf8{};
        for (int c = 0; c < 4; ++c) {
          const float wv = w0[c * d + j];
          acc[c][0] += wv * x0;
          acc[c][1] += wv * x1;
        }
      }
      for (int c = 0; c < 4; ++c) {
        store8(S + (k + c) * npad + t, acc[c][0]);
        if (two) store8(S + (k + c) * npad + t + 8, acc[c][1]);
      }
    }
  }
  for (; k < kb; ++k)
    for (int64_t t = 0; t < npad; t += 8) {
      vf8 acc = {};
      for (int64_t j = 0; j < d; ++j) acc += W[k * d + j] * load8(XT + j * npad + t);
      store8(S + k * npad + t, acc);
    }
}

struct TileArgs {
  const at::Tensor* x;
  const Codebook* cb;
  int64_t mode, T, d, K, TT, KB, refine_rows;
  bool x_is_f32_contig, return_distances, row_major, hand_gemm;
  int64_t* pidx;
  float* pdist;
};

struct TileScratch {
  at::Tensor scores;            // [KB, TTpad] fp32
  std::vector<float> s1, s2;    // best and second-best fast score per token (TTpad)
  std::vector<int32_t> am;      // code of s1
  std::vector<float> margin;    // per token: fp32 threshold margin (see below)
  std::vector<uint8_t> single;  // the fast path settled the token
  std::vector<float> nx2;       // upper bound on |x|^2 (for the error bound only)
  std::vector<int64_t> refine;  // tokens with near-ties
  std::vector<float> xT;        // hand-loop GEMM only: the x tile transposed
};

// Running best/second-best over the codes of one block, 8 tokens per vector; s1, s2, am hold the
// state of the tile's tokens (padded to a multiple of 8).  Score (token t, code k) is at
// S[t * ts + k * cs]: ts == 1 for the transposed block (contiguous vector loads), cs == 1 for the
// row-major block (the vector is assembled from 8 rows).
VQ_INLINE void top2_update(vf8 v, int32_t k, vf8& a, vf8& b, vi8& ai) {
  const vi8 lt = v < a;
  const vf8 mn = v < b ? v : b;
  b = lt ? a : mn;
  a = lt ? v : a;
  ai = lt ? vi8{k, k, k, k, k, k, k, k} : ai;
}

// 8x8 transpose: rows r[i] = scores of token i for 8 consecutive codes -> c[j] = code j for 8 tokens.
VQ_INLINE void transpose8(const vf8 r[8], vf8 c[8]) {
  typedef int32_t m8 __attribute__((vector_size(32)));
  const m8 lo = {0, 8, 1, 9, 4, 12, 5, 13}, hi = {2, 10, 3, 11, 6, 14, 7, 15};
  const m8 s_lo = {0, 1, 8, 9, 4, 5, 12, 13}, s_hi = {2, 3, 10, 11, 6, 7, 14, 15};
  const m8 p_lo = {0, 1, 2, 3, 8, 9, 10, 11}, p_hi = {4, 5, 6, 7, 12, 13, 14, 15};
  vf8 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = __builtin_shuffle(r[2 * i], r[2 * i + 1], lo);
    t[2 * i + 1] = __builtin_shuffle(r[2 * i], r[2 * i + 1], hi);
  }
  for (int h = 0; h < 2; ++h) {  // h = 0: rows 0-3, h = 1: rows 4-7
    u[4 * h + 0] = __builtin_shuffle(t[4 * h + 0], t[4 * h + 2], s_lo);
    u[4 * h + 1] = __builtin_shuffle(t[4 * h + 0], t[4 * h + 2], s_hi);
    u[4 * h + 2] = __builtin_shuffle(t[4 * h + 1], t[4 * h + 3], s_lo);
    u[4 * h + 3] = __builtin_shuffle(t[4 * h + 1], t[4 * h + 3], s_hi);
  }
  for (int j = 0; j < 4; ++j) {
    c[j] = __builtin_shuffle(u[j], u[4 + j], p_lo);
    c[j + 4] = __builtin_shuffle(u[j], u[4 + j], p_hi);
  }
}

// Running best/second-best over the codes of one block, 8 tokens per vector; s1, s2, am hold the
// state of the tile's tokens (padded to a multiple of 8).  Score (token t, code k) is at
// S[t * ts + k * cs]: ts == 1 for the transposed block (contiguous vector loads), cs == 1 for the
// row-major block (8x8 tiles transposed in registers).
template <bool kTokensContiguous>
VQ_INLINE void top2_block(const float* S, int64_t ts, int64_t cs, int64_t kb, int64_t npad, int64_t n,
                       const float* bias, int32_t k0, float* s1, float* s2, int32_t* am) {
  for (int64_t t = 0; t < npad; t += 8) {
    vf8 a = load8(s1 + t), b = load8(s2 + t);
    vi8 ai = load8i(am + t);
    if (kTokensContiguous) {
      for (int64_t k = 0; k < kb; ++k) {
        vf8 v = load8(S + t + k * cs);
        if (bias) v = v + bias[k];
        top2_update(v, k0 + static_cast<int32_t>(k), a, b, ai);
      }
    } else {
      // Rows past the tile's end repeat its last token (their state is never read).
      const float* r[8];
      for (int l = 0; l < 8; ++l) r[l] = S + std::min<int64_t>(t + l, n - 1) * ts;
      int64_t k = 0;
      for (; k + 8 <= kb; k += 8) {
        vf8 rows[8], cols[8];
        for (int l = 0; l < 8; ++l) rows[l] = load8(r[l] + k);
        transpose8(rows, cols);
        for (int j = 0; j < 8; ++j) {
          vf8 v = cols[j];
          if (bias) v = v + bias[k + j];
          top2_update(v, k0 + static_cast<int32_t>(k + j), a, b, ai);
        }
      }
      for (; k < kb; ++k) {
        vf8 v = vf8{r[0][k], r[1][k], r[2][k], r[3][k], r[4][k], r[5][k], r[6][k], r[7][k]};
        if (bias) v = v + bias[k];
        top2_update(v, k0 + static_cast<int32_t>(k), a, b, ai);
      }
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
  // addition.  Written as branch-free loops over tokens so that they vectorise.
  const float inflate = static_cast<float>(1.0 + 2.0 * static_cast<double>(d + 4) * kUnitRoundoff);
  for (int64_t r = 0; r < n; ++r) w.nx2[r] = sumsq_bound(px + r * d, d, inflate);
  // The margin is computed in fp32 so that this loop vectorises (in fp64 it did not, and cost 8% of
  // the K=16 matmul).  Its ~6 fp32 roundings (each <= 2^-24 relative) are covered by the 1 + 2^-18
  // factor; products that underflow lose less than the absolute term, which is 2x its proven value.
  const bool l2 = mode == kL2;
  const float vmaxf = static_cast<float>(cb.vmax * (1.0 + 1e-6));
  const float relf = static_cast<float>(4.0 * static_cast<double>(d + 4) * kUnitRoundoff);
  const float absf = static_cast<float>(8.0 * static_cast<double>(d + 2) * kMinNormal);
  const float u4 = static_cast<float>(4.0 * kUnitRoundoff), limit = static_cast<float>(kScaleLimit);
  const float qnan = std::numeric_limits<float>::quiet_NaN();
  // A NaN margin marks a token whose scale is unsafe for fp32 (fast_path_ok false): the
  // "s2 > s1 + margin" test below is then false and the token is routed to the exact path.
  for (int64_t r = 0; r < n; ++r) {
    const float nx = std::sqrt(w.nx2[r]) * (1.0f + 0x1p-20f);
    const float A = l2 ? nx + vmaxf : nx;
    const float aa = A * A;
    const float err = l2 ? relf * aa + absf : relf * nx + absf;  // score_error_bound
    const float m = (2.0f * err + u4 * aa) * (1.0f + 0x1p-18f);
    const bool ok = (nx <= limit) & (aa <= limit);  // fast_path_ok (aa >= nx^2 for l2)
    w.margin[r] = ok ? m : qnan;
  }
  const bool any_fast = cb.finite;
  for (int64_t r = 0; r < npad; ++r) {
    w.s1[r] = inf;
    w.s2[r] = inf;
    w.am[r] = 0;
  }
  if (any_fast && a.hand_gemm) {  // x tile transposed and zero-padded for the hand loop
    w.xT.assign(d * npad, 0.0f);
    for (int64_t r = 0; r < n; ++r)
      for (int64_t j = 0; j < d; ++j) w.xT[j * npad + r] = px[r * d + j];
  }
  if (any_fast) {
    for (int64_t k0 = 0; k0 < K; k0 += KB) {
      const int64_t kb = std::min(KB, K - k0);
      const float* pb = mode == kL2 ? cb.bias.data_ptr<float>() + k0 : nullptr;
      if (a.hand_gemm) {  // S^T by the hand loop, into the same [kb, npad] layout
        float* ps = w.scores.data_ptr<float>();
        hand_scores(cb.w.data_ptr<float>() + k0 * d, kb, d, w.xT.data(), npad, ps);
        top2_block<true>(ps, 1, npad, kb, npad, n, pb, static_cast<int32_t>(k0), w.s1.data(), w.s2.data(),
                         w.am.data());
      } else if (a.row_major) {  // S = X W^T: [n, kb]
        at::Tensor sc = w.scores.view({-1}).narrow(0, 0, n * kb).view({n, kb});
        at::mm_out(sc, xt, cb.w.narrow(0, k0, kb).t());
        top2_block<false>(sc.data_ptr<float>(), kb, 1, kb, npad, n, pb, static_cast<int32_t>(k0),
                          w.s1.data(), w.s2.data(), w.am.data());
      } else {  // S^T = W X^T: [kb, n]
        at::Tensor sc = w.scores.view({-1}).narrow(0, 0, kb * npad).view({kb, npad}).narrow(1, 0, n);
        at::mm_out(sc, cb.w.narrow(0, k0, kb), xt.t());
        top2_block<true>(sc.data_ptr<float>(), 1, npad, kb, npad, n, pb, static_cast<int32_t>(k0),
                         w.s1.data(), w.s2.data(), w.am.data());
      }
    }
  }
  // Settle: the best code is the answer when nothing else is within the margin (vectorised test);
  // the rest (near-ties, slow tokens) are rare and handled one by one.
  for (int64_t r = 0; r < n; ++r) {
    w.single[r] = w.s2[r] > w.s1[r] + w.margin[r];
    a.pidx[t0 + r] = w.am[r];
  }
  w.refine.clear();
  for (int64_t r0 = 0; r0 < n; r0 += 8) {
    if (r0 + 8 <= n && !a.pdist) {  // skip 8 settled tokens at once
      uint64_t eight;
      std::memcpy(&eight, &w.single[r0], 8);
      if (eight == 0x0101010101010101ull) continue;
    }
    for (int64_t r = r0; r < std::min<int64_t>(r0 + 8, n); ++r) {
      if (w.single[r] && !a.pdist) continue;
      const float* xr = px + r * d;
      if (w.single[r]) {  // only the distance is left to compute
        const int64_t k = w.am[r];
        const double nx = mode == kCosine ? norm_exact(xr, d) : 0.0;
        a.pdist[t0 + r] = static_cast<float>(exact_dist(xr, nx, cb, k, mode, d));
      } else if (!cb.finite || std::isnan(w.margin[r])) {  // unsafe scale, NaN or inf: exact row
        int64_t k;
        double dist;
        full_row(xr, cb, mode, d, k, dist);
        a.pidx[t0 + r] = k;
        if (a.pdist) a.pdist[t0 + r] = static_cast<float>(dist);
      } else {
        w.refine.push_back(r);
      }
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
  auto idx = at::empty({T}, x.options().dtype(at::kLong));  // every entry is written below
  auto dist = at::empty({return_distances ? T : 0}, x.options().dtype(at::kFloat));
  if (T == 0) return {idx, dist};

  Codebook cb = prepare_codebook(codebook, mode);

  // Tile shape.  TT tokens: the x tile (TT*d floats) stays in L2 while the mm sweeps the codebook
  // blocks.  KB codes: the score block (KB*TT floats) about tile_elems, so per-call overhead of
  // at::mm is amortised at small K and the scan reads from cache at large K.  VQMOE_NC_TILE_* override
  // these for tuning (bench/argmin.py --help).
  const int64_t tile_elems = env_int("VQMOE_NC_TILE_ELEMS", int64_t(1) << 18);
  const int64_t tt_default = std::max<int64_t>(64, std::min<int64_t>(4096, (int64_t(1) << 17) / d)) / 8 * 8;
  const int64_t TT = std::min<int64_t>(env_int("VQMOE_NC_TILE_TOKENS", tt_default), T);
  const int64_t KB = std::min<int64_t>(env_int("VQMOE_NC_TILE_CODES", std::max<int64_t>(8, tile_elems / TT)), K);
  const int64_t ntiles = (T + TT - 1) / TT;
  // Orientation of the score block.  MKL packs the tokens operand when it is the transposed one, which
  // made W X^T 1.4x slower than X W^T at K=16, d=64 (measured, 1 thread); at larger K the transposed
  // block wins because the top-2 scan then reads contiguous vectors.
  const bool row_major = KB <= env_int("VQMOE_NC_ROW_MAJOR_MAX_K", 64);
  const char* gemm_env = std::getenv("VQMOE_NC_GEMM");
  const bool hand_gemm = gemm_env != nullptr && std::string(gemm_env) == "hand";
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
                      row_major && !hand_gemm,
                      hand_gemm,
                      idx.data_ptr<int64_t>(),
                      return_distances ? dist.data_ptr<float>() : nullptr};
  // Tiles are handed out dynamically (an atomic counter) rather than as one static range per thread:
  // on a shared machine a descheduled thread otherwise leaves its whole range for the others to wait
  // on (K=8192, d=64, 2 threads, machine under load: 1.77x the matmul with static ranges; 0.48-0.50x
  // with this counter in later runs).
  std::atomic<int64_t> next_tile{0};
  const int64_t nworkers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntiles));
  at::parallel_for(0, nworkers, 1, [&](int64_t, int64_t) {
    TileScratch w;
    w.scores = at::empty({KB, TTpad}, x.options().dtype(at::kFloat));
    w.s1.resize(TTpad);
    w.s2.resize(TTpad);
    w.am.resize(TTpad);
    w.margin.resize(TTpad);
    w.single.resize(TTpad);
    w.nx2.resize(TTpad);
    for (int64_t tile = next_tile.fetch_add(1); tile < ntiles; tile = next_tile.fetch_add(1))
      process_tile(args, tile, w);
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

// FRAGMENT: the Python side registers vqmoe_ds::nearest_code_torch in the same namespace, and other
// extensions of the project may add ops there too.
TORCH_LIBRARY_FRAGMENT(vqmoe_ds, m) {
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
