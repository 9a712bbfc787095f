// A CPU emulation of the CUDA features csrc/cuda (tiles/tile_kernels.cu, chunked/chunk_kernels.cu) uses, so that the
// kernel source itself runs in the test suite on machines without a GPU (tests/test_cuda_emulated.py).
//
// Each block runs as blockDim.x std::threads: __syncthreads is a std::barrier of the block,
// warp shuffles exchange through a per-warp buffer between two barriers of the warp, shared
// atomics are std::atomic_ref, and WMMA fragments hold the whole 16×16 tile in every lane (each
// lane computes it; lane 0 stores it). float16 and bfloat16 round to nearest even as the device
// does. What it cannot show: timing, occupancy, shared-memory limits, the exact order of
// tensor-core accumulation.
#pragma once

#include <math.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__
#define __launch_bounds__(...)

using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
using cudaStream_t = void*;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
template <class F>
inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) {
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() {
  return cudaSuccess;
}

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
// The vector types of 16- and 8-byte tile copies; may_alias, as the device lets them reinterpret
// any element type.
struct __attribute__((may_alias, aligned(16))) uint4 {
  unsigned x, y, z, w;
};
struct __attribute__((may_alias, aligned(8))) uint2 {
  unsigned x, y;
};

namespace fake_cuda {

struct Warp {
  std::barrier<> bar{32};
  alignas(8) unsigned char slot[32][8];
};

struct Block {
  Block(unsigned threads, size_t smem) : bar(threads), storage(smem + 128) {
    for (unsigned w = 0; w < (threads + 31) / 32; ++w) warps.push_back(std::make_unique<Warp>());
  }
  std::barrier<> bar;
  std::atomic<int> vote{0};  // __syncthreads_or
  std::vector<unsigned char> storage;
  std::vector<std::unique_ptr<Warp>> warps;
  unsigned char* smem() {
    auto p = reinterpret_cast<std::uintptr_t>(storage.data());
    return storage.data() + ((128 - p % 128) % 128);
  }
};

inline thread_local uint3 thread_idx{0, 0, 0}, block_idx{0, 0, 0};
inline thread_local dim3 block_dim, grid_dim;
inline thread_local Block* block = nullptr;

inline int64_t launches = 0;  // kernel launches so far (tests count them)

// Runs body on every thread of every block of the grid, one block at a time.
template <class F>
void launch(dim3 grid, dim3 threads, size_t smem, F&& body) {
  ++launches;
  const unsigned n = threads.x;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        Block b(n, smem);
        std::vector<std::thread> pool;
        pool.reserve(n);
        for (unsigned t = 0; t < n; ++t) {
          pool.emplace_back([&, t] {
            thread_idx = {t, 0, 0};
            block_idx = {x, y, z};
            block_dim = threads;
            grid_dim = grid;
            block = &b;
            body();
            b.warps[t / 32]->bar.arrive_and_drop();
            b.bar.arrive_and_drop();
          });
        }
        for (auto& th : pool) th.join();
      }
}

inline Warp& my_warp() {
  return *block->warps[thread_idx.x / 32];
}

}  // namespace fake_cuda

#define threadIdx fake_cuda::thread_idx
#define blockIdx fake_cuda::block_idx
#define blockDim fake_cuda::block_dim
#define gridDim fake_cuda::grid_dim
#define MO_DYNAMIC_SMEM(name) unsigned char* name = fake_cuda::block->smem()
#define MO_LAUNCH(kernel, grid, threads, smem, stream, ...) \
  fake_cuda::launch(dim3(grid), dim3(threads), (smem), [&] { kernel(__VA_ARGS__); })

inline void __syncthreads() {
  fake_cuda::block->bar.arrive_and_wait();
}
// Three barriers: earlier readers are done, the vote is reset, every vote is in.
inline int __syncthreads_or(int predicate) {
  fake_cuda::Block& b = *fake_cuda::block;
  b.bar.arrive_and_wait();
  if (threadIdx.x == 0) b.vote.store(0);
  b.bar.arrive_and_wait();
  if (predicate) b.vote.store(1);
  b.bar.arrive_and_wait();
  return b.vote.load();
}
inline void __syncwarp(unsigned = 0xffffffffu) {
  fake_cuda::my_warp().bar.arrive_and_wait();
}

template <class T>
T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
  fake_cuda::Warp& w = fake_cuda::my_warp();
  const unsigned lane = threadIdx.x % 32;
  std::memcpy(w.slot[lane], &v, sizeof(T));
  w.bar.arrive_and_wait();
  T out;
  std::memcpy(&out, w.slot[lane ^ static_cast<unsigned>(lane_mask)], sizeof(T));
  w.bar.arrive_and_wait();
  return out;
}

