// Per-row device code shared by the tile kernels (tiles/tile_kernels.cu) and the chunked
// backend's kernels (chunked/chunk_kernels.cu): the row prepass (norms, target column and logit through
// margin_math.h), the target's gradient, one (row, class) entry of the logits, and the merge of
// per-split online log-sum-exp partials. Each including translation unit gets its own copy
// (anonymous namespace).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "../margin_math.h"
#include "kernel_params.h"
#include "tile_mma.cuh"

namespace marginops::cuda {
namespace {

constexpr int kThreads = 256;  // 8 warps per block
constexpr int kWarps = kThreads / 32;
// The Euclidean norm of row[0, n) in ACC, by one warp (lane strides 32); every lane gets it.
template <typename ACC, typename T>
__device__ __forceinline__ ACC warp_row_norm(const T* row, int64_t n, int lane) {
  ACC ss = 0;
  for (int64_t d = lane; d < n; d += 32) {
    const ACC v = convert<ACC>(row[d]);
    ss += v * v;
  }
  return sqrt(warp_sum(ss));
}

template <typename ACC>
struct RowInfo {
  Side<ACC> side;      // of x_i
  Target<ACC> target;  // valid where tcol >= 0
  Side<ACC> tside;     // of the target's best sub-center
  int64_t tcol;        // target column among the computed classes, or -1
  int32_t tsub;        // the target's best sub-center
  int32_t bad;         // the label is out of range (reported): target logit NaN, no target
  ACC tau, t;          // CurricularFace threshold and t (tau = +inf: none)
  // Set by target_grad_kernel for the backward passes.
  ACC gl, gs, gt, lse;
  ACC g_target;        // ∂L/∂z_iy
  ACC gscale;          // the chunked backward's row scale max(|gl|, |gs|)
  TargetGrad<ACC> tg;  // the target's share, for every margin kind (ψ = c for kIdentity)
};

template <typename ACC>
__device__ __forceinline__ ACC neg_inf() {
  return -std::numeric_limits<ACC>::infinity();
}

// The larger of a and b, NaN when either is. CUDA's max/fmax return the other operand of a NaN
// (the emulation's max keeps its first): a NaN logit must reach the row's lse as through eager
// logits (docs/design.md, "Non-finite values"), so the online log-sum-exp and its merges take this one.
template <typename ACC>
__device__ __forceinline__ ACC max_nan(ACC a, ACC b) {
  return a > b || a != a ? a : b;
}

template <typename ACC>
__device__ __forceinline__ ACC warp_max_nan(ACC v) {
  for (int o = 16; o > 0; o >>= 1) v = max_nan(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Records a bad index in p.error (the first recorded wins; see DeviceError).
__device__ __forceinline__ void report_error(DeviceError* e, int32_t kind, int64_t index, int64_t value, int64_t limit,
                                             int64_t ignore) {
  if (e == nullptr || atomicCAS(&e->claimed, 0, 1) != 0) return;
  e->index = index;
  e->value = value;
  e->limit = limit;
  e->ignore = ignore;
  __threadfence_system();
  *static_cast<volatile int32_t*>(&e->kind) = kind;
}

// The local class of computed column c, clamped into the weight's classes: a bad class_index
// entry (reported by row_prep_kernel) never addresses memory outside weight.
__device__ __forceinline__ int64_t local_class(const HeadParams& p, int64_t c) {
  if (p.class_index == nullptr) return c;
  const int64_t v = p.class_index[c], last = p.weight_rows / p.K - 1;
  return v < 0 ? 0 : (v > last ? last : v);
}

// Checks class_index[c]: in [0, local classes) and above class_index[c − 1], else recorded in
// p.error. Called once per computed class by the kernels that gather weight rows (w_norm_kernel,
// chunk_weights_kernel), which read it through local_class.
__device__ __forceinline__ void check_class_index(const HeadParams& p, int64_t c) {
  if (p.class_index == nullptr) return;
  const int64_t v = p.class_index[c], local = p.weight_rows / p.K;
  if (v < 0 || v >= local) {
    report_error(p.error, kBadClassIndex, c, v, local, 0);
  } else if (c > 0 && p.class_index[c - 1] >= v) {
    report_error(p.error, kUnsortedClassIndex, c, v, p.class_index[c - 1], 0);
  }
}

template <typename ACC>
__device__ __forceinline__ ACC load_acc(const void* p, int64_t i) {
  return p == nullptr ? ACC(0) : static_cast<const ACC*>(p)[i];
}

// A warp per row: RowInfo (norms, target column, target logit). Also checks the labels, recording
// a bad one in p.error; a row with a bad label gets no target here and a NaN target logit.
template <typename TX, typename TW, typename ACC>
__global__ void __launch_bounds__(kThreads) row_prep_kernel(HeadParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const HeadConfig& cfg = p.cfg;
  if (i >= p.B) return;
  const TX* x = static_cast<const TX*>(p.x) + i * p.D;
  RowInfo<ACC> info{};
  info.side = make_side<ACC>(warp_row_norm<ACC>(x, p.D, lane), cfg.normalize_x, ACC(cfg.s));
  info.tcol = -1;
  info.tau = std::numeric_limits<ACC>::infinity();
  if (p.curricular) {
    info.tau = static_cast<const ACC*>(p.curricular)[2 * i];
    info.t = static_cast<const ACC*>(p.curricular)[2 * i + 1];
  }
  const int64_t y = p.labels[i];
  const bool bad_label = y != cfg.ignore_index && (y < 0 || y >= cfg.num_classes);
  info.bad = bad_label;
  if (bad_label) {
    if (lane == 0) report_error(p.error, kBadLabel, i, y, cfg.num_classes, cfg.ignore_index);
  } else if (y != cfg.ignore_index) {
    const int64_t local = y - cfg.class_offset;
    if (p.class_index) {
      int64_t lo = 0, hi = p.C;  // lower bound of local in class_index
      while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if (p.class_index[mid] < local)
          lo = mid + 1;
        else
          hi = mid;
      }
      if (lo < p.C && p.class_index[lo] == local) info.tcol = lo;
    } else if (local >= 0 && local < p.C) {
      info.tcol = local;
    }
  }
  if (info.tcol >= 0) {
    const int64_t lc = local_class(p, info.tcol);
    ACC best_u = 0, best_norm = 0, best = neg_inf<ACC>();
    int32_t best_k = 0;
    for (int32_t k = 0; k < p.K; ++k) {  // the sub-center the tiles pick: first largest logit
      const TW* w = static_cast<const TW*>(p.w) + (lc * p.K + k) * p.D;
      ACC u = 0, wn = 0;
      for (int64_t d = lane; d < p.D; d += 32) {
        const ACC wv = convert<ACC>(w[d]);
        u += convert<ACC>(x[d]) * wv;
        wn += wv * wv;
      }
      u = warp_sum(u);
      wn = sqrt(warp_sum(wn));
      const ACC logit = info.side.scale * make_side<ACC>(wn, cfg.normalize_w, ACC(1)).scale * u;
      if (logit > best || (logit != logit && best == best)) {  // a NaN sticks, as in the tiles
        best = logit;
        best_k = k;
        best_u = u;
        best_norm = wn;
      }
    }
    info.tsub = best_k;
    info.tside = make_side<ACC>(best_norm, cfg.normalize_w, ACC(1));
    const ACC* m = p.row_margins ? static_cast<const ACC*>(p.row_margins) + 3 * i : nullptr;
    info.target = target_logit<ACC>(cfg.margin_kind, cfg.theta_policy, best_u, info.side, info.tside,
                                    m ? m[0] : ACC(cfg.m1), m ? m[1] : ACC(cfg.m2), m ? m[2] : ACC(cfg.m3),
                                    ACC(cfg.lambda_), load_acc<ACC>(p.bias, info.tcol), cfg.straight_through);
  }
  if (lane == 0) static_cast<RowInfo<ACC>*>(p.rows)[i] = info;
}

// One (row, class) entry: from u = the K products x_i · W_jk and wn = their weight rows' norms
// (null: β = 1, the weight rows being unnormalized or already normalized), the class logit z⁰ = max_k α β_k u_k (no
// bias), its winning sub-center, and everything the loss and its gradient need of it.
template <typename ACC>
struct Entry {
  ACC z0;         // margin-free logit without bias
  ACC plain;      // z⁰ + bias: what accuracy compares
  ACC z;          // the logit the softmax sees (hard negatives, margin)
  ACC factor;     // ∂z/∂z⁰ off the target (CurricularFace: t + 2c on hard negatives)
  int32_t k;      // winning sub-center
  bool target;    // the margin's target entry
  bool filtered;  // interclass filtering: z = 0, no gradient (factor 0)
};

template <typename ACC>
__device__ __forceinline__ Entry<ACC> entry(const HeadParams& p, const RowInfo<ACC>& row, const ACC* u, const ACC* wn,
                                            int64_t j) {
  Entry<ACC> e;
  e.z0 = neg_inf<ACC>();
  e.k = 0;
  for (int32_t k = 0; k < p.K; ++k) {
    const ACC beta = wn ? make_side<ACC>(wn[k], p.cfg.normalize_w, ACC(1)).scale : ACC(1);
    const ACC v = row.side.scale * beta * u[k];
    if (v > e.z0 || (v != v && e.z0 == e.z0)) {  // the first largest; a NaN sticks, as torch's max
      e.z0 = v;
      e.k = k;
    }
  }
  const ACC bias = load_acc<ACC>(p.bias, j);
  e.plain = e.z0 + bias;
  e.z = e.plain;
  e.factor = ACC(1);
  if (p.curricular) {
    const ACC c = e.z0 / ACC(p.cfg.s);
    if (c > row.tau) {
      e.z = ACC(p.cfg.s) * c * (row.t + c) + bias;
      e.factor = row.t + ACC(2) * c;
    }
  }
  e.filtered = j != row.tcol && filtered_negative(e.z0 / ACC(p.cfg.s), p.cfg.interclass_filter);
  if (e.filtered) {
    e.z = ACC(0);
    e.factor = ACC(0);
  }
  e.target = p.cfg.margin_kind != kIdentity && j == row.tcol;
  if (e.target) {
    e.z = row.target.logit;
    e.k = row.tsub;
  }
  return e;
}

template <typename ACC>
__global__ void merge_kernel(HeadParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.B) return;
  const ACC* part = static_cast<const ACC*>(p.partial);
  ACC m = neg_inf<ACC>(), l = 0, zs = 0, bv = neg_inf<ACC>();
  int64_t bj = -1;
  // A split with sum 0 (no classes, or all −inf) adds nothing; a NaN sum (a NaN logit, or
  // exp(inf − inf)) or a NaN max is never dropped.
  for (int s = 0; s < p.splits; ++s) m = max_nan(m, part[(s * p.B + i) * 4]);
  for (int s = 0; s < p.splits; ++s) {
    const ACC* o = part + (s * p.B + i) * 4;
    if (o[1] != ACC(0)) l += o[1] * exp(o[0] - m);
    zs += o[2];
    const int64_t oj = p.partial_best[s * p.B + i];
    if (o[3] > bv || (o[3] == bv && oj >= 0 && (bj < 0 || oj < bj))) {  // first column on ties
      bv = o[3];
      bj = oj;
    }
  }
  const RowInfo<ACC>& row = static_cast<const RowInfo<ACC>*>(p.rows)[i];
  static_cast<ACC*>(p.lse)[i] = m + log(l);
  static_cast<ACC*>(p.logit_sum)[i] = zs;
  static_cast<ACC*>(p.best_logit)[i] = bv;
  static_cast<ACC*>(p.target_logit)[i] =
      row.bad ? std::numeric_limits<ACC>::quiet_NaN() : (row.tcol >= 0 ? row.target.logit : ACC(0));
  p.best_class[i] = bj < 0 ? -1 : p.cfg.class_offset + (p.class_index ? p.class_index[bj] : bj);
}

template <typename ACC>
__global__ void target_grad_kernel(HeadParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.B) return;
  RowInfo<ACC>& row = static_cast<RowInfo<ACC>*>(p.rows)[i];
  row.gl = load_acc<ACC>(p.g_lse, i);
  row.gs = load_acc<ACC>(p.g_sum, i);
  row.gt = load_acc<ACC>(p.g_target, i);
  row.lse = static_cast<const ACC*>(p.lse_in)[i];
  row.g_target = 0;
  row.tg = TargetGrad<ACC>{};
  if (row.tcol >= 0) {
    row.g_target = row.gl * exp(row.target.logit - row.lse) + row.gs + row.gt;
    row.tg = target_grad<ACC>(row.target, row.side, row.tside, row.g_target);
  }
  if (p.dm) {
    ACC* dm = static_cast<ACC*>(p.dm) + 3 * i;
    dm[0] = 0;
    dm[1] = row.tg.d_m2;
    dm[2] = row.tg.d_m3;
  }
}

// ∂L/∂z of one entry before the hard-negative factor (the bias' gradient).
template <typename ACC>
__device__ __forceinline__ ACC entry_grad(const RowInfo<ACC>& row, const Entry<ACC>& e, bool is_label) {
  if (e.target) return row.g_target;
  if (e.filtered) return ACC(0);
  ACC g = row.gl * exp(e.z - row.lse) + row.gs;
  return is_label ? g + row.gt : g;
}

// The largest v of the warp and its column j, the first column on ties (j < 0: none).
template <typename ACC>
__device__ __forceinline__ void warp_argmax(ACC& v, int64_t& j) {
  for (int o = 16; o > 0; o >>= 1) {
    const ACC ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int64_t oj = __shfl_xor_sync(0xffffffffu, j, o);
    if (ov > v || (ov == v && oj >= 0 && (j < 0 || oj < j))) {
      v = ov;
      j = oj;
    }
  }
}

// The kernels for one (x, weight) dtype pair: 16-bit features run their products on tensor
// cores with the weight converted tile by tile; float on tensor cores as TF32 when allowed, else
// on CUDA cores, as double always is.
template <typename F>
cudaError_t dispatch(const HeadParams& p, F&& f) {
  if (p.x_dtype == kDouble && p.w_dtype == kDouble) return f(double(), double(), double(), double());
  if (p.x_dtype == kFloat && p.w_dtype == kFloat) {
    return p.allow_tf32 ? f(float(), float(), tf32_t(), float()) : f(float(), float(), float(), float());
  }
  if (p.x_dtype == kHalf && p.w_dtype == kHalf) return f(__half(), __half(), __half(), float());
  if (p.x_dtype == kBFloat16 && p.w_dtype == kBFloat16)
    return f(__nv_bfloat16(), __nv_bfloat16(), __nv_bfloat16(), float());
  if (p.x_dtype == kHalf && p.w_dtype == kFloat) return f(__half(), float(), __half(), float());
  if (p.x_dtype == kBFloat16 && p.w_dtype == kFloat) return f(__nv_bfloat16(), float(), __nv_bfloat16(), float());
  return cudaErrorInvalidValue;
}

}  // namespace
}  // namespace marginops::cuda
