// The chunked backend's kernels; chunk_kernels.h says what each does and in which order the
// launcher (chunked_launch.h) calls them between its cuBLAS GEMMs. Every kernel is one pass over
// its data with warps on rows (coalesced along D or along a chunk row of u); none uses atomics.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../../margin_math.h"
#include "chunk_kernels.h"
#include "../kernel_params.h"
#include "chunk_logits.cuh"
#include "../rows.cuh"
#include "../tile_mma.cuh"

namespace marginops::cuda {
namespace {

constexpr int kMaxSegments = 16;  // forward slots per row
constexpr int kSegmentMin = 256;  // classes per segment at least (small chunks: fewer segments)
constexpr int64_t kNoKey = std::numeric_limits<int64_t>::max();

// The GEMM operand type of a dispatch tuple: cuBLAS rounds float32 to TF32 itself when torch
// allows it, so tf32_t is plain float here.
template <typename OP>
using Operand = std::conditional_t<std::is_same_v<OP, tf32_t>, float, OP>;

__device__ __forceinline__ int64_t source_row(const HeadParams& p, int64_t column, int64_t k) {
  return local_class(p, column) * p.K + k;
}

// First index in sorted[0, n) whose key is >= key.
__device__ __forceinline__ int64_t lower_bound(const int64_t* sorted, int64_t n, int64_t key) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (sorted[mid] < key)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

template <typename ACC>
__device__ __forceinline__ ACC abs_(ACC v) {
  return v < ACC(0) ? -v : v;
}

// ---- per row ------------------------------------------------------------------------------------

// One block: each row's scale r_i = max(|g_lse|, |g_sum|), their maximum R, and each row's
// target position (the sort key of chunk_dw's label lookup).
template <typename ACC>
__global__ void __launch_bounds__(kThreads) chunk_row_scale_kernel(HeadParams p, ChunkParams c) {
  MO_DYNAMIC_SMEM(smem_raw);
  ACC* part = reinterpret_cast<ACC*>(smem_raw);
  RowInfo<ACC>* rows = static_cast<RowInfo<ACC>*>(p.rows);
  ACC r_max = 0;
  for (int64_t i = threadIdx.x; i < p.B; i += blockDim.x) {
    RowInfo<ACC>& row = rows[i];
    row.gscale = max(abs_(row.gl), abs_(row.gs));
    r_max = max(r_max, row.gscale);
    c.row_keys[i] = row.tcol >= 0 ? row.tcol * p.K + row.tsub : kNoKey;
  }
  r_max = warp_max(r_max);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = r_max;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) r_max = max(r_max, part[w]);
    *static_cast<ACC*>(c.row_scale_max) = r_max;
  }
}

// xs [B, ldx] = (r_i / R) α_i x_i, then the bias column r_i / R, then zeros.
template <typename TX, typename OP, typename ACC>
__global__ void __launch_bounds__(kThreads) chunk_scaled_x_kernel(HeadParams p, ChunkParams c) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= p.B * c.ldx) return;
  const int64_t i = e / c.ldx, d = e % c.ldx;
  const RowInfo<ACC>& row = static_cast<const RowInfo<ACC>*>(p.rows)[i];
  const ACC R = *static_cast<const ACC*>(c.row_scale_max);
  const ACC rho = R > ACC(0) ? row.gscale / R : ACC(0);
  ACC v = 0;
  if (d < p.D) {
    v = rho * row.side.scale * convert<ACC>(static_cast<const TX*>(p.x)[i * p.D + d]);
  } else if (d == p.D) {
    v = rho;
  }
  static_cast<OP*>(c.xs)[e] = convert<OP>(v);
}

// ---- per chunk ----------------------------------------------------------------------------------

