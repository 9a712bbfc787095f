// The ops' CUDA entry points: check backend and workspace_bytes, pick the backend a call runs
// (tiles/ or chunked/) and run its body. Templated on a Runtime (launch.h, chunked_launch.h) so
// that tests/cuda_emu runs the same code.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

#include "chunked/chunked_launch.h"
#include "tiles/tile_launch.h"

namespace marginops::cuda {

// The backend a call runs. The chunked backend's G carries CurricularFace's factor t + 2c on hard
// negatives, which the bias's gradient (taken from the same G) must not see: with both, "auto"
// runs the tile backend and "chunked" is refused.
inline int64_t chunk_backend(int64_t backend, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& curricular) {
  const bool both = bias.has_value() && bias->defined() && curricular.has_value() && curricular->defined();
  if (!both || backend == kTiles) return backend;
  TORCH_CHECK_VALUE(backend == kAuto, "backend='chunked' does not support a bias together with CurricularFace's ",
                    "hard negatives (curricular); use backend='auto' or 'tiles'");
  return kTiles;
}

template <typename Runtime>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_any(MO_HEAD_PARAMS, double grad_skip,
                                                                                   int64_t backend,
                                                                                   int64_t workspace_bytes) {
  check_backend(backend, workspace_bytes);
  const size_t budget = workspace_budget(workspace_bytes);
  if (chunk_backend(backend, bias, curricular) == kTiles) return forward_op<Runtime>(MO_HEAD_PARAM_NAMES, grad_skip);
  return chunked_forward_op<Runtime>(check_head_args(MO_HEAD_PARAM_NAMES), budget);
}

// grad_skip reaches the tile backend only: the chunked one's products are cuBLAS GEMMs over
// whole chunks, where a skipped tile saves nothing, so it computes every gradient (exact).
template <typename Runtime>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_any(
    const std::optional<at::Tensor>& grad_lse, const std::optional<at::Tensor>& grad_target,
    const std::optional<at::Tensor>& grad_sum, const at::Tensor& lse, MO_HEAD_PARAMS, std::array<bool, 4> output_mask,
    double grad_skip, int64_t backend, int64_t workspace_bytes) {
  check_backend(backend, workspace_bytes);
  const size_t budget = workspace_budget(workspace_bytes);
  if (chunk_backend(backend, bias, curricular) == kTiles) {
    return backward_op<Runtime>(grad_lse, grad_target, grad_sum, lse, MO_HEAD_PARAM_NAMES, output_mask, grad_skip);
  }
  check_grad_skip(grad_skip);
  return chunked_backward_op<Runtime>(grad_lse, grad_target, grad_sum, lse, check_head_args(MO_HEAD_PARAM_NAMES),
                                      output_mask, budget);
}

}  // namespace marginops::cuda
