// The CUDA implementations of the ops: dispatch.h's entry points (the tile and chunked backends' bodies) on the CUDA
// runtime of c10, with ATen's cuBLAS-backed mm for the chunked backend's products. Built only
// where torch has CUDA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <cstring>
#include <mutex>

#include "dispatch.h"
#include "optim/row_step_launch.h"

namespace marginops::cuda {
namespace {

constexpr int kMaxDevices = 64;

// Per device, a DeviceError in mapped host memory (allocated at the device's first op outside a
// graph capture; none yet inside one: then the capture runs without device checks).
DeviceError* device_error_record(bool allocate) {
  static std::array<DeviceError*, kMaxDevices> records{};
  static std::mutex mutex;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  TORCH_CHECK(device < kMaxDevices, "marginops: device ", device, " beyond the ", kMaxDevices, " it supports");
  std::lock_guard<std::mutex> lock(mutex);
  if (records[device] == nullptr && allocate) {
    void* host = nullptr;
    C10_CUDA_CHECK(cudaHostAlloc(&host, sizeof(DeviceError), cudaHostAllocMapped | cudaHostAllocPortable));
    std::memset(host, 0, sizeof(DeviceError));
    void* dev = nullptr;
    C10_CUDA_CHECK(cudaHostGetDevicePointer(&dev, host, 0));
    TORCH_CHECK(dev == host, "marginops: mapped host memory needs unified addressing");
    records[device] = static_cast<DeviceError*>(host);
  }
  return records[device];
}

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
  static DeviceError* error_record() {
    return device_error_record(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None);
  }
  // The only device-to-host copies of a call (sync_checks() on; topk's class_index).
  static at::Tensor to_host(const at::Tensor& t) { return t.cpu(); }
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

// check_errors(): after the current device finishes its work, what its kernels recorded.
void check_device_errors() {
  if (DeviceError* e = device_error_record(false)) {
    C10_CUDA_CHECK(cudaDeviceSynchronize());
    raise_recorded_error(e);
  }
}

const bool registered = (add_error_checker(&check_device_errors), true);

}  // namespace

TORCH_LIBRARY_IMPL(marginops, CUDA, m) {
  m.impl("margin_ce_forward", &forward_any<CudaRuntime>);
  m.impl("margin_ce_backward", &backward_any<CudaRuntime>);
  m.impl("margin_psi", &psi_op<CudaRuntime>);
  m.impl("margin_topk", &topk_op<CudaRuntime>);
  m.impl("sgd_step_", &row_step::sgd_step<RowStepRun<CudaRuntime>>);
  m.impl("adamw_step_", &row_step::adamw_step<RowStepRun<CudaRuntime>>);
  m.impl("sgd_catch_up_", &row_step::sgd_catch_up<RowStepRun<CudaRuntime>>);
}

}  // namespace marginops::cuda
