// The head optimizers' row ops on CUDA: row_step_ops.h's bodies with launch_row_step on the
// Runtime's stream (register_cuda.cpp; tests/cuda_emu runs the same code).
#pragma once

#include "../../row_step_ops.h"
#include "row_step_kernels.h"

namespace marginops::cuda {

template <typename Runtime>
struct RowStepRun {
  static void run(const row_step::Params& p, const at::Tensor& param) {
    [[maybe_unused]] const auto guard = Runtime::guard(param.device());
    Runtime::check(launch_row_step(p, Runtime::stream()));
  }
};

}  // namespace marginops::cuda
