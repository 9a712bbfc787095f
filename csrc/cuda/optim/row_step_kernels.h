// The head optimizers' step on CUDA (row_step.h): one kernel per call updates the rows and their
// state from a chunk's gradient (or catches them up). No torch headers: CI compile-checks it
// with nvcc alone.
#pragma once

#include <cuda_runtime.h>

#include "../../row_step.h"

namespace marginops::cuda {

// Launches the step of p on stream: one block per row (threads along D), or one thread per row
// when D is 1 (a bias). cudaErrorInvalidValue for a pair of types row_step::dispatch lacks.
cudaError_t launch_row_step(const row_step::Params& p, cudaStream_t stream);

}  // namespace marginops::cuda
