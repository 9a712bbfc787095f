// The head optimizers' update of one element of a weight row and its state (marginops/optim.py):
// one definition, shared by the CPU loop (cpu/row_step_cpu.cpp) and the CUDA kernel
// (cuda/optim/row_step_kernels.cu). No torch or CUDA headers.
//
// A step updates n rows of param [rows_total, D]: row i of grad [n, D] (or of coef [n, 2, 2])
// goes to param row rows[i], or first_row + i when rows is null. Arithmetic is in A (double for a
// float64 param, else float); the state is stored in S and rounded to nearest once per step, the
// update using the unrounded value; a bfloat16 param is rounded stochastically.
//   SGD       g += wd·w;  b = first ? g : μ·b + (1 − dampening)·g;  w −= lr·(Nesterov ? g + μ·b : b)
//             (torch.optim.SGD; without momentum, w −= lr·g)
//   AdamW     w ·= 1 − lr·wd;  m = lerp(m, g, 1 − β1);  v = β2·v + (1 − β2)·g²;
//             w −= lr/(1 − β1^t) · m / (√v / √(1 − β2^t) + eps)   (torch.optim.AdamW)
//   catch-up  (w, b) ← Q_i (w, b), Q_i = coef[i] row-major: SGD's skipped steps in closed form
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#ifndef MO_HD
#if defined(__CUDACC__)
#define MO_HD __host__ __device__ __forceinline__
#else
#define MO_HD inline
#endif
#endif

namespace marginops::row_step {

enum Kind : int32_t { kSgd = 0, kAdamW = 1, kCatchUp = 2 };
enum Store : int32_t { kBFloat16 = 0, kFloat = 1, kDouble = 2 };

// bfloat16 as its bits: the same code on the host and the device.
struct Bf16 {
  uint16_t bits;
};

struct Params {
  Kind kind = kSgd;
  Store param_type = kFloat, state_type = kFloat;
  void* param = nullptr;
  void* state0 = nullptr;         // SGD's momentum (or null: none), AdamW's exp_avg
  void* state1 = nullptr;         // AdamW's exp_avg_sq
  const void* grad = nullptr;     // A [n, D] (SGD, AdamW)
  const double* coef = nullptr;   // [n, 2, 2] (catch-up)
  const int64_t* rows = nullptr;  // [n] param rows, or null: first_row + i
  int64_t first_row = 0, n = 0, D = 1;
  double lr = 0, momentum = 0, keep = 1, weight_decay = 0;                         // SGD (keep = 1 − dampening)
  bool nesterov = false, first = false;                                            // first: the state's first step
  double decay = 1, beta1 = 0, beta2 = 0, eps = 0, step_size = 0, bias2_sqrt = 1;  // AdamW
  uint64_t seed = 0;  // stochastic rounding of a bfloat16 param
};

MO_HD uint32_t float_bits(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(v);
#else
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u;
#endif
}

MO_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float v;
  std::memcpy(&v, &u, 4);
  return v;
#endif
}

MO_HD float widen(float v) {
  return v;
}
MO_HD double widen(double v) {
  return v;
}
MO_HD float widen(Bf16 v) {
  return bits_float(static_cast<uint32_t>(v.bits) << 16);
}

