// Device helpers shared by the head kernels: dtype conversions (explicit: torch builds with
// __CUDA_NO_HALF_CONVERSIONS__), block reductions, and one shared-memory tile product
//   C[M][N] += A(m, k) · B(k, n),  k < KK
// used for all three of the head's products (logits X·Wᵀ, dx += G·W, dW += Gᵀ·X). 16-bit operands
// run on tensor cores through WMMA (fp32 accumulate); tf32_t operands (float32 inputs while torch
// allows TF32) on tensor cores as TF32; float/double operands on CUDA cores, exactly.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

// Kernel launches and dynamic shared memory go through these macros so that the kernels also
// build on the host under tests/cuda_emu (a CPU emulation of the features they use).
#ifndef MO_LAUNCH
#define MO_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif
#ifndef MO_DYNAMIC_SMEM
#define MO_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif

namespace marginops::cuda {

// A float32 operand that the tensor cores may round to TF32 (10-bit mantissa). Shared tiles hold
// the full float; fragments round it on load, as cuBLAS does when TF32 is allowed.
struct tf32_t {
  float v;
};

template <typename T>
struct Convert;
template <>
struct Convert<tf32_t> {
  __device__ __forceinline__ static float to_float(tf32_t v) { return v.v; }
  __device__ __forceinline__ static tf32_t from_float(float v) { return tf32_t{v}; }
};
template <>
struct Convert<__half> {
  __device__ __forceinline__ static float to_float(__half v) { return __half2float(v); }
  __device__ __forceinline__ static __half from_float(float v) { return __float2half_rn(v); }
};
template <>
struct Convert<__nv_bfloat16> {
  __device__ __forceinline__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Convert<float> {
  __device__ __forceinline__ static float to_float(float v) { return v; }
  __device__ __forceinline__ static float from_float(float v) { return v; }
};
template <>
struct Convert<double> {
  __device__ __forceinline__ static float to_float(double v) { return static_cast<float>(v); }
  __device__ __forceinline__ static double from_float(float v) { return v; }
};

// Any supported value to the operand or accumulator type.
template <typename To, typename From>
__device__ __forceinline__ To convert(From v) {
  if constexpr (std::is_same_v<To, From>) {
    return v;
  } else if constexpr (std::is_same_v<To, double>) {
    return static_cast<double>(Convert<From>::to_float(v));
  } else if constexpr (std::is_same_v<From, double>) {
    return Convert<To>::from_float(static_cast<float>(v));
  } else {
    return Convert<To>::from_float(Convert<From>::to_float(v));
  }
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

template <typename OP>
constexpr bool kTensorCore =
    std::is_same_v<OP, __half> || std::is_same_v<OP, __nv_bfloat16> || std::is_same_v<OP, tf32_t>;

// Row padding of shared tiles, in elements: keeps WMMA's 32-byte alignment for 16-bit and float
// tiles and breaks bank conflicts.
template <typename T>
constexpr int kPad = sizeof(T) == 2 ? 8 : (sizeof(T) == 4 ? 4 : 2);

// WMMA fragment loads and stores on shared tiles. nvcuda::wmma keeps the shared state space for
// float16 operands and m16n16k16 accumulators, but moves bfloat16 and TF32 fragments (and the
// m16n16k8 accumulators of TF32) through generic addresses: LD.E / ST.E in SASS. On the device
// these issue the same wmma instructions (same fragment layout) with .shared and a 32-bit shared
// address; elsewhere (tests/cuda_emu) they are nvcuda::wmma's.
#if defined(__CUDA_ARCH__)
#define MO_WMMA_LD4(KIND, LAYOUT, SHAPE, TYPE, frag, addr, ld)                                                      \
  do {                                                                                                              \
    unsigned* r_ = reinterpret_cast<unsigned*>((frag).x);                                                           \
    asm volatile("wmma.load." KIND ".sync.aligned." LAYOUT "." SHAPE ".shared." TYPE " {%0, %1, %2, %3}, [%4], %5;" \
                 : "=r"(r_[0]), "=r"(r_[1]), "=r"(r_[2]), "=r"(r_[3])                                               \
                 : "r"(addr), "r"(ld)                                                                               \
                 : "memory");                                                                                       \
  } while (0)
#endif

// Operand fragment (kA: matrix_a, else matrix_b; COL: col_major) from a shared tile.
template <bool kA, bool COL, typename Frag, typename Mem>
__device__ __forceinline__ void load_operand(Frag& f, const Mem* p, unsigned ld) {
#if defined(__CUDA_ARCH__)
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
  if constexpr (std::is_same_v<Mem, __nv_bfloat16>) {
    if constexpr (kA) {
      if constexpr (COL)
        MO_WMMA_LD4("a", "col", "m16n16k16", "bf16", f, a, ld);
      else
        MO_WMMA_LD4("a", "row", "m16n16k16", "bf16", f, a, ld);
    } else {
      if constexpr (COL)
        MO_WMMA_LD4("b", "col", "m16n16k16", "bf16", f, a, ld);
      else
        MO_WMMA_LD4("b", "row", "m16n16k16", "bf16", f, a, ld);
    }
    return;
  } else if constexpr (std::is_same_v<Mem, float>) {  // TF32
    if constexpr (kA) {
      if constexpr (COL)
        MO_WMMA_LD4("a", "col", "m16n16k8", "tf32", f, a, ld);
      else
        MO_WMMA_LD4("a", "row", "m16n16k8", "tf32", f, a, ld);
    } else {
      if constexpr (COL)
        MO_WMMA_LD4("b", "col", "m16n16k8", "tf32", f, a, ld);
      else
        MO_WMMA_LD4("b", "row", "m16n16k8", "tf32", f, a, ld);
    }
    return;
  }
#endif
  nvcuda::wmma::load_matrix_sync(f, p, ld);
}

// Accumulator fragment from / to a row-major shared float tile.
template <int MK, typename Frag>
__device__ __forceinline__ void load_accumulator(Frag& f, const float* p, unsigned ld) {
#if defined(__CUDA_ARCH__)
  if constexpr (MK == 8) {
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
    asm volatile("wmma.load.c.sync.aligned.row.m16n16k8.shared.f32 {%0, %1, %2, %3, %4, %5, %6, %7}, [%8], %9;"
                 : "=f"(f.x[0]), "=f"(f.x[1]), "=f"(f.x[2]), "=f"(f.x[3]), "=f"(f.x[4]), "=f"(f.x[5]), "=f"(f.x[6]),
                   "=f"(f.x[7])
                 : "r"(a), "r"(ld)
                 : "memory");
    return;
  }
#endif
  nvcuda::wmma::load_matrix_sync(f, p, ld, nvcuda::wmma::mem_row_major);
}
template <int MK, typename Frag>
__device__ __forceinline__ void store_accumulator(float* p, const Frag& f, unsigned ld) {
#if defined(__CUDA_ARCH__)
  if constexpr (MK == 8) {
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
    asm volatile("wmma.store.d.sync.aligned.row.m16n16k8.shared.f32 [%0], {%1, %2, %3, %4, %5, %6, %7, %8}, %9;"
                 :
                 : "r"(a), "f"(f.x[0]), "f"(f.x[1]), "f"(f.x[2]), "f"(f.x[3]), "f"(f.x[4]), "f"(f.x[5]), "f"(f.x[6]),
                   "f"(f.x[7]), "r"(ld)
                 : "memory");
    return;
  }
#endif
  nvcuda::wmma::store_matrix_sync(p, f, ld, nvcuda::wmma::mem_row_major);
}

// C[M][N] (ACC, row-major, ldc) += Σ_k A(m, k) B(k, n), k < KK, with
//   A(m, k) = A_COL ? A[k·lda + m] : A[m·lda + k],  B(k, n) = B_COL ? B[n·ldb + k] : B[k·ldb + n].
// Every thread of the block calls it; it does not synchronize (callers fence before and after).
// M, N, KK are multiples of 16 on the tensor-core path.
template <int M, int N, int KK, typename OP, typename ACC, bool A_COL, bool B_COL>
__device__ __forceinline__ void tile_mma(const OP* A, int lda, const OP* B, int ldb, ACC* C, int ldc) {
  if constexpr (kTensorCore<OP>) {
    static_assert(std::is_same_v<ACC, float>, "tensor cores accumulate in float");
    using namespace nvcuda;
    constexpr bool kTf32 = std::is_same_v<OP, tf32_t>;
    constexpr int MK = kTf32 ? 8 : 16;  // depth of one WMMA step: m16n16k8 for TF32, m16n16k16 for 16-bit
    using Frag = std::conditional_t<kTf32, wmma::precision::tf32, OP>;  // fragment element type
    using Mem = std::conditional_t<kTf32, float, OP>;                   // what a fragment loads from
    static_assert(M % 16 == 0 && N % 16 == 0 && KK % MK == 0, "tile sizes must be multiples of the WMMA shape");
    using LA = std::conditional_t<A_COL, wmma::col_major, wmma::row_major>;
    using LB = std::conditional_t<B_COL, wmma::col_major, wmma::row_major>;
    const Mem* a_mem = reinterpret_cast<const Mem*>(A);
    const Mem* b_mem = reinterpret_cast<const Mem*>(B);
    const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
    for (int f = warp; f < (M / 16) * (N / 16); f += warps) {
      const int mi = f / (N / 16), ni = f % (N / 16);
      wmma::fragment<wmma::accumulator, 16, 16, MK, float> c;
      float* cp = C + (mi * 16) * ldc + ni * 16;
      load_accumulator<MK>(c, cp, ldc);
      for (int kk = 0; kk < KK / MK; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, MK, Frag, LA> a;
        wmma::fragment<wmma::matrix_b, 16, 16, MK, Frag, LB> b;
        load_operand<true, A_COL>(a, A_COL ? a_mem + (kk * MK) * lda + mi * 16 : a_mem + (mi * 16) * lda + kk * MK,
                                  lda);
        load_operand<false, B_COL>(b, B_COL ? b_mem + (ni * 16) * ldb + kk * MK : b_mem + (kk * MK) * ldb + ni * 16,
                                   ldb);
        if constexpr (kTf32) {
          for (int t = 0; t < a.num_elements; ++t) a.x[t] = wmma::__float_to_tf32(a.x[t]);
          for (int t = 0; t < b.num_elements; ++t) b.x[t] = wmma::__float_to_tf32(b.x[t]);
        }
        wmma::mma_sync(c, a, b, c);
      }
      store_accumulator<MK>(cp, c, ldc);
    }
  } else {
    for (int e = threadIdx.x; e < M * N; e += blockDim.x) {
      const int m = e / N, n = e % N;
      ACC s = 0;
#pragma unroll 8
      for (int k = 0; k < KK; ++k) {
        const ACC a = static_cast<ACC>(A_COL ? A[k * lda + m] : A[m * lda + k]);
        const ACC b = static_cast<ACC>(B_COL ? B[n * ldb + k] : B[k * ldb + n]);
        s += a * b;
      }
      C[m * ldc + n] += s;
    }
  }
}

// The vector types of vectorized tile copies: N bytes as one load or store (LDG.E.128, STS.64...).
template <int N>
struct VecBytes;
template <>
struct VecBytes<16> {
  using type = uint4;
};
template <>
struct VecBytes<8> {
  using type = uint2;
};

// Copies rows [row0, row0 + rows) × columns [col0, col0 + cols) of a row-major global matrix
// (ld elements per row) into a shared tile (ld_s), converting; out-of-range rows and columns
// become zero, so partial tiles add nothing. row_of maps a tile row to a global row (or -1); it is
// called once per 16-byte group, so callers pass a cheap one (a lookup in a per-tile array).
// Where the global rows are 16-byte aligned (ld and col0 multiples of the vector, src aligned),
// each thread moves 16 bytes per trip (8 16-bit, 4 float or 2 double elements) and converts them
// in registers; groups that cross col_end, and unaligned matrices, take the element path.
template <typename TS, typename TG, typename RowOf>
__device__ __forceinline__ void load_tile(TS* dst, int ld_s, int rows, int cols, const TG* src, int64_t ld,
                                          int64_t col0, int64_t col_end, RowOf row_of) {
  constexpr int V = 16 / sizeof(TG);  // elements per 16-byte global load
  using LoadV = typename VecBytes<16>::type;
  using StoreV = typename VecBytes<V * sizeof(TS)>::type;
  const bool vec = ld % V == 0 && col0 % V == 0 && cols % V == 0 && (ld_s * sizeof(TS)) % sizeof(StoreV) == 0 &&
                   reinterpret_cast<std::uintptr_t>(src) % sizeof(LoadV) == 0;
  if (vec) {
    const int vcols = cols / V;
    for (int e = threadIdx.x; e < rows * vcols; e += blockDim.x) {
      const int r = e / vcols, c = (e % vcols) * V;
      const int64_t g = row_of(r);
      const int64_t gc = col0 + c;
      TS out[V];
      if (g >= 0 && gc + V <= col_end) {
        const LoadV raw = *reinterpret_cast<const LoadV*>(src + g * ld + gc);
        TG in[V];
        memcpy(in, &raw, sizeof(raw));
#pragma unroll
        for (int t = 0; t < V; ++t) out[t] = convert<TS>(in[t]);
      } else {
#pragma unroll
        for (int t = 0; t < V; ++t)
          out[t] = (g >= 0 && gc + t < col_end) ? convert<TS>(src[g * ld + gc + t]) : convert<TS>(0.0f);
      }
      StoreV packed;
      memcpy(&packed, out, sizeof(packed));
      *reinterpret_cast<StoreV*>(dst + r * ld_s + c) = packed;
    }
    return;
  }
  for (int e = threadIdx.x; e < rows * cols; e += blockDim.x) {
    const int r = e / cols, c = e % cols;
    const int64_t g = row_of(r);
    const int64_t gc = col0 + c;
    dst[r * ld_s + c] = (g >= 0 && gc < col_end) ? convert<TS>(src[g * ld + gc]) : convert<TS>(0.0f);
  }
}

// Carves 128-byte-aligned arrays out of dynamic shared memory. With a null base it only counts:
// the host sizes a launch with the same code the kernel carves with. The base stays a pointer into
// the __shared__ array (no round trip through an integer), so the compiler keeps the shared address
// space through the carved pointers: LDS/STS/ATOMS rather than generic LD/ST/ATOM.
struct SmemCarver {
  unsigned char* base;
  size_t offset = 0;
  template <typename T>
  __host__ __device__ T* take(size_t count) {
    offset = (offset + 127) / 128 * 128;
#if defined(__CUDA_ARCH__)
    T* p = reinterpret_cast<T*>(base + offset);  // no null test: a select with null loses the address space
#else
    T* p = base ? reinterpret_cast<T*>(base + offset) : nullptr;
#endif
    offset += count * sizeof(T);
    return p;
  }
};

}  // namespace marginops::cuda
