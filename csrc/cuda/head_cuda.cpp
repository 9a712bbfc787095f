// The CUDA implementations of the ops: head_launch.h's bodies on the CUDA runtime of c10.
// Built only where torch has CUDA.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "head_launch.h"

namespace marginops::cuda {
namespace {

struct CudaRuntime {
  static bool capturing() {
    return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  }
  static cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
  static int sm_count() {
    int device = 0, count = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    return count;
  }
  static void check(cudaError_t err) { C10_CUDA_CHECK(err); }
  static c10::cuda::CUDAGuard guard(c10::Device device) { return c10::cuda::CUDAGuard(device); }
};

}  // namespace

TORCH_LIBRARY_IMPL(marginops, CUDA, m) {
  m.impl("margin_ce_forward", &forward_op<CudaRuntime>);
  m.impl("margin_ce_backward", &backward_op<CudaRuntime>);
  m.impl("margin_psi", &psi_op<CudaRuntime>);
  m.impl("margin_topk", &topk_op<CudaRuntime>);
}

}  // namespace marginops::cuda
