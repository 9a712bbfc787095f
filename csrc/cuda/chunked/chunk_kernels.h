// The chunked CUDA backend's kernels (docs/design.md, "CUDA chunked"): the class dimension in chunks of Cc
// classes, all B rows at once. The products are cuBLAS GEMMs issued by the launcher
// (chunked_launch.h); these kernels do what cuBLAS cannot, one pass over a chunk each. No torch
// headers, so CI compile-checks them with nvcc alone.
//
// Per chunk of classes [c0, c0 + n) (n·K weight rows, "positions" q = j·K + k):
//   weights   norms of the chunk's weight rows; with a copy, the rows gathered (class_index) and
//             converted to the operand dtype (float32 W with 16-bit x), or scaled to unit norm
//             (float16 with normalized weights, so that folding β into G cannot overflow).
//   GEMM      u [B, n·K] = x · Wcᵀ, float32 (float64) out, rows ldu = chunk_ldu(n, K) apart.
//   softmax   (forward) the column scales, sub-center max, hard negatives, bias and margin, folded
//             into per-(segment, row) running (max, sum-exp, logit sum, best) slots.
//   grad      (backward) G [B, n·K] in the operand dtype: off the target,
//             Ĝ = σ · (g_lse·p + g_sum) · factor · β / r_i at the winning sub-center, 0 elsewhere;
//             r_i = max(|g_lse|, |g_sum|) (the row's loss weight, kept out of Ĝ so 16-bit G does
//             not underflow at C = 1M), σ = 2^12 for float16 (its exponent range), else 1.
//   GEMMs     dx_acc [B, D] += Ĝ · Wc (float32 accumulate across chunks);
//             dw_acc [n·K, ldx] = Ĝᵀ · xs, xs_i = (r_i / R) α_i x_i (R = max r), and the bias
//             column xs_i[D] = r_i / R.
//   dw        dW of the chunk's rows in W's dtype: the column scale, the normalization's radial
//             projection, and the target entries (exact, in float32, from the rows whose label
//             falls here: the target never goes through 16-bit G).
// After the last chunk: the forward merges the slots; the backward finalizes dx (row scale,
// radial projection, target row of W).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cmath>
#include <cstdint>
#include <limits>

#include "../kernel_params.h"

namespace marginops::cuda {

// The sizes and workspace of one chunked op, from the shapes and a byte budget for all of it.
struct ChunkPlan {
  int64_t classes = 0;  // Cc, classes per chunk (a multiple of 64 unless all C fit)
  int64_t chunks = 0;
  int segments = 1;         // forward slots per row: column segments of a chunk
  int64_t ldx = 0;          // columns of xs and dw_acc: D, or D + 8 with the bias column
  bool copy_w = false;      // the chunk's weight rows are copied (gather, conversion or prescale)
  bool prescale_w = false;  // the copy holds W/‖W‖ (float16 operands with normalized weights)
  // Bytes of each buffer, and of all of them 256-aligned (one allocation).
  size_t rows = 0, slots = 0, slot_best = 0, logits = 0, grad = 0, w_copy = 0, col_norm = 0, col_inv = 0;
  size_t dx_acc = 0, xs = 0, row_keys = 0, scalar = 0;
  size_t total = 0;
};

// The plan for p's shapes and dtypes (the forward's when !backward), with need_db when the bias
// gradient is wanted. Chunks are as large as `budget` bytes allow after the O(B·D) buffers; a
// budget below those gives chunks of one class.
ChunkPlan plan_chunks(const HeadParams& p, bool backward, bool need_db, size_t budget);

// One chunk's pointers (buffers carved from the plan's workspace).
struct ChunkParams {
  int64_t c0 = 0, n = 0;  // the chunk's classes among the computed ones
  bool first = false;     // the first chunk: the forward's slots start empty
  int segments = 1;
  bool prescale_w = false;
  const void* wc = nullptr;  // [n·K, D] operand dtype: a view of weight, or w_copy
  void* w_copy = nullptr;    // operand dtype [Cc·K, D], or null (no copy)
  void* col_norm = nullptr;  // acc [Cc·K]: ‖W_q‖, or null when weights are not normalized
  void* col_inv = nullptr;   // acc [Cc·K]: 1 / max(‖W_q‖, eps), where u is scaled by it (else null)
  int64_t ldu = 0;           // columns of u and G: chunk_ldu(n, K)
  float filter_f = 0;        // float32 kernels' interclass filter: filter_threshold(cfg) (+inf: off)
  void* logits = nullptr;    // acc [B, ldu] (u); in the backward also dw_acc [n·K, ldx]
  void* grad = nullptr;      // operand dtype [B, ldu]
  int64_t ldx = 0;
  void* xs = nullptr;                    // operand dtype [B, ldx]
  void* dx_acc = nullptr;                // acc [B, D]
  void* row_scale_max = nullptr;         // acc [1]: R
  int64_t* row_keys = nullptr;           // [B] target position tcol·K + tsub, or INT64_MAX
  const int64_t* sorted_keys = nullptr;  // row_keys sorted, and the rows in that order
  const int64_t* sorted_rows = nullptr;
};

// Launch entry points, each one kernel (row_prep: two in the backward). Forward:
//   chunk_row_prep(p, c, false) · per chunk: chunk_weights, GEMM, chunk_softmax · chunk_merge.
// Backward (p.lse_in and the row gradients set):
//   chunk_row_prep(p, c, true) (rows, target gradient, row scales, keys) · sort the keys ·
//   chunk_scaled_x · per chunk: chunk_weights, GEMM, chunk_grad, GEMM (dx), GEMM (dW), chunk_dw ·
//   chunk_dx_finalize.
cudaError_t chunk_row_prep(const HeadParams& p, const ChunkParams& c, bool backward, cudaStream_t stream);
cudaError_t chunk_weights(const HeadParams& p, const ChunkParams& c, cudaStream_t stream);
cudaError_t chunk_softmax(const HeadParams& p, const ChunkParams& c, cudaStream_t stream);
cudaError_t chunk_merge(const HeadParams& p, cudaStream_t stream);
cudaError_t chunk_scaled_x(const HeadParams& p, const ChunkParams& c, cudaStream_t stream);
cudaError_t chunk_grad(const HeadParams& p, const ChunkParams& c, cudaStream_t stream);
cudaError_t chunk_dw(const HeadParams& p, const ChunkParams& c, cudaStream_t stream);
cudaError_t chunk_dx_finalize(const HeadParams& p, const ChunkParams& c, cudaStream_t stream);

// The interclass filter's threshold for float32 cosines: the largest float not above t_f, so
// that c > it exactly when c > t_f in double; +inf when the filter is off.
inline float filter_threshold(double t) {
  if (!(t > 0)) return std::numeric_limits<float>::infinity();
  const float f = static_cast<float>(t);
  return static_cast<double>(f) > t ? std::nextafter(f, -std::numeric_limits<float>::infinity()) : f;
}

// Columns of a chunk's u and G rows: n·K rounded up to a multiple of 8 (16-byte vectors).
int64_t chunk_ldu(int64_t classes, int64_t K);

// The operand dtype of the products for an (x, weight) pair: x's, except float64 only with both.
DType chunk_operand_dtype(DType x, DType w);

// Kernel launches of one op for a plan (GEMMs included; the launcher's few ATen calls not):
// what tests check against the launch budget.
int64_t chunk_launches(const ChunkPlan& plan, const HeadParams& p, bool backward);

}  // namespace marginops::cuda
