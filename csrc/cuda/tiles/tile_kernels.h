// The tile backend's entry points (tile_kernels.cu): one kernel per pass, a block of rows against
// tiles of classes, with the workspace sized from the shapes and the device's SM count. No torch
// headers; tile_launch.h binds tensors to them.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "../kernel_params.h"

namespace marginops::cuda {

// Bytes of each workspace the caller allocates: rows, w_norm, partial, partial_best, dx_part,
// rsum_part (in that order); splits is chosen from the device's SM count.
struct Workspace {
  int splits;
  size_t rows, w_norm, partial, partial_best, dx_part, rsum_part;
};
Workspace workspace_bytes(const HeadParams& p, int sm_count, bool backward);

cudaError_t tiles_forward(const HeadParams& p, cudaStream_t stream);
cudaError_t tiles_backward(const HeadParams& p, cudaStream_t stream);

}  // namespace marginops::cuda
