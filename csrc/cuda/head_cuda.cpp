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
  // Row-major C [M, N] (ldc = N) = op(A) · op(B) + beta · C (beta 0 or 1), op(A) = ta ? Aᵀ : A
  // (A stored [K, M] or [M, K]), likewise B: ATen's mm/addmm into C, which run cuBLAS through
  // torch's handle on the current stream (transposes as strides, no copies). 16-bit operands
  // accumulate and write float32 (mm.dtype_out); float32 runs as TF32 only when torch allows it.
  static void gemm(DType op, bool ta, bool tb, int64_t M, int64_t N, int64_t K, const void* A, int64_t lda,
                   const void* B, int64_t ldb, double beta, void* C, int64_t ldc) {
    if (M == 0 || N == 0) return;
    const at::ScalarType st = op == kHalf ? at::kHalf : op == kBFloat16 ? at::kBFloat16 : op == kFloat ? at::kFloat : at::kDouble;
    const at::ScalarType acc = st == at::kDouble ? at::kDouble : at::kFloat;
    const auto opts = at::TensorOptions().device(at::kCUDA, c10::cuda::current_device());
    const auto operand = [&](const void* p, int64_t rows, int64_t cols, int64_t ld, bool t) {
      at::Tensor s = at::from_blob(const_cast<void*>(p), {t ? cols : rows, t ? rows : cols}, {ld, 1}, opts.dtype(st));
      return t ? s.t() : s;
    };
    const at::Tensor a = operand(A, M, K, lda, ta), b = operand(B, K, N, ldb, tb);
    at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts.dtype(acc));
    if (st == acc) {
      beta == 0.0 ? at::mm_out(c, a, b) : at::addmm_out(c, c, a, b);
    } else {
      beta == 0.0 ? at::mm_out(c, a, b, acc) : at::addmm_out(c, c, a, b, acc);
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
