// The head optimizers' step kernel (row_step_kernels.h).
#include <algorithm>

#include "row_step_kernels.h"

#ifndef MO_LAUNCH
#define MO_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif

namespace marginops::cuda {
namespace {

constexpr int kRowThreads = 256;

// Strided loops not unrolled: their trip counts would cost a 64-bit division (and registers).
template <row_step::Kind K, typename A, typename W, typename S>
__global__ void __launch_bounds__(kRowThreads) row_step_kernel(row_step::Params p) {
  const row_step::Hyper<A> h = row_step::hyper<A>(p);
  if (p.D == 1) {
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
#pragma unroll 1
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n; i += stride)
      row_step::step_element<K, A, W, S>(p, h, i, row_step::row_of<K, A>(p, i), 0);
    return;
  }
  const int D = static_cast<int>(p.D);  // < 2^31: the launcher checks
#pragma unroll 1
  for (int64_t i = blockIdx.x; i < p.n; i += gridDim.x) {
    const auto row = row_step::row_of<K, A>(p, i);
#pragma unroll 1
    for (int d = threadIdx.x; d < D; d += blockDim.x) row_step::step_element<K, A, W, S>(p, h, i, row, d);
  }
}

}  // namespace

cudaError_t launch_row_step(const row_step::Params& p, cudaStream_t stream) {
  if (p.n == 0 || p.D == 0) return cudaSuccess;
  if (p.D > (int64_t(1) << 30)) return cudaErrorInvalidValue;
  const int threads = p.D == 1 ? kRowThreads : static_cast<int>(std::min<int64_t>(kRowThreads, (p.D + 31) / 32 * 32));
  const int64_t blocks = p.D == 1 ? (p.n + threads - 1) / threads : p.n;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(blocks, int64_t(1) << 20));
  const bool known = row_step::dispatch(p, [&](auto kind, auto a, auto w, auto s) {
    MO_LAUNCH((row_step_kernel<decltype(kind)::value, decltype(a), decltype(w), decltype(s)>), grid, threads, 0, stream,
              p);
  });
  return known ? cudaGetLastError() : cudaErrorInvalidValue;
}

}  // namespace marginops::cuda