inline int atomicCAS(int* a, int compare, int value) {
  std::atomic_ref<int>(*a).compare_exchange_strong(compare, value);
  return compare;
}
inline void __threadfence_system() {
  std::atomic_thread_fence(std::memory_order_seq_cst);
}
inline float atomicAdd(float* a, float v) {
  return std::atomic_ref<float>(*a).fetch_add(v);
}
inline double atomicAdd(double* a, double v) {
  return std::atomic_ref<double>(*a).fetch_add(v);
}

inline float max(float a, float b) {
  return a < b ? b : a;
}
inline double max(double a, double b) {
  return a < b ? b : a;
}

// ---- cuda_fp16.h / cuda_bf16.h ----
struct __half {
  uint16_t bits;
};
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {
  const _Float16 f = static_cast<_Float16>(v);
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  if (std::isnan(v)) return {0x7fc0};
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return {static_cast<uint16_t>(u >> 16)};
}

// ---- mma.h ----
// Fragments hold the whole tile in every lane: matrix_a [16][K], matrix_b [K][16], accumulator
// [16][16]; K is 16 (half, bfloat16) or 8 (precision::tf32, loaded from float).
namespace nvcuda::wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int num_elements = 16 * 16;
  float x[16 * 16];
};

template <class T>
using mem_t = std::conditional_t<std::is_same_v<T, precision::tf32>, float, T>;

inline float as_float(float v) {
  return v;
}
inline float as_float(__half v) {
  return __half2float(v);
}
inline float as_float(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

// cvt.rna.tf32.f32: round to nearest, ties away from zero, to a 10-bit mantissa.
inline float __float_to_tf32(float v) {
  if (!std::isfinite(v)) return v;
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u = (u + 0x1000u) & 0xffffe000u;
  std::memcpy(&v, &u, 4);
  return v;
}

template <int K, class T, class L>
void load_matrix_sync(fragment<matrix_a, 16, 16, K, T, L>& f, const mem_t<T>* p, unsigned ldm) {
  __syncwarp();
  for (int m = 0; m < 16; ++m)
    for (int k = 0; k < K; ++k)
      f.x[m * K + k] = as_float(std::is_same_v<L, col_major> ? p[k * ldm + m] : p[m * ldm + k]);
  __syncwarp();
}
template <int K, class T, class L>
void load_matrix_sync(fragment<matrix_b, 16, 16, K, T, L>& f, const mem_t<T>* p, unsigned ldm) {
  __syncwarp();
  for (int k = 0; k < K; ++k)
    for (int n = 0; n < 16; ++n)
      f.x[k * 16 + n] = as_float(std::is_same_v<L, col_major> ? p[n * ldm + k] : p[k * ldm + n]);
  __syncwarp();
}
template <int K>
void load_matrix_sync(fragment<accumulator, 16, 16, K, float>& f, const float* p, unsigned ldm, layout_t l) {
  __syncwarp();
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) f.x[m * 16 + n] = l == mem_row_major ? p[m * ldm + n] : p[n * ldm + m];
  __syncwarp();
}
template <int K>
void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, K, float>& f, unsigned ldm, layout_t l) {
  __syncwarp();
  if (threadIdx.x % 32 == 0) {
    for (int m = 0; m < 16; ++m)
      for (int n = 0; n < 16; ++n) (l == mem_row_major ? p[m * ldm + n] : p[n * ldm + m]) = f.x[m * 16 + n];
  }
  __syncwarp();
}
template <int K>
void fill_fragment(fragment<accumulator, 16, 16, K, float>& f, float v) {
  for (float& e : f.x) e = v;
}
// Products of the (already rounded) inputs, accumulated in float.
template <int K, class T, class LA, class LB>
void mma_sync(fragment<accumulator, 16, 16, K, float>& d, const fragment<matrix_a, 16, 16, K, T, LA>& a,
              const fragment<matrix_b, 16, 16, K, T, LB>& b, const fragment<accumulator, 16, 16, K, float>& c) {
  float out[256];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float s = c.x[m * 16 + n];
      for (int k = 0; k < K; ++k) s += a.x[m * K + k] * b.x[k * 16 + n];
      out[m * 16 + n] = s;
    }
  std::memcpy(d.x, out, sizeof(out));
}
}  // namespace nvcuda::wmma
