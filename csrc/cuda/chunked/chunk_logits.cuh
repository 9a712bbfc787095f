// The chunked backend's two per-logit kernels, chunk_softmax (forward) and chunk_grad (backward):
// one pass over a chunk's u [B, n·K] (ldu columns), a warp per (row, segment) with the row's
// constants in registers. Everything a step does not use is compiled out by the Variant, so the
// common case (one weight row per class, no bias, no hard negatives) is straight-line code per
// 16-byte vector of u; scripts/sass-cost counts its SASS instructions per logit against a budget.
//
// Units: w is what the loops compare and sum, z = a·w the logit. Without bias a = α_i and
// w = β_j u_ij (the cosine times ‖x_i‖ for normalized heads); with bias a = 1 and w = z. The
// online log-sum-exp runs in base 2: 2^(a·log2 e · (w − m)), the difference taken first. Folding m
// into an FFMA's addend (aw·w − aw·m) would round aw·m: an exponent off by half an ulp of it, 2^4096
// at |z| = 1e11, and NaN for a −inf entry while m is still the lowest float (an Inf − Inf); the
// backward likewise rounds z = a·w as the forward did before subtracting lse.
//
// Loop shape per (row, segment): units are 16-byte vectors of u (one weight row per class) or
// single classes (sub-centers). The hot loops run over whole units that do not hold the row's
// target; the target's unit and the chunk's last, partial unit take the checked path (cold,
// outside the hot loops, at most two per row). The target's own logit (with its margin) is
// folded in once per row from the row prepass, never through u.
//
// Non-finite values propagate as through eager logits: maxima ignore NaN, but a NaN (or an
// Inf − Inf) reaches the sum, which never drops a partial because it is not positive.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../../margin_math.h"
#include "chunk_kernels.h"
#include "../kernel_params.h"
#include "../rows.cuh"
#include "../tile_mma.cuh"

