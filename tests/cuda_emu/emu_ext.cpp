// csrc/cuda's kernels and launcher, built for the CPU emulation in fake_cuda.h: the test suite
// runs the CUDA source itself against the CPU op. Torch headers come first: fake_cuda.h defines
// CUDA's keywords as macros.
#include <torch/extension.h>

#include "cuda_runtime.h"  // tests/cuda_emu/include/fake_cuda.h
#include "../../csrc/cuda/head_kernels.cu"
#include "../../csrc/cuda/head_launch.h"

namespace {

int g_sm_count = 4;

struct EmuRuntime {
  static bool capturing() { return false; }
  static cudaStream_t stream() { return nullptr; }
  static int sm_count() { return g_sm_count; }
  static void check(cudaError_t err) { TORCH_CHECK(err == cudaSuccess, "emulated kernel launch failed: ", err); }
  static int guard(c10::Device) { return 0; }
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &marginops::cuda::forward_op<EmuRuntime>);
  m.def("backward", &marginops::cuda::backward_op<EmuRuntime>);
  m.def("psi", &marginops::cuda::psi_op<EmuRuntime>);
  m.def("topk", &marginops::cuda::topk_op<EmuRuntime>);
  m.def("set_sm_count", [](int n) { g_sm_count = n; }, "SMs the workspace sizing assumes (it sets the class splits)");
}
