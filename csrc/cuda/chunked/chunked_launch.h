// The chunked backend's op bodies (docs/design.md, "CUDA chunked"): the chunk loop, written once against ATen and
// a Runtime that adds gemm() to launch.h's (cuBLAS through torch's handle and current
// stream on CUDA; ATen's CPU mm under tests/cuda_emu). Also the ops' CUDA entry points, which
// pick a backend.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>

#include "chunk_kernels.h"
#include "../launch.h"

namespace marginops::cuda {

// Runtime::gemm's operands as tensors over its pointers: row-major C [M, N] (ldc) =
// op(A) · op(B) (+ beta · C), op(A) = ta ? Aᵀ : A with A stored [K, M] or [M, K] (lda), likewise B;
// A and B in the operand dtype (transposes as strides, no copies), C in float32 (float64 for
// float64 operands). Both runtimes (register_cuda.cpp, tests/cuda_emu) multiply these.
struct GemmViews {
  at::Tensor a, b, c;
};
inline GemmViews gemm_views(const at::TensorOptions& opts, DType op, bool ta, bool tb, int64_t M, int64_t N, int64_t K,
                            const void* A, int64_t lda, const void* B, int64_t ldb, void* C, int64_t ldc) {
  const at::ScalarType st = scalar_type_of(op), acc = st == at::kDouble ? at::kDouble : at::kFloat;
  const auto operand = [&](const void* ptr, int64_t rows, int64_t cols, int64_t ld, bool t) {
    at::Tensor s = at::from_blob(const_cast<void*>(ptr), {t ? cols : rows, t ? rows : cols}, {ld, 1}, opts.dtype(st));
    return t ? s.t() : s;
  };
  return {operand(A, M, K, lda, ta), operand(B, K, N, ldb, tb), at::from_blob(C, {M, N}, {ldc, 1}, opts.dtype(acc))};
}

// The plan of this thread's last chunked op (tests read it through tests/cuda_emu).
inline ChunkPlan& last_chunk_plan() {
  static thread_local ChunkPlan plan;
  return plan;
}

// The plan's buffers carved from one allocation that `l` keeps alive.
inline ChunkParams carve(const ChunkPlan& plan, HeadParams& p, const at::TensorOptions& opts, Launch& l) {
  WorkspaceCarver ws(plan.total, opts, l);
  ChunkParams c;
  p.rows = ws.take(plan.rows);
  p.partial = ws.take(plan.slots);
  p.partial_best = static_cast<int64_t*>(ws.take(plan.slot_best));
  p.splits = plan.segments;
  c.logits = ws.take(plan.logits);
  c.grad = ws.take(plan.grad);
  c.w_copy = ws.take(plan.w_copy);
  c.col_norm = ws.take(plan.col_norm);
  c.col_inv = ws.take(plan.col_inv);
  c.dx_acc = ws.take(plan.dx_acc);
  c.xs = ws.take(plan.xs);
  c.row_keys = static_cast<int64_t*>(ws.take(plan.row_keys));
  c.row_scale_max = ws.take(plan.scalar);
  c.segments = plan.segments;
  c.prescale_w = plan.prescale_w;
  c.ldx = plan.ldx;
  c.filter_f = filter_threshold(p.cfg.interclass_filter);
  return c;
}

// Chunk t's classes and weight rows: the copy, or a view of weight.
inline void select_chunk(const ChunkPlan& plan, const HeadParams& p, int64_t t, ChunkParams& c) {
  c.c0 = t * plan.classes;
  c.n = std::min(plan.classes, p.C - c.c0);
  c.first = t == 0;
  c.ldu = chunk_ldu(c.n, p.K);
  const size_t elt = at::elementSize(scalar_type_of(p.w_dtype));
  c.wc = c.w_copy ? c.w_copy : static_cast<const uint8_t*>(p.w) + static_cast<size_t>(c.c0 * p.K * p.D) * elt;
}

template <typename Runtime>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> chunked_forward_op(const HeadArgs& a,
                                                                                          size_t budget) {
  const auto guard = Runtime::guard(a.x.device());
  Launch l = prepare_params<Runtime>(a);
  HeadParams& p = l.p;
  const ChunkPlan plan = plan_chunks(p, false, false, budget);
  last_chunk_plan() = plan;
  ChunkParams c = carve(plan, p, a.x.options(), l);
  const auto opts = a.x.options().dtype(a.acc_dtype());
  at::Tensor lse = at::empty({a.rows}, opts), zt = at::empty({a.rows}, opts), zsum = at::empty({a.rows}, opts);
  at::Tensor best = at::empty({a.rows}, opts), best_class = at::empty({a.rows}, opts.dtype(at::kLong));
  p.lse = lse.data_ptr();
  p.target_logit = zt.data_ptr();
  p.logit_sum = zsum.data_ptr();
  p.best_logit = best.data_ptr();
  p.best_class = best_class.data_ptr<int64_t>();
  const auto stream = Runtime::stream();
  const DType op = chunk_operand_dtype(p.x_dtype, p.w_dtype);
  Runtime::check(chunk_row_prep(p, c, false, stream));
  for (int64_t t = 0; t < plan.chunks; ++t) {
    select_chunk(plan, p, t, c);
    Runtime::check(chunk_weights(p, c, stream));
    // u [B, n·K] = x · Wcᵀ
    Runtime::gemm(op, false, true, p.B, c.n * p.K, p.D, p.x, p.D, c.wc, p.D, 0.0, c.logits, c.ldu);
    Runtime::check(chunk_softmax(p, c, stream));
  }
  if (plan.chunks == 0) {  // no classes here: empty slots
    c.n = 0;
    c.first = true;
    Runtime::check(chunk_softmax(p, c, stream));
  }
  Runtime::check(chunk_merge(p, stream));
  return {lse, zt, zsum, best, best_class};
}

template <typename Runtime>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> chunked_backward_op(
    const std::optional<at::Tensor>& grad_lse, const std::optional<at::Tensor>& grad_target,
    const std::optional<at::Tensor>& grad_sum, const at::Tensor& lse, const HeadArgs& a,
    std::array<bool, 4> output_mask, size_t budget) {
  const auto guard = Runtime::guard(a.x.device());
  Launch l = prepare_params<Runtime>(a);
  return backward_with<Runtime>(grad_lse, grad_target, grad_sum, lse, a, output_mask, l, [&](Launch& launch) {
    HeadParams& p = launch.p;
    const bool need_dw = p.dw != nullptr || p.dbias != nullptr;
    const ChunkPlan plan = plan_chunks(p, true, p.dbias != nullptr, budget);
    last_chunk_plan() = plan;
    ChunkParams c = carve(plan, p, a.x.options(), launch);
    if (p.B == 0) {  // no rows: dW and dbias stay zero
      if (p.dw) at::from_blob(p.dw, a.weight.sizes(), a.weight.options()).zero_();
      return;
    }
    const auto stream = Runtime::stream();
    const DType op = chunk_operand_dtype(p.x_dtype, p.w_dtype);
    Runtime::check(chunk_row_prep(p, c, true, stream));
    const auto [sorted_keys, sorted_rows] = at::from_blob(c.row_keys, {p.B}, a.x.options().dtype(at::kLong)).sort();
    launch.keep.push_back(sorted_keys);
    launch.keep.push_back(sorted_rows);
    c.sorted_keys = sorted_keys.data_ptr<int64_t>();
    c.sorted_rows = sorted_rows.data_ptr<int64_t>();
    if (need_dw) Runtime::check(chunk_scaled_x(p, c, stream));
    for (int64_t t = 0; t < plan.chunks; ++t) {
      select_chunk(plan, p, t, c);
      const int64_t nk = c.n * p.K;
      Runtime::check(chunk_weights(p, c, stream));
      Runtime::gemm(op, false, true, p.B, nk, p.D, p.x, p.D, c.wc, p.D, 0.0, c.logits, c.ldu);  // u = x · Wcᵀ
      Runtime::check(chunk_grad(p, c, stream));
      // dx_acc [B, D] += Ĝ · Wc
      if (p.dx)
        Runtime::gemm(op, false, false, p.B, p.D, nk, c.grad, c.ldu, c.wc, p.D, t == 0 ? 0.0 : 1.0, c.dx_acc, p.D);
      if (need_dw) {
        // dw_acc [n·K, ldx] = Ĝᵀ · xs, over u's buffer (u is spent)
        Runtime::gemm(op, true, false, nk, c.ldx, p.B, c.grad, c.ldu, c.xs, c.ldx, 0.0, c.logits, c.ldx);
        Runtime::check(chunk_dw(p, c, stream));
      }
    }
    if (p.dx) {
      if (plan.chunks == 0) at::from_blob(c.dx_acc, {p.B, p.D}, a.x.options().dtype(a.acc_dtype())).zero_();
      Runtime::check(chunk_dx_finalize(p, c, stream));
    }
  });
}

}  // namespace marginops::cuda