// A warp per weight row of the chunk: its norm, and its copy (gathered, converted, prescaled).
template <typename TW, typename OP, typename ACC>
__global__ void __launch_bounds__(kThreads) chunk_weights_kernel(HeadParams p, ChunkParams c) {
  const int64_t q = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (q >= c.n * p.K) return;
  if (lane == 0 && q % p.K == 0) check_class_index(p, c.c0 + q / p.K);
  const TW* w = static_cast<const TW*>(p.w) + source_row(p, c.c0 + q / p.K, q % p.K) * p.D;
  ACC inv = 1;
  if (c.col_norm) {
    const ACC norm = warp_row_norm<ACC>(w, p.D, lane);
    inv = inv_norm(norm);
    if (lane == 0) {
      static_cast<ACC*>(c.col_norm)[q] = norm;
      if (c.col_inv) static_cast<ACC*>(c.col_inv)[q] = inv;
    }
  }
  if (c.w_copy) {
    OP* dst = static_cast<OP*>(c.w_copy) + q * p.D;
    const ACC f = c.prescale_w ? inv : ACC(1);
    for (int64_t d = lane; d < p.D; d += 32) dst[d] = convert<OP>(f * convert<ACC>(w[d]));
  }
}

// A warp per weight row q of the chunk (position pos = (c0 + q / K)·K + q % K among the computed
// classes): dW_q = v − (v·Ŵ)Ŵ [normalized weights] + Σ over the rows whose target is q of
// (κ_i x_i + w_coef_i Ŵ), with v = R/σ · β/β_folded · dw_acc_q, κ_i = α_i β_y ∂L/∂(tile entry).
// The warp of a class's first sub-center also writes dbias.
template <typename TX, typename TW, typename OP, typename ACC>
__global__ void __launch_bounds__(kThreads) chunk_dw_kernel(HeadParams p, ChunkParams c) {
  const int64_t q = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (q >= c.n * p.K) return;
  const RowInfo<ACC>* rows = static_cast<const RowInfo<ACC>*>(p.rows);
  const int64_t j = q / p.K, k = q % p.K, jg = c.c0 + j, src = source_row(p, jg, k);
  const bool nw = p.cfg.normalize_w;
  const ACC norm = nw ? static_cast<const ACC*>(c.col_norm)[q] : ACC(0);
  const ACC beta = nw ? inv_norm(norm) : ACC(1), folded = nw && !c.prescale_w ? beta : ACC(1);
  const ACC R = *static_cast<const ACC*>(c.row_scale_max) / ACC(kGradScale<OP>);
  const ACC scale = R * beta / folded;
  const ACC* acc = static_cast<const ACC*>(c.logits) + q * c.ldx;
  const TW* w = static_cast<const TW*>(p.w) + src * p.D;
  const int64_t lo = lower_bound(c.sorted_keys, p.B, jg * p.K + k);
  const int64_t hi = lower_bound(c.sorted_keys, p.B, jg * p.K + k + 1);
  if (p.dw) {
    const bool project = nw && norm > ACC(kNormEps);
    ACC dot = 0;
    for (int64_t d = lane; project && d < p.D; d += 32) dot += scale * acc[d] * convert<ACC>(w[d]) * beta;
    dot = warp_sum(dot);
    ACC wcoef = 0;  // the targets' Ŵ coefficients; their Ŵ = W · (the target side's inv)
    for (int64_t t = lo; t < hi; ++t) wcoef += rows[c.sorted_rows[t]].tg.w_coef;
    const ACC tinv = lo < hi ? rows[c.sorted_rows[lo]].tside.inv : ACC(0);
    TW* out = static_cast<TW*>(p.dw) + src * p.D;
    for (int64_t d = lane; d < p.D; d += 32) {
      const ACC wv = convert<ACC>(w[d]);
      ACC v = scale * acc[d];
      if (project) v -= dot * wv * beta;
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t i = c.sorted_rows[t];
        const RowInfo<ACC>& row = rows[i];
        v += row.side.scale * row.tside.scale * row.tg.tile_grad *
             convert<ACC>(static_cast<const TX*>(p.x)[i * p.D + d]);
      }
      out[d] = convert<TW>(wcoef != ACC(0) ? v + wcoef * tinv * wv : v);  // no 0·inf where eager has no Ŵ term
    }
  }
  if (p.dbias && k == 0 && lane == 0) {
    ACC db = 0;
    for (int64_t kk = 0; kk < p.K; ++kk) {
      const ACC f = nw && !c.prescale_w ? inv_norm(static_cast<const ACC*>(c.col_norm)[j * p.K + kk]) : ACC(1);
      db += R * static_cast<const ACC*>(c.logits)[(j * p.K + kk) * c.ldx + p.D] / f;
    }
    const int64_t end = lower_bound(c.sorted_keys, p.B, (jg + 1) * p.K);
    for (int64_t t = lower_bound(c.sorted_keys, p.B, jg * p.K); t < end; ++t) db += rows[c.sorted_rows[t]].g_target;
    static_cast<ACC*>(p.dbias)[jg] = db;
  }
}

