// The tile backend's op bodies: its workspace carved from one allocation, then tile_kernels.h's
// passes. Templated on launch.h's Runtime so that tests/cuda_emu runs the same code.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

#include "../launch.h"
#include "tile_kernels.h"

namespace marginops::cuda {

template <typename Runtime>
Launch prepare(const HeadArgs& a, bool backward) {
  Launch l = prepare_params<Runtime>(a);
  HeadParams& p = l.p;
  const Workspace w = workspace_bytes(p, Runtime::sm_count(), backward);
  p.splits = w.splits;
  WorkspaceCarver ws(w.rows + w.w_norm + w.partial + w.partial_best + w.dx_part + w.rsum_part + 6 * 255, a.x.options(),
                     l);
  p.rows = ws.take(w.rows);
  p.w_norm = ws.take(w.w_norm);
  p.partial = ws.take(w.partial);
  p.partial_best = static_cast<int64_t*>(ws.take(w.partial_best));
  p.dx_part = ws.take(w.dx_part);
  p.rsum_part = ws.take(w.rsum_part);
  return l;
}

template <typename Runtime>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_op(MO_HEAD_PARAMS,
                                                                                  double /*grad_skip*/) {
  const HeadArgs a = check_head_args(MO_HEAD_PARAM_NAMES);
  const auto guard = Runtime::guard(x.device());
  Launch l = prepare<Runtime>(a, false);
  const auto opts = x.options().dtype(a.acc_dtype());
  at::Tensor lse = at::empty({a.rows}, opts), zt = at::empty({a.rows}, opts), zsum = at::empty({a.rows}, opts);
  at::Tensor best = at::empty({a.rows}, opts), best_class = at::empty({a.rows}, opts.dtype(at::kLong));
  l.p.lse = lse.data_ptr();
  l.p.target_logit = zt.data_ptr();
  l.p.logit_sum = zsum.data_ptr();
  l.p.best_logit = best.data_ptr();
  l.p.best_class = best_class.data_ptr<int64_t>();
  Runtime::check(tiles_forward(l.p, Runtime::stream()));
  return {lse, zt, zsum, best, best_class};
}

template <typename Runtime>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_op(const std::optional<at::Tensor>& grad_lse,
                                                                       const std::optional<at::Tensor>& grad_target,
                                                                       const std::optional<at::Tensor>& grad_sum,
                                                                       const at::Tensor& lse, MO_HEAD_PARAMS,
                                                                       std::array<bool, 4> output_mask,
                                                                       double grad_skip) {
  const HeadArgs a = check_head_args(MO_HEAD_PARAM_NAMES);
  check_grad_skip(grad_skip);
  const auto guard = Runtime::guard(x.device());
  Launch l = prepare<Runtime>(a, true);
  l.p.grad_skip = grad_skip;
  return backward_with<Runtime>(grad_lse, grad_target, grad_sum, lse, a, output_mask, l,
                                [](Launch& launch) { Runtime::check(tiles_backward(launch.p, Runtime::stream())); });
}

}  // namespace marginops::cuda
