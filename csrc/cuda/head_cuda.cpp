// The CUDA implementations of the ops: chunked_launch.h's and head_launch.h's bodies on the CUDA
// runtime of c10, with cuBLAS through torch's handle and current stream. Built only where torch
// has CUDA.
#include <ATen/cuda/CUDABlas.h>
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
  // Row-major C [M, N] (ldc) = op(A) · op(B) + beta · C, op(A) = ta ? Aᵀ : A (A stored [K, M] or
  // [M, K]), likewise B; 16-bit operands accumulate and write float32, float32 and float64 their
  // own dtype (float32 as TF32 when torch allows it: at::cuda::blas reads the same switch).
  // Column-major cuBLAS computes Cᵀ = op(B)ᵀ · op(A)ᵀ.
  static void gemm(DType op, bool ta, bool tb, int64_t M, int64_t N, int64_t K, const void* A, int64_t lda,
                   const void* B, int64_t ldb, double beta, void* C, int64_t ldc) {
    if (M == 0 || N == 0) return;
    const char ca = tb ? 't' : 'n', cb = ta ? 't' : 'n';
    namespace blas = at::cuda::blas;
    switch (op) {
      case kHalf:
        blas::gemm<at::Half, float>(ca, cb, N, M, K, 1.0f, static_cast<const at::Half*>(B), ldb,
                                    static_cast<const at::Half*>(A), lda, static_cast<float>(beta),
                                    static_cast<float*>(C), ldc);
        break;
      case kBFloat16:
        blas::gemm<at::BFloat16, float>(ca, cb, N, M, K, 1.0f, static_cast<const at::BFloat16*>(B), ldb,
                                        static_cast<const at::BFloat16*>(A), lda, static_cast<float>(beta),
                                        static_cast<float*>(C), ldc);
        break;
      case kFloat:
        blas::gemm<float>(ca, cb, N, M, K, 1.0f, static_cast<const float*>(B), ldb, static_cast<const float*>(A), lda,
                          static_cast<float>(beta), static_cast<float*>(C), ldc);
        break;
      case kDouble:
        blas::gemm<double>(ca, cb, N, M, K, 1.0, static_cast<const double*>(B), ldb, static_cast<const double*>(A),
                           lda, beta, static_cast<double*>(C), ldc);
        break;
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