// A warp per row: dx_i = v − (v·x̂)x̂ [normalized features] + κ_i W_target + x_coef x̂, with
// v = α_i r_i/σ · dx_acc_i.
template <typename TX, typename TW, typename OP, typename ACC>
__global__ void __launch_bounds__(kThreads) chunk_dx_finalize_kernel(HeadParams p, ChunkParams c) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= p.B) return;
  const RowInfo<ACC>& row = static_cast<const RowInfo<ACC>*>(p.rows)[i];
  const ACC f = row.side.scale * row.gscale / ACC(kGradScale<OP>);
  const ACC* a = static_cast<const ACC*>(c.dx_acc) + i * p.D;
  const TX* x = static_cast<const TX*>(p.x) + i * p.D;
  const bool project = row.side.normalized && row.side.norm > ACC(kNormEps);
  ACC dot = 0;
  for (int64_t d = lane; project && d < p.D; d += 32) dot += f * a[d] * convert<ACC>(x[d]) * row.side.inv;
  dot = warp_sum(dot);
  const TW* tw = row.tcol >= 0 ? static_cast<const TW*>(p.w) + source_row(p, row.tcol, row.tsub) * p.D : nullptr;
  const ACC kappa = row.side.scale * row.tside.scale * row.tg.tile_grad;
  TX* out = static_cast<TX*>(p.dx) + i * p.D;
  for (int64_t d = lane; d < p.D; d += 32) {
    const ACC xh = convert<ACC>(x[d]) * row.side.inv;
    ACC v = f * a[d];
    if (project) v -= dot * xh;
    if (tw) v += kappa * convert<ACC>(tw[d]) + row.tg.x_coef * xh;
    out[d] = convert<TX>(v);
  }
}

// ---- launches -----------------------------------------------------------------------------------

unsigned ceil_div(int64_t n, int64_t per) {
  return static_cast<unsigned>((n + per - 1) / per);
}

size_t dtype_size(DType t) {
  return t == kDouble ? 8 : (t == kFloat ? 4 : 2);
}

size_t align256(size_t n) {
  return (n + 255) / 256 * 256;
}

template <typename F>
cudaError_t typed(const HeadParams& p, F&& f) {
  return dispatch(p, [&](auto tx, auto tw, auto op, auto acc) { return f(tx, tw, Operand<decltype(op)>(), acc); });
}

}  // namespace

int64_t chunk_ldu(int64_t classes, int64_t K) {
  return (classes * K + 7) / 8 * 8;
}

DType chunk_operand_dtype(DType x, DType w) {
  return x == kDouble && w != kDouble ? kFloat : x;
}