// Round to nearest even (torch's float -> bfloat16, NaN as 0x7fc0).
MO_HD void narrow(Bf16& out, float v) {
  if (v != v) {
    out.bits = 0x7fc0;
    return;
  }
  const uint32_t u = float_bits(v);
  out.bits = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
MO_HD void narrow(Bf16& out, double v) {
  narrow(out, static_cast<float>(v));
}
MO_HD void narrow(float& out, float v) {
  out = v;
}
MO_HD void narrow(float& out, double v) {
  out = static_cast<float>(v);
}
MO_HD void narrow(double& out, double v) {
  out = v;
}

// 16 uniform bits for element `index` of a step seeded `seed`: reproducible whatever the launch
// shape or the chunking. 32-bit arithmetic (the index folded in, then MurmurHash3's finalizer):
// a few instructions per element, where 64-bit multiplies would cost the kernel its memory speed
// with a bfloat16 weight.
MO_HD uint32_t noise16(uint64_t seed, uint64_t index) {
  uint32_t h =
      static_cast<uint32_t>(index) * 0x9E3779B1u ^ static_cast<uint32_t>(index >> 32) ^ static_cast<uint32_t>(seed);
  h ^= static_cast<uint32_t>(seed >> 32);
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h >> 16;
}

// A param's new value: as it is in float32/float64; to bfloat16 up with probability equal to the
// distance to the lower neighbour (in units of the spacing), so that updates far below an ulp
// still move the weight on average. ±Inf and NaN round to nearest.
MO_HD void store_param(float& out, float v, uint64_t, int64_t) {
  out = v;
}
MO_HD void store_param(double& out, double v, uint64_t, int64_t) {
  out = v;
}
MO_HD void store_param(Bf16& out, float v, uint64_t seed, int64_t index) {
  if (!(v - v == 0.0f)) {  // ±Inf, NaN
    narrow(out, v);
    return;
  }
  out.bits = static_cast<uint16_t>((float_bits(v) + noise16(seed, static_cast<uint64_t>(index))) >> 16);
}

// torch.lerp's two branches (exact at both ends).
template <typename A>
MO_HD A lerp(A from, A to, A weight) {
  return weight < A(0.5) ? from + weight * (to - from) : to - (to - from) * (A(1) - weight);
}

// What every element of step row i shares, read once per row: the param row it updates and, for
// the catch-up, its matrix.
template <typename A>
struct Row {
  int64_t index;
  A q[4];
};

template <Kind K, typename A>
MO_HD Row<A> row_of(const Params& p, int64_t i) {
  Row<A> r{p.rows != nullptr ? p.rows[i] : p.first_row + i, {A(1), A(0), A(0), A(1)}};
  if constexpr (K == kCatchUp) {
    for (int k = 0; k < 4; ++k) r.q[k] = A(p.coef[4 * i + k]);
  }
  return r;
}

// p's hyperparameters in the arithmetic's dtype, converted once per call (or per GPU thread), not
// per element: a float64-to-float32 conversion runs at the float64 rate on a GPU.
template <typename A>
struct Hyper {
  A lr, momentum, keep, weight_decay;                                  // SGD
  A decay, lerp_weight, beta2, sq_weight, eps, step_size, bias2_sqrt;  // AdamW: 1 − β1, β2, 1 − β2
};

template <typename A>
MO_HD Hyper<A> hyper(const Params& p) {
  return {A(p.lr),    A(p.momentum),  A(p.keep), A(p.weight_decay), A(p.decay),     A(1 - p.beta1),
          A(p.beta2), A(1 - p.beta2), A(p.eps),  A(p.step_size),    A(p.bias2_sqrt)};
}

MO_HD float sqrt_(float v) {
  return sqrtf(v);
}
MO_HD double sqrt_(double v) {
  return sqrt(v);
}

// Element d of step row i (r = row_of(p, i), h = hyper(p)).
template <Kind K, typename A, typename W, typename S>
MO_HD void step_element(const Params& p, const Hyper<A>& h, int64_t i, const Row<A>& r, int64_t d) {
  const int64_t at = r.index * p.D + d;
  W& w = static_cast<W*>(p.param)[at];
  S* s0 = p.state0 != nullptr ? static_cast<S*>(p.state0) + at : nullptr;
  A wv = widen(w);
  if constexpr (K == kCatchUp) {
    const A b = s0 != nullptr ? A(widen(*s0)) : A(0);
    const A next = wv * r.q[0] + b * r.q[1];
    if (s0 != nullptr) narrow(*s0, A(wv * r.q[2] + b * r.q[3]));
    wv = next;
  } else if constexpr (K == kSgd) {
    const A g = static_cast<const A*>(p.grad)[i * p.D + d];
    A step = p.weight_decay != 0 ? g + h.weight_decay * wv : g;
    if (s0 != nullptr) {
      const A b = p.first ? step : h.momentum * A(widen(*s0)) + h.keep * step;
      narrow(*s0, b);
      step = p.nesterov ? step + h.momentum * b : b;
    }
    wv = wv - h.lr * step;
  } else {
    const A g = static_cast<const A*>(p.grad)[i * p.D + d];
    S& s1 = static_cast<S*>(p.state1)[at];
    wv = wv * h.decay;
    const A m = lerp(A(widen(*s0)), g, h.lerp_weight);
    const A v = h.beta2 * A(widen(s1)) + h.sq_weight * g * g;
    narrow(*s0, m);
    narrow(s1, v);
    wv = wv - h.step_size * (m / (sqrt_(v) / h.bias2_sqrt + h.eps));
  }
  store_param(w, wv, p.seed, at);
}

template <Kind K>
using KindTag = std::integral_constant<Kind, K>;

// Calls f(KindTag<kind>{}, A{}, W{}, S{}) for p's kind and types (A: double for a float64 param,
// else float; S: the param's dtype, float32 or bfloat16); false for another pair.
template <typename F>
bool dispatch(const Params& p, F&& f) {
  const auto with_kind = [&](auto a, auto w, auto s) {
    switch (p.kind) {
      case kSgd:
        f(KindTag<kSgd>{}, a, w, s);
        return true;
      case kAdamW:
        f(KindTag<kAdamW>{}, a, w, s);
        return true;
      case kCatchUp:
        f(KindTag<kCatchUp>{}, a, w, s);
        return true;
    }
    return false;
  };
  const auto with_state = [&](auto a, auto w) {
    if (p.state_type == kBFloat16) return with_kind(a, w, Bf16{});
    if (p.state_type == kFloat) return with_kind(a, w, 0.0f);
    if constexpr (sizeof(a) == 8) {
      if (p.state_type == kDouble) return with_kind(a, w, 0.0);
    }
    return false;
  };
  if (p.param_type == kBFloat16) return with_state(0.0f, Bf16{});
  if (p.param_type == kFloat) return with_state(0.0f, 0.0f);
  if (p.param_type == kDouble) return with_state(0.0, 0.0);
  return false;
}

}  // namespace marginops::row_step