namespace marginops::cuda {
namespace {

// What a chunk's per-logit kernels compile in.
//   kSub   weight rows per class: 1 (vector loop), 3 (sub-center ArcFace's default, unrolled), or
//          0 (any K, a run-time loop over sub-centers)
//   kNormW u is scaled by the stored inverse norms of the chunk's weight rows
//   kBias  a per-class bias
//   kHard  CurricularFace's hard negatives and/or interclass filtering (both read at run time)
template <int kSub_, bool kNormW_, bool kBias_, bool kHard_>
struct Variant {
  static constexpr int kSub = kSub_;
  static constexpr bool kNormW = kNormW_, kBias = kBias_, kHard = kHard_;
};

constexpr double kLog2e = 1.4426950408889634;

// σ: float16 G is stored times 2^12, so that probabilities of 1e-7 (C = 10M) stay normal; its
// entries are at most 2·3·σ (|g_lse·p + g_sum| ≤ 2 r_i, a hard negative's factor t + 2c ≤ 3, β
// folded only when the weights are not prescaled), far below float16's 65504.
template <typename OP>
constexpr float kGradScale = std::is_same_v<OP, __half> ? 4096.0f : 1.0f;

// 2^x: ex2.approx.ftz on the device (one MUFU.EX2, relative error ~2^-22); exact elsewhere.
__device__ __forceinline__ float exp2_(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return std::exp2(x);
#endif
}
__device__ __forceinline__ double exp2_(double x) {
  return exp2(x);
}

// a·b rounded on its own, never contracted into an FMA with what follows: the backward's logit
// z = a·w must round as the forward's did, so that z − lse is exact where z is the row's max.
__device__ __forceinline__ float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
__device__ __forceinline__ double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// max that ignores NaN (fmax on both sides, so the emulation picks what the device picks).
__device__ __forceinline__ float vmax(float a, float b) {
  return fmaxf(a, b);
}
__device__ __forceinline__ double vmax(double a, double b) {
  return fmax(a, b);
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Entries of u per 16-byte load.
template <typename ACC>
constexpr int kVec = static_cast<int>(16 / sizeof(ACC));

template <typename ACC>
__device__ __forceinline__ ACC lowest() {
  return std::numeric_limits<ACC>::lowest();
}

// The row's constants, hoisted out of the element loops.
template <typename ACC>
struct RowConsts {
  ACC alpha;   // α_i
  ACC a;       // z = a·w: α_i, or 1 with bias
  ACC aw;      // a·log2 e
  ACC cs;      // α_i / s: an unbiased w to its cosine (hard negatives)
  ACC tau, t;  // CurricularFace: c > tau → z = s·c·(t + c) + bias (tau = +inf: none)
  ACC thr;     // interclass filter: c > thr → z = 0 (+inf: off)
  int tcol;    // the row's target column in this chunk, or -1
};

template <typename ACC, typename V>
__device__ __forceinline__ RowConsts<ACC> row_consts(const HeadParams& p, const ChunkParams& c,
                                                     const RowInfo<ACC>& row) {
  RowConsts<ACC> r;
  r.alpha = row.side.scale;
  r.a = V::kBias ? ACC(1) : r.alpha;
  r.aw = r.a * ACC(kLog2e);
  r.cs = r.alpha / ACC(p.cfg.s);
  r.tau = row.tau;
  r.t = row.t;
  if constexpr (std::is_same_v<ACC, float>) {
    r.thr = c.filter_f;  // a parameter-space operand: no conversion in the loops
  } else {
    r.thr = p.cfg.interclass_filter > 0 ? ACC(p.cfg.interclass_filter) : std::numeric_limits<ACC>::infinity();
  }
  const int64_t local = row.tcol - c.c0;
  r.tcol = row.tcol >= 0 && local >= 0 && local < c.n ? static_cast<int>(local) : -1;
  return r;
}

// One class's unbiased w (the largest of its sub-centers', NaN if any is), the winning k and its
// inverse norm (1 without kNormW).
template <typename ACC, typename V>
__device__ __forceinline__ ACC class_w0(const ACC* u, const ACC* inv, int j, int K, int& kbest, ACC& binv) {
  const int q = j * K;
  binv = V::kNormW ? inv[q] : ACC(1);
  ACC best = V::kNormW ? u[q] * binv : u[q];
  kbest = 0;
#pragma unroll
  for (int k = 1; k < (V::kSub ? V::kSub : K); ++k) {
    const ACC n = V::kNormW ? inv[q + k] : ACC(1);
    const ACC v = V::kNormW ? u[q + k] * n : u[q + k];
    if (v > best || (v != v && best == best)) {  // the first largest; a NaN sticks
      best = v;
      kbest = k;
      binv = n;
    }
  }
  return best;
}

// w of an unbiased w0: the bias added (a = 1 then).
template <typename ACC, typename V>
__device__ __forceinline__ ACC biased(ACC w0, const RowConsts<ACC>& r, const ACC* bias, int j) {
  if constexpr (V::kBias) {
    return fma(r.alpha, w0, bias[j]);
  } else {
    return w0;
  }
}

// A non-target entry's w after hard negatives and filtering, and ∂z/∂z⁰ (factor).
template <typename ACC, typename V>
__device__ __forceinline__ ACC hard(ACC w0, ACC w, const RowConsts<ACC>& r, const ACC* bias, int j, ACC& factor) {
  factor = ACC(1);
  if constexpr (!V::kHard) {
    return w;
  } else {
    const ACC cos = w0 * r.cs;
    ACC out = w;
    if (cos > r.tau) {
      out = biased<ACC, V>(w0 * (r.t + cos), r, bias, j);
      factor = r.t + ACC(2) * cos;
    }
    if (cos > r.thr) {
      out = ACC(0);
      factor = ACC(0);
    }
    return out;
  }
}

// Online log-sum-exp of w with base-2 exponent a·log2 e, the logit sum, and the best plain w with
// the unit that holds it. m starts at the lowest finite value, so that empty lanes merge without
// an Inf − Inf.
template <typename ACC>
struct Fold {
  ACC m, l, zs, bw;
  int bu;
  __device__ __forceinline__ void add(ACC w, ACC aw) {
    const ACC mn = vmax(m, w);
    l = l * exp2_(aw * (m - mn)) + exp2_(aw * (w - mn));
    m = mn;
    zs += w;
  }
  __device__ __forceinline__ void best(ACC plain, int unit) {
    if (plain > bw) {
      bw = plain;
      bu = unit;
    }
  }
};

// A row warp's share of a chunk in both kernels: K weight rows per class, n classes, `per` classes
// per unit (a 16-byte vector of u with one row per class, else one class), `full` whole units,
// and segment s's units [lo, hi).
struct Segment {
  int K, n, per, full, lo, hi;
};

template <typename ACC, typename V>
__device__ __forceinline__ Segment segment_of(const HeadParams& p, const ChunkParams& c, int s) {
  Segment g;
  g.K = V::kSub ? V::kSub : static_cast<int>(p.K);
  g.n = static_cast<int>(c.n);
  g.per = V::kSub == 1 ? kVec<ACC> : 1;
  const int units = (g.n + g.per - 1) / g.per;
  g.full = g.n / g.per;
  g.lo = static_cast<int>(int64_t(s) * units / c.segments);
  g.hi = static_cast<int>(int64_t(s + 1) * units / c.segments);
  return g;
}

// The loop shape of both kernels: lane `lane` of a row's warp takes units lo + lane, + 32, ... of
// [lo, hi); hot(v) for whole units (v < full) other than the target's unit tu, cold(v) for tu and
// for the partial last unit. Straight-line hot loops: the checks live in cold, run at most twice.
template <typename Hot, typename Cold>
__device__ __forceinline__ void walk_units(int lo, int hi, int full, int tu, int lane, Hot&& hot, Cold&& cold) {
  const int full_hi = full < hi ? full : hi;
  const int split = tu >= lo && tu < full_hi ? tu : full_hi;
  int v = lo + lane;
#pragma unroll 1
  for (; v < split; v += 32) hot(v);
  if (v == tu && v < full_hi) {
    cold(v);
    v += 32;
  }
#pragma unroll 1
  for (; v < full_hi; v += 32) hot(v);
  if (v < hi) cold(v);
}

// ---- forward ------------------------------------------------------------------------------------

// Checked path of one class (the target's unit, the partial unit, every sub-center class but the
// hot ones): the target only competes for the best; its logit comes later, from the row prepass —
// for every kind, so that the backward's target term (target_grad_kernel, from the same prepass)
// sees the very logit this lse holds, and lse ≥ z_iy exactly.
template <typename ACC, typename V>
__device__ __forceinline__ void fold_class(Fold<ACC>& f, const HeadParams& p, const RowConsts<ACC>& r, const ACC* u,
                                           const ACC* inv, const ACC* bias, int j, int K, int unit) {
  int k;
  ACC n;
  const ACC w0 = class_w0<ACC, V>(u, inv, j, K, k, n);
  const ACC w = biased<ACC, V>(w0, r, bias, j);
  f.best(w, unit);
  if (j == r.tcol) return;
  ACC factor;
  f.add(hard<ACC, V>(w0, w, r, bias, j, factor), r.aw);
}

// The hot unit of one weight row per class: kVec classes from one 16-byte load of u.
template <typename ACC, typename V>
__device__ __forceinline__ void fold_vector(Fold<ACC>& f, const RowConsts<ACC>& r, const ACC* u, const ACC* inv,
                                            const ACC* bias, int v) {
  constexpr int N = kVec<ACC>;
  const Vec<ACC, N> uv = reinterpret_cast<const Vec<ACC, N>*>(u)[v];
  Vec<ACC, N> nv, bv;
  if constexpr (V::kNormW) nv = reinterpret_cast<const Vec<ACC, N>*>(inv)[v];
  if constexpr (V::kBias) bv = reinterpret_cast<const Vec<ACC, N>*>(bias)[v];
  ACC w[N], z[N];
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const ACC w0 = V::kNormW ? uv.v[k] * nv.v[k] : uv.v[k];
    if constexpr (V::kBias) {
      w[k] = fma(r.alpha, w0, bv.v[k]);
    } else {
      w[k] = w0;
    }
    ACC factor;
    z[k] = hard<ACC, V>(w0, w[k], r, V::kBias ? bv.v : nullptr, k, factor);
  }
  ACC zmax = z[0], wmax = w[0], zsum = z[0];
#pragma unroll
  for (int k = 1; k < N; ++k) {
    zmax = vmax(zmax, z[k]);
    zsum += z[k];
    if constexpr (V::kHard) wmax = vmax(wmax, w[k]);
  }
  if constexpr (!V::kHard) wmax = zmax;
  const ACC mn = vmax(f.m, zmax);
  ACC l = f.l * exp2_(r.aw * (f.m - mn));
#pragma unroll
  for (int k = 0; k < N; ++k) l += exp2_(r.aw * (z[k] - mn));
  f.l = l;
  f.m = mn;
  f.zs += zsum;
  f.best(wmax, v);
}

// The first column of unit `unit` whose plain w is `bw` (what fold_* recorded), as a chunk column.
template <typename ACC, typename V>
__device__ __forceinline__ int best_column(const ACC* u, const ACC* inv, const ACC* bias, const RowConsts<ACC>& r,
                                           int unit, int per, int n, int K, ACC bw) {
  for (int j = unit * per; j < unit * per + per && j < n; ++j) {
    int k;
    ACC nk;
    if (biased<ACC, V>(class_w0<ACC, V>(u, inv, j, K, k, nk), r, bias, j) == bw) return j;
  }
  return unit * per;  // not reached: the loops recorded one of these values
}

// Grid (row blocks, segments), a warp per row: the segment's classes folded into slot
// (segment, row) — p.partial [segments, B, 4] (max, sum-exp, logit sum, best logit) and
// p.partial_best [segments, B] (the best's column) — merged with the earlier chunks' slot.
template <typename ACC, typename V>
__global__ void __launch_bounds__(kThreads, 1) chunk_softmax_kernel(HeadParams p, ChunkParams c) {
  const int lane = threadIdx.x % 32, s = blockIdx.y;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (i >= p.B) return;
  const RowInfo<ACC>& row = static_cast<const RowInfo<ACC>*>(p.rows)[i];
  const RowConsts<ACC> r = row_consts<ACC, V>(p, c, row);
  const Segment sg = segment_of<ACC, V>(p, c, s);
  const int K = sg.K, n = sg.n, per = sg.per, full = sg.full, lo = sg.lo, hi = sg.hi;
  const ACC* u = static_cast<const ACC*>(c.logits) + i * c.ldu;
  const ACC* inv = static_cast<const ACC*>(c.col_inv);
  const ACC* bias = V::kBias ? static_cast<const ACC*>(p.bias) + c.c0 : nullptr;
  Fold<ACC> f{lowest<ACC>(), ACC(0), ACC(0), -std::numeric_limits<ACC>::infinity(), -1};
  const int tu = r.tcol >= 0 ? r.tcol / per : -1;
  walk_units(
      lo, hi, full, tu, lane,
      [&](int v) {
        if constexpr (V::kSub == 1) {
          fold_vector<ACC, V>(f, r, u, inv, bias, v);
        } else {
          fold_class<ACC, V>(f, p, r, u, inv, bias, v, K, v);
        }
      },
      [&](int v) {
        for (int j = v * per; j < v * per + per && j < n; ++j) fold_class<ACC, V>(f, p, r, u, inv, bias, j, K, v);
      });
  // the lane's best column, then the warp's
  int64_t bj = f.bu >= 0 ? c.c0 + best_column<ACC, V>(u, inv, bias, r, f.bu, per, n, K, f.bw) : -1;
  ACC bw = f.bw;
  const ACC mw = warp_max(f.m);
  const ACC lw = warp_sum(f.l * exp2_(r.aw * (f.m - mw)));
  const ACC zs = warp_sum(f.zs);
  warp_argmax(bw, bj);
  if (lane != 0) return;
  ACC mz = mw == lowest<ACC>() ? -std::numeric_limits<ACC>::infinity() : r.a * mw, lz = lw, zsz = r.a * zs;
  if (tu >= lo && tu < hi) {  // the target's logit (the prepass's, margin included)
    const ACC zt = row.target.logit, mt = mz > zt ? mz : zt;
    lz = (lz != ACC(0) ? lz * exp(mz - mt) : ACC(0)) + exp(zt - mt);
    mz = mt;
    zsz += zt;
  }
  const ACC bz = r.a * bw;
  ACC* o = static_cast<ACC*>(p.partial) + (s * p.B + i) * 4;
  int64_t* ob = p.partial_best + s * p.B + i;
  if (c.first) {
    o[0] = mz;
    o[1] = lz;
    o[2] = zsz;
    o[3] = bz;
    *ob = bj;
    return;
  }
  const ACC mn = o[0] > mz ? o[0] : mz;
  o[1] = (o[1] != ACC(0) ? o[1] * exp(o[0] - mn) : ACC(0)) + (lz != ACC(0) ? lz * exp(mz - mn) : ACC(0));
  o[0] = mn;
  o[2] += zsz;
  if (bz > o[3]) {  // earlier chunks hold smaller columns: they win ties
    o[3] = bz;
    *ob = bj;
  }
}

// ---- backward -----------------------------------------------------------------------------------

// The row's gradient constants: Ĝ = (c1·p + c2)·factor·β with p = 2^(log2 e · (a·w − L)), L = lse.
template <typename ACC>
struct GradConsts {
  ACC c1, c2, L;
};

// Checked path of one class: Ĝ at its winning sub-center, 0 at the others and at the target.
template <typename OP, typename ACC, typename V>
__device__ __forceinline__ void grad_class(OP* g, const RowConsts<ACC>& r, const GradConsts<ACC>& gc, const ACC* u,
                                           const ACC* inv, const ACC* bias, int j, int K) {
  int k;
  ACC val = 0;
  if (j != r.tcol) {
    ACC n, factor;
    const ACC w0 = class_w0<ACC, V>(u, inv, j, K, k, n);
    const ACC w = hard<ACC, V>(w0, biased<ACC, V>(w0, r, bias, j), r, bias, j, factor);
    val = fma(gc.c1, exp2_(ACC(kLog2e) * (mul_rn(r.a, w) - gc.L)), gc.c2);
    if constexpr (V::kHard) val *= factor;
    if constexpr (V::kNormW) val *= n;
  } else {
    k = -1;
  }
#pragma unroll
  for (int kk = 0; kk < (V::kSub ? V::kSub : K); ++kk) g[j * K + kk] = convert<OP>(kk == k ? val : ACC(0));
}

// The hot unit of one weight row per class: kVec entries of Ĝ from one 16-byte load of u.
template <typename OP, typename ACC, typename V>
__device__ __forceinline__ void grad_vector(OP* g, const RowConsts<ACC>& r, const GradConsts<ACC>& gc, const ACC* u,
                                            const ACC* inv, const ACC* bias, int v) {
  constexpr int N = kVec<ACC>;
  const Vec<ACC, N> uv = reinterpret_cast<const Vec<ACC, N>*>(u)[v];
  Vec<ACC, N> nv, bv;
  if constexpr (V::kNormW) nv = reinterpret_cast<const Vec<ACC, N>*>(inv)[v];
  if constexpr (V::kBias) bv = reinterpret_cast<const Vec<ACC, N>*>(bias)[v];
  Vec<OP, N> out;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const ACC w0 = V::kNormW ? uv.v[k] * nv.v[k] : uv.v[k];
    ACC w = w0;
    if constexpr (V::kBias) w = fma(r.alpha, w0, bv.v[k]);
    ACC factor;
    w = hard<ACC, V>(w0, w, r, V::kBias ? bv.v : nullptr, k, factor);
    ACC val = fma(gc.c1, exp2_(ACC(kLog2e) * (mul_rn(r.a, w) - gc.L)), gc.c2);
    if constexpr (V::kHard) val *= factor;
    if constexpr (V::kNormW) val *= nv.v[k];
    out.v[k] = convert<OP>(val);
  }
  reinterpret_cast<Vec<OP, N>*>(g)[v] = out;
}

// Grid (row blocks, segments), a warp per row: Ĝ [B, n·K] (ldu columns) in the operand dtype
// (chunk_kernels.h), 0 at the target and for rows without gradient.
template <typename OP, typename ACC, typename V>
__global__ void __launch_bounds__(kThreads, 1) chunk_grad_kernel(HeadParams p, ChunkParams c) {
  const int lane = threadIdx.x % 32, s = blockIdx.y;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (i >= p.B) return;
  const RowInfo<ACC>& row = static_cast<const RowInfo<ACC>*>(p.rows)[i];
  const RowConsts<ACC> r = row_consts<ACC, V>(p, c, row);
  const Segment sg = segment_of<ACC, V>(p, c, s);
  const int K = sg.K, n = sg.n, per = sg.per, full = sg.full, lo = sg.lo, hi = sg.hi;
  const ACC* u = static_cast<const ACC*>(c.logits) + i * c.ldu;
  OP* g = static_cast<OP*>(c.grad) + i * c.ldu;
  const ACC* inv = static_cast<const ACC*>(c.col_inv);
  const ACC* bias = V::kBias ? static_cast<const ACC*>(p.bias) + c.c0 : nullptr;
  if (!(row.gscale > ACC(0))) {  // no gradient in this row (ignored, or a zero incoming gradient):
    // 0·p, which is NaN where the row's lse is (a NaN or +inf logit), as eager's log_softmax backward
    const OP fill =
        convert<OP>(row.lse == row.lse && row.gscale == row.gscale ? ACC(0) : std::numeric_limits<ACC>::quiet_NaN());
    for (int j = lo * per + lane; j < hi * per && j < n; j += 32) {
      for (int k = 0; k < K; ++k) g[j * K + k] = fill;
    }
    return;
  }
  const ACC sigma = ACC(kGradScale<OP>) / row.gscale;
  const GradConsts<ACC> gc{sigma * row.gl, sigma * row.gs, row.lse};
  const int tu = r.tcol >= 0 ? r.tcol / per : -1;
  walk_units(
      lo, hi, full, tu, lane,
      [&](int v) {
        if constexpr (V::kSub == 1) {
          grad_vector<OP, ACC, V>(g, r, gc, u, inv, bias, v);
        } else {
          grad_class<OP, ACC, V>(g, r, gc, u, inv, bias, v, K);
        }
      },
      [&](int v) {
        for (int j = v * per; j < v * per + per && j < n; ++j) grad_class<OP, ACC, V>(g, r, gc, u, inv, bias, j, K);
      });
}

// f(Variant) for the chunk: its sub-centers, whether u is scaled by inverse norms, bias, hard
// negatives.
template <typename F>
cudaError_t with_variant(const HeadParams& p, const ChunkParams& c, F&& f) {
  const bool normw = c.col_inv != nullptr, bias = p.bias != nullptr;
  const bool hardneg = p.curricular != nullptr || p.cfg.interclass_filter > 0;
  const auto flags = [&](auto sub) {
    constexpr int S = decltype(sub)::value;
    const auto b3 = [&](auto nw, auto b) {
      return hardneg ? f(Variant<S, decltype(nw)::value, decltype(b)::value, true>())
                     : f(Variant<S, decltype(nw)::value, decltype(b)::value, false>());
    };
    const auto b2 = [&](auto nw) { return bias ? b3(nw, std::true_type()) : b3(nw, std::false_type()); };
    return normw ? b2(std::true_type()) : b2(std::false_type());
  };
  if (p.K == 1) return flags(std::integral_constant<int, 1>());
  if (p.K == 3) return flags(std::integral_constant<int, 3>());
  return flags(std::integral_constant<int, 0>());
}

}  // namespace
}  // namespace marginops::cuda