ChunkPlan plan_chunks(const HeadParams& p, bool backward, bool need_db, size_t budget) {
  const DType op = chunk_operand_dtype(p.x_dtype, p.w_dtype);
  const size_t acc = p.acc_double ? 8 : 4, ope = dtype_size(op);
  const size_t B = static_cast<size_t>(p.B), D = static_cast<size_t>(p.D), K = static_cast<size_t>(p.K);
  ChunkPlan pl;
  pl.ldx = backward && need_db ? (p.D + 8) / 8 * 8 : p.D;
  pl.prescale_w = op == kHalf && p.cfg.normalize_w;
  pl.copy_w = p.class_index != nullptr || op != p.w_dtype || pl.prescale_w;
  const size_t ldx = static_cast<size_t>(pl.ldx);
  pl.rows = B * (p.acc_double ? sizeof(RowInfo<double>) : sizeof(RowInfo<float>));
  pl.slots = backward ? 0 : kMaxSegments * B * 4 * acc;
  pl.slot_best = backward ? 0 : kMaxSegments * B * sizeof(int64_t);
  pl.dx_acc = backward ? B * D * acc : 0;
  pl.xs = backward ? B * ldx * ope : 0;
  pl.row_keys = backward ? B * sizeof(int64_t) : 0;
  pl.scalar = acc;
  // The sort of the keys allocates its sorted keys and order (2·B int64) besides.
  // u and G rows padded to a multiple of 8 entries (ldu): 16-byte vector loads and stores
  const size_t pad = 7 * B * (acc + (backward ? ope : 0));
  const size_t fixed = pad + align256(pl.rows) + align256(pl.slots) + align256(pl.slot_best) + align256(pl.dx_acc) +
                       align256(pl.xs) + align256(pl.row_keys) + align256(pl.scalar) + (backward ? 2 * B * 8 : 0) +
                       4 * 256;  // the per-chunk buffers' alignment
  const size_t per_class = K * (acc * (backward ? (B > ldx ? B : ldx) : B) + (backward ? ope * B : 0) +
                                (pl.copy_w ? ope * D : 0) + (p.cfg.normalize_w ? acc : 0));
  const int64_t C = p.C;
  int64_t cc = budget > fixed ? static_cast<int64_t>((budget - fixed) / (per_class > 0 ? per_class : 1)) : 0;
  if (cc >= 64) cc -= cc % 64;
  cc = cc < 1 ? 1 : cc;
  cc = cc < C ? cc : C;
  // a chunk's u has fewer than 2^31 entries: the per-logit kernels index it in 32 bits
  const int64_t max_cc = (int64_t(INT32_MAX) / (B > 0 ? static_cast<int64_t>(B) : 1) - 8) / static_cast<int64_t>(K);
  if (cc > max_cc) cc = max_cc >= 64 ? max_cc - max_cc % 64 : max_cc;
  pl.classes = cc;
  pl.chunks = cc > 0 ? (C + cc - 1) / cc : 0;
  const int64_t seg = (cc + kSegmentMin - 1) / kSegmentMin;
  pl.segments = static_cast<int>(seg < 1 ? 1 : (seg > kMaxSegments ? kMaxSegments : seg));
  const size_t n = static_cast<size_t>(cc) * K, ldu = chunk_ldu(cc, p.K);
  pl.logits = acc * (backward ? std::max(B * ldu, n * ldx) : B * ldu);
  pl.grad = backward ? ldu * B * ope : 0;
  pl.w_copy = pl.copy_w ? n * D * ope : 0;
  pl.col_norm = p.cfg.normalize_w ? n * acc : 0;
  pl.col_inv = p.cfg.normalize_w && !pl.prescale_w ? n * acc : 0;
  pl.total = align256(pl.rows) + align256(pl.slots) + align256(pl.slot_best) + align256(pl.logits) + align256(pl.grad) +
             align256(pl.w_copy) + align256(pl.col_norm) + align256(pl.col_inv) + align256(pl.dx_acc) +
             align256(pl.xs) + align256(pl.row_keys) + align256(pl.scalar);
  return pl;
}

int64_t chunk_launches(const ChunkPlan& pl, const HeadParams& p, bool backward) {
  const int64_t weights = pl.copy_w || p.cfg.normalize_w ? 1 : 0;
  if (!backward) return 2 + pl.chunks * (weights + 2) + (pl.chunks == 0 ? 1 : 0);
  const bool dx = p.dx != nullptr, dw = p.dw != nullptr || p.dbias != nullptr;
  return 3 + (dw ? 1 : 0) + pl.chunks * (weights + 2 + (dx ? 1 : 0) + (dw ? 2 : 0)) + (dx ? 1 : 0);
}

