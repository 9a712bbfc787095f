// csrc/cuda's kernels and launchers (both backends), built for the CPU emulation in fake_cuda.h:
// the test suite runs the CUDA source itself. Torch headers come first: fake_cuda.h defines
// CUDA's keywords as macros.
#include <torch/extension.h>

#include "cuda_runtime.h"  // tests/cuda_emu/include/fake_cuda.h
#include "../../csrc/cuda/tiles/tile_kernels.cu"
#include "../../csrc/cuda/chunked/chunk_kernels.cu"
#include "../../csrc/cuda/dispatch.h"
#include "../../csrc/cuda/optim/row_step_kernels.cu"
#include "../../csrc/cuda/optim/row_step_launch.h"

namespace {

int g_sm_count = 4;
int64_t g_gemms = 0;
int64_t g_host_copies = 0;
marginops::cuda::DeviceError g_error{};

// cvt.rna.tf32.f32 on a float tensor: round to nearest (ties away) to a 10-bit mantissa.
at::Tensor round_tf32(const at::Tensor& t) {
  return t.contiguous().view(at::kInt).add(0x1000).bitwise_and(static_cast<int32_t>(0xffffe000u)).view(at::kFloat);
}

struct EmuRuntime {
  static bool capturing() { return false; }
  static cudaStream_t stream() { return nullptr; }
  static int sm_count() { return g_sm_count; }
  static void check(cudaError_t err) { TORCH_CHECK(err == cudaSuccess, "emulated kernel launch failed: ", err); }
  static int guard(c10::Device) { return 0; }
  static marginops::cuda::DeviceError* error_record() { return &g_error; }
  // A device-to-host copy (a synchronization on a GPU), counted.
  static at::Tensor to_host(const at::Tensor& t) {
    ++g_host_copies;
    return t.cpu();
  }
  // cuBLAS's contract (CudaRuntime::gemm in register_cuda.cpp) on ATen's CPU mm: exact products of
  // the operands, accumulated in float32 (float64 for float64), TF32 operands when torch allows.
  static void gemm(marginops::cuda::DType op, bool ta, bool tb, int64_t M, int64_t N, int64_t K, const void* A,
                   int64_t lda, const void* B, int64_t ldb, double beta, void* C, int64_t ldc) {
    ++g_gemms;
    if (M == 0 || N == 0) return;
    auto [a, b, c] = marginops::cuda::gemm_views(at::TensorOptions(), op, ta, tb, M, N, K, A, lda, B, ldb, C, ldc);
    const bool tf32 = a.scalar_type() == at::kFloat && at::globalContext().allowTF32CuBLAS();
    const auto widen = [&](const at::Tensor& t) { return tf32 ? round_tf32(t) : t.to(c.scalar_type()); };
    const at::Tensor prod = at::mm(widen(a), widen(b));
    if (beta == 0.0) {
      c.copy_(prod);
    } else {
      c.mul_(beta).add_(prod);
    }
  }
};

pybind11::dict plan_dict(const marginops::cuda::ChunkPlan& p) {
  pybind11::dict d;
  d["classes"] = p.classes;
  d["chunks"] = p.chunks;
  d["segments"] = p.segments;
  d["ldx"] = p.ldx;
  d["copy_w"] = p.copy_w;
  d["prescale_w"] = p.prescale_w;
  d["total"] = p.total;
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace marginops::cuda;
  m.def("forward", &forward_op<EmuRuntime>);
  m.def("backward", &backward_op<EmuRuntime>);
  m.def("forward_any", &forward_any<EmuRuntime>, "margin_ce_forward's CUDA entry point (backend, workspace_bytes)");
  m.def("backward_any", &backward_any<EmuRuntime>, "margin_ce_backward's CUDA entry point");
  m.def("psi", &psi_op<EmuRuntime>);
  m.def("topk", &topk_op<EmuRuntime>);
  using RowRun = marginops::cuda::RowStepRun<EmuRuntime>;
  m.def("sgd_step_", &marginops::row_step::sgd_step<RowRun>, "the sgd_step_ op's CUDA kernel");
  m.def("adamw_step_", &marginops::row_step::adamw_step<RowRun>, "the adamw_step_ op's CUDA kernel");
  m.def("sgd_catch_up_", &marginops::row_step::sgd_catch_up<RowRun>, "the sgd_catch_up_ op's CUDA kernel");
  m.def(
      "check_errors", [] { marginops::cuda::raise_recorded_error(&g_error); },
      "raises what the emulated kernels recorded (marginops.check_errors on CUDA)");
  m.def("set_sync_checks", [](bool on) { marginops::set_sync_checks(on); }, "host checks before each launch");
  m.def("host_copies", [] { return g_host_copies; }, "device-to-host copies by the launchers so far");
  m.def("set_sm_count", [](int n) { g_sm_count = n; }, "SMs the workspace sizing assumes (it sets the class splits)");
  m.def("last_plan", [] { return plan_dict(last_chunk_plan()); }, "the chunk plan of the last chunked op");
  m.def("launches", [] { return fake_cuda::launches + g_gemms; }, "kernel launches and GEMMs so far");
  m.def(
      "plan",
      [](int64_t B, int64_t D, int64_t C, int64_t K, at::ScalarType x, at::ScalarType w, bool normalize_w,
         bool class_index, bool backward, bool need_db, int64_t budget, bool need_dx, bool need_dw) {
        HeadParams p;
        p.B = B;
        p.D = D;
        p.C = C;
        p.K = K;
        p.x_dtype = dtype_of(x);
        p.w_dtype = dtype_of(w);
        p.acc_double = x == at::kDouble && w == at::kDouble;
        p.cfg.normalize_w = normalize_w;
        static const int64_t dummy = 0;
        p.class_index = class_index ? &dummy : nullptr;
        p.dx = need_dx ? reinterpret_cast<void*>(1) : nullptr;  // only tested for null
        p.dw = need_dw ? reinterpret_cast<void*>(1) : nullptr;
        const ChunkPlan plan = plan_chunks(p, backward, need_db, marginops::workspace_budget(budget));
        pybind11::dict d = plan_dict(plan);
        d["launches"] = chunk_launches(plan, p, backward);
        return d;
      },
      "the chunk plan (and its launch count) for shapes and dtypes, without running");
}
