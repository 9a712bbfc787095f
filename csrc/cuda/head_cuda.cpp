// The CUDA implementations of the ops: chunked_launch.h's and head_launch.h's bodies on the CUDA
// runtime of c10, with ATen's cuBLAS-backed mm for the chunked backend's products. Built only
// where torch has CUDA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "chunked_launch.h"

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
  // gemm_views' C = op(A) · op(B) + beta · C (beta 0 or 1) by ATen's mm/addmm, which run cuBLAS
  // on torch's handle and current stream: 16-bit operands accumulate and write float32
  // (mm.dtype_out); float32 runs as TF32 only when torch allows it.
  static void gemm(DType op, bool ta, bool tb, int64_t M, int64_t N, int64_t K, const void* A, int64_t lda,
                   const void* B, int64_t ldb, double beta, void* C, int64_t ldc) {
    if (M == 0 || N == 0) return;
    const auto opts = at::TensorOptions().device(at::kCUDA, c10::cuda::current_device());
    auto [a, b, c] = gemm_views(opts, op, ta, tb, M, N, K, A, lda, B, ldb, C, ldc);
    if (a.scalar_type() == c.scalar_type()) {
      beta == 0.0 ? at::mm_out(c, a, b) : at::addmm_out(c, c, a, b);
    } else {
      beta == 0.0 ? at::mm_out(c, a, b, c.scalar_type()) : at::addmm_out(c, c, a, b, c.scalar_type());
    }
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(marginops, CUDA, m) {
  m.impl("margin_ce_forward", &forward_any<CudaRuntime>);
  m.impl("margin_ce_backward", &backward_any<CudaRuntime>);
  m.impl("margin_psi", &psi_op<CudaRuntime>);
  m.impl("margin_topk", &topk_op<CudaRuntime>);
}

}  // namespace marginops::cuda