cudaError_t chunk_row_prep(const HeadParams& p, const ChunkParams& c, bool backward, cudaStream_t stream) {
  if (p.B == 0) return cudaSuccess;
  return typed(p, [&](auto tx, auto tw, auto, auto acc) {
    using TX = decltype(tx);
    using TW = decltype(tw);
    using ACC = decltype(acc);
    MO_LAUNCH((row_prep_kernel<TX, TW, ACC>), ceil_div(p.B, kWarps), kThreads, 0, stream, p);
    if (!backward) return cudaGetLastError();
    MO_LAUNCH(target_grad_kernel<ACC>, ceil_div(p.B, 256), 256, 0, stream, p);
    MO_LAUNCH(chunk_row_scale_kernel<ACC>, 1, kThreads, kWarps * sizeof(ACC), stream, p, c);
    return cudaGetLastError();
  });
}

cudaError_t chunk_scaled_x(const HeadParams& p, const ChunkParams& c, cudaStream_t stream) {
  if (p.B == 0) return cudaSuccess;
  return typed(p, [&](auto tx, auto, auto op, auto acc) {
    MO_LAUNCH((chunk_scaled_x_kernel<decltype(tx), decltype(op), decltype(acc)>), ceil_div(p.B * c.ldx, 256), 256, 0,
              stream, p, c);
    return cudaGetLastError();
  });
}

cudaError_t chunk_weights(const HeadParams& p, const ChunkParams& c, cudaStream_t stream) {
  if ((c.w_copy == nullptr && c.col_norm == nullptr) || c.n == 0) return cudaSuccess;
  return typed(p, [&](auto, auto tw, auto op, auto acc) {
    MO_LAUNCH((chunk_weights_kernel<decltype(tw), decltype(op), decltype(acc)>), ceil_div(c.n * p.K, kWarps), kThreads,
              0, stream, p, c);
    return cudaGetLastError();
  });
}

cudaError_t chunk_softmax(const HeadParams& p, const ChunkParams& c, cudaStream_t stream) {
  if (p.B == 0) return cudaSuccess;
  return typed(p, [&](auto, auto, auto, auto acc) {
    using ACC = decltype(acc);
    return with_variant(p, c, [&](auto variant) {
      MO_LAUNCH((chunk_softmax_kernel<ACC, decltype(variant)>), dim3(ceil_div(p.B, kWarps), c.segments), kThreads, 0,
                stream, p, c);
      return cudaGetLastError();
    });
  });
}

cudaError_t chunk_merge(const HeadParams& p, cudaStream_t stream) {
  if (p.B == 0) return cudaSuccess;
  return typed(p, [&](auto, auto, auto, auto acc) {
    MO_LAUNCH(merge_kernel<decltype(acc)>, ceil_div(p.B, 256), 256, 0, stream, p);
    return cudaGetLastError();
  });
}

cudaError_t chunk_grad(const HeadParams& p, const ChunkParams& c, cudaStream_t stream) {
  if (p.B == 0 || c.n == 0) return cudaSuccess;
  return typed(p, [&](auto, auto, auto op, auto acc) {
    using OP = decltype(op);
    using ACC = decltype(acc);
    return with_variant(p, c, [&](auto variant) {
      MO_LAUNCH((chunk_grad_kernel<OP, ACC, decltype(variant)>), dim3(ceil_div(p.B, kWarps), c.segments), kThreads, 0,
                stream, p, c);
      return cudaGetLastError();
    });
  });
}

cudaError_t chunk_dw(const HeadParams& p, const ChunkParams& c, cudaStream_t stream) {
  if (c.n == 0) return cudaSuccess;
  return typed(p, [&](auto tx, auto tw, auto op, auto acc) {
    MO_LAUNCH((chunk_dw_kernel<decltype(tx), decltype(tw), decltype(op), decltype(acc)>), ceil_div(c.n * p.K, kWarps),
              kThreads, 0, stream, p, c);
    return cudaGetLastError();
  });
}

cudaError_t chunk_dx_finalize(const HeadParams& p, const ChunkParams& c, cudaStream_t stream) {
  if (p.B == 0) return cudaSuccess;
  return typed(p, [&](auto tx, auto tw, auto op, auto acc) {
    MO_LAUNCH((chunk_dx_finalize_kernel<decltype(tx), decltype(tw), decltype(op), decltype(acc)>),
              ceil_div(p.B, kWarps), kThreads, 0, stream, p, c);
    return cudaGetLastError();
  });
}

}  // namespace marginops::cuda
