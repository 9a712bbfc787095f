// The margin family: one definition of the target transform ψ, its derivatives, and the
// per-row target terms of the loss and its gradient, shared by the CPU and CUDA paths.
//
// marginops/reference.py (_psi) mirrors every branch here in eager PyTorch; the tests compare
// both values and derivatives (through autograd) in float64, so a change here needs the same
// change there.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MO_HD __host__ __device__ __forceinline__
#else
#define MO_HD inline
#endif

namespace marginops {

// Values are part of the op schema: keep in sync with marginops/margins.py.
enum MarginKind : int32_t {
  kIdentity = 0,        // ψ(c) = c: Softmax, NormFace, L2-Softmax, weight-normalized softmax
  kCombined = 1,        // ψ(c) = cos(m1·θ + m2) − m3: CosFace, ArcFace, combined, per-row margins
  kMultiplicative = 2,  // ψ(c) = ((−1)^k cos(m1·θ) − 2k + λc) / (1 + λ): L-Softmax, SphereFace
};

// What kCombined does where φ = m1·θ + m2 leaves [0, π], where cos φ stops decreasing in θ.
enum ThetaPolicy : int32_t {
  kFallback = 0,    // φ > π: ψ = c − m3 − m2·sin(m2) (insightface, pytorch-metric-learning)
  kEasy = 1,        // c ≤ 0: ψ = c − m3 (insightface's easy_margin)
  kNone = 2,        // cos φ − m3 everywhere
  kContinuous = 3,  // (−1)^k cos φ − 2k − m3 with k = ⌊φ/π⌋: continuous and monotonic
  kClip = 4,        // φ clamped to [kClipEps, π − kClipEps] (AdaFace)
};

// c is clamped to [−1 + kCosEps, 1 − kCosEps] before acos/sqrt, so dθ/dc = −1/sin θ stays
// finite (|dθ/dc| ≤ 2237); ψ is flat in c beyond the clamp, as autograd of torch.clamp says.
constexpr double kCosEps = 1e-7;
// Norms are clamped below at kNormEps, as torch.nn.functional.normalize does.
constexpr double kNormEps = 1e-12;
// kClip keeps φ this far inside [0, π], as AdaFace does.
constexpr double kClipEps = 1e-3;
constexpr double kPi = 3.14159265358979323846;

namespace math {
MO_HD float acos_(float v) {
  return acosf(v);
}
MO_HD double acos_(double v) {
  return acos(v);
}
MO_HD float cos_(float v) {
  return cosf(v);
}
MO_HD double cos_(double v) {
  return cos(v);
}
MO_HD float sin_(float v) {
  return sinf(v);
}
MO_HD double sin_(double v) {
  return sin(v);
}
MO_HD float sqrt_(float v) {
  return sqrtf(v);
}
MO_HD double sqrt_(double v) {
  return sqrt(v);
}
MO_HD float floor_(float v) {
  return floorf(v);
}
MO_HD double floor_(double v) {
  return floor(v);
}
template <typename T>
MO_HD T clamp_(T v, T lo, T hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}
}  // namespace math

// 1 / max(norm, kNormEps): the inverse norm used for every normalization.
template <typename T>
MO_HD T inv_norm(T norm) {
  return T(1) / (norm > T(kNormEps) ? norm : T(kNormEps));
}

// ψ and its partial derivatives. d_m1 is reported but per-row m1 is treated as a constant.
template <typename T>
struct Psi {
  T value;
  T d_c;
  T d_m1;
  T d_m2;
  T d_m3;
};

template <typename T>
MO_HD Psi<T> margin_psi(int32_t kind, int32_t policy, T c, T m1, T m2, T m3, T lambda) {
  Psi<T> r{c, T(1), T(0), T(0), T(0)};
  if (kind == kIdentity) return r;

  const T lo = T(-1.0 + kCosEps), hi = T(1.0 - kCosEps);
  const bool inside = c >= lo && c <= hi;  // torch.clamp passes the gradient on [lo, hi]
  const T cc = math::clamp_(c, lo, hi);
  const T sin_t = math::sqrt_(T(1) - cc * cc);
  const T theta = math::acos_(cc);
  const T dtheta_dc = inside ? T(-1) / sin_t : T(0);

  if (kind == kMultiplicative) {
    // SphereFace's ψ, piecewise on θ ∈ [kπ/m, (k+1)π/m]; m = m1 is a positive integer.
    const T mt = m1 * theta;
    const T k = math::clamp_(math::floor_(mt / T(kPi)), T(0), m1 - T(1));
    const T sign = (static_cast<int64_t>(k) % 2 == 0) ? T(1) : T(-1);
    r.value = (sign * math::cos_(mt) - T(2) * k + lambda * c) / (T(1) + lambda);
    r.d_c = (-sign * math::sin_(mt) * m1 * dtheta_dc + lambda) / (T(1) + lambda);
    return r;
  }

  // kCombined. With m1 = 1 (CosFace, ArcFace) cos φ is expanded as c·cos m2 − sin θ·sin m2 with
  // the unclamped c, so m2 = 0 gives exactly c − m3 with dψ/dc = 1 up to |c| = 1.
  const T phi = m1 * theta + m2;
  T cos_phi, sin_phi, dcos_dc, dcos_dm2;
  if (m1 == T(1)) {
    const T cm = math::cos_(m2), sm = math::sin_(m2);
    cos_phi = c * cm - sin_t * sm;
    sin_phi = sin_t * cm + cc * sm;
    dcos_dc = cm + (inside ? sm * cc / sin_t : T(0));
    dcos_dm2 = -c * sm - sin_t * cm;
  } else {
    cos_phi = math::cos_(phi);
    sin_phi = math::sin_(phi);
    dcos_dc = -sin_phi * m1 * dtheta_dc;
    dcos_dm2 = -sin_phi;
  }
  const T dcos_dm1 = -sin_phi * theta;
  r.d_m3 = T(-1);

  const bool linear = (policy == kFallback && phi > T(kPi)) || (policy == kEasy && c <= T(0));
  if (linear) {
    const T shift = policy == kFallback ? m2 * math::sin_(m2) : T(0);
    r.value = c - m3 - shift;
    r.d_c = T(1);
    r.d_m2 = policy == kFallback ? -(math::sin_(m2) + m2 * math::cos_(m2)) : T(0);
    return r;
  }
  if (policy == kClip && (phi < T(kClipEps) || phi > T(kPi - kClipEps))) {
    r.value = math::cos_(phi < T(kClipEps) ? T(kClipEps) : T(kPi - kClipEps)) - m3;
    r.d_c = T(0);
    return r;
  }
  T sign = T(1), offset = T(0);
  if (policy == kContinuous) {
    const T k = math::floor_(phi / T(kPi));
    sign = (static_cast<int64_t>(k) % 2 == 0) ? T(1) : T(-1);
    offset = T(2) * k;
  }
  r.value = sign * cos_phi - offset - m3;
  r.d_c = sign * dcos_dc;
  r.d_m1 = sign * dcos_dm1;
  r.d_m2 = sign * dcos_dm2;
  return r;
}

// How the head scales one row and one class. For the non-target logits
//   z_ij = α_i β_j (x_i · W_j) + bias_j,  α_i = normalize_x ? s/‖x_i‖ : 1,  β_j = normalize_w ? 1/‖W_j‖ : 1
// and for the target column, where the margin applies,
//   z_iy = a_i b_y ψ(c_iy) + bias_y,      a_i = normalize_x ? s : ‖x_i‖,  b_y = normalize_w ? 1 : ‖W_y‖.
template <typename T>
struct Side {
  T norm;   // ‖x_i‖ or ‖W_j‖
  T inv;    // 1 / max(norm, kNormEps)
  T scale;  // α_i or β_j
  T amp;    // a_i or b_j
  bool normalized;
};

template <typename T>
MO_HD Side<T> make_side(T norm, bool normalized, T s) {
  const T inv = inv_norm(norm);
  return Side<T>{norm, inv, normalized ? s * inv : T(1), normalized ? s : norm, normalized};
}

// The target logit of a margin head, from u = x_i · W_y.
template <typename T>
struct Target {
  T cos;    // c_iy
  T logit;  // z_iy
  T z0;     // α_i β_y u: the margin-free logit without bias, as every non-target entry has it
  Psi<T> psi;
  bool raw;  // ψ = c (kIdentity): z_iy = z0 + bias, no margin
};

// straight_through: the margin is a constant shift of the logit for the backward, as in
// insightface's ArcFace (margin applied under no_grad): ∂ψ/∂c is taken as 1 and the margin
// parameters get no gradient; the value is unchanged.
template <typename T>
MO_HD Target<T> target_logit(int32_t kind, int32_t policy, T u, const Side<T>& row, const Side<T>& col, T m1, T m2,
                             T m3, T lambda, T bias, bool straight_through = false) {
  Target<T> t;
  t.cos = u * row.inv * col.inv;
  t.psi = margin_psi(kind, policy, t.cos, m1, m2, m3, lambda);
  if (straight_through) {
    t.psi.d_c = T(1);
    t.psi.d_m1 = t.psi.d_m2 = t.psi.d_m3 = T(0);
  }
  // Without a margin the target is an ordinary logit, α_i β_y u + bias, computed from the raw
  // product as the tiles compute every other one: a·b·(u / (‖x‖‖W‖)) would round differently (a
  // confident row's lse − z_iy then goes negative) and turns ‖W_y‖ = inf (a norm that overflows
  // while u does not) into NaN.
  t.raw = kind == kIdentity;
  t.z0 = row.scale * col.scale * u;
  t.logit = t.raw ? t.z0 + bias : row.amp * col.amp * t.psi.value + bias;
  return t;
}

// insightface's interclass filtering: a non-label entry whose cosine c exceeds threshold > 0
// gets logit exactly 0 and no gradient (threshold 0: off).
template <typename T>
MO_HD bool filtered_negative(T c, double threshold) {
  return threshold > 0 && c > T(threshold);
}

// The target's share of the gradient, given g = ∂L/∂z_iy. With x̂ = x·inv and Ŵ = W·inv:
//   dx_i += α_i β_y · tile_grad · W_y + x_coef · x̂_i     (tile_grad is what the target entry of the
//   dW_y += α_i β_y · tile_grad · x_i + w_coef · Ŵ_y       tile's ∂L/∂z holds, so the GEMMs add it)
template <typename T>
struct TargetGrad {
  T tile_grad;
  T x_coef;
  T w_coef;
  T d_m1, d_m2, d_m3;
};

template <typename T>
MO_HD TargetGrad<T> target_grad(const Target<T>& t, const Side<T>& row, const Side<T>& col, T g) {
  const T eps = T(kNormEps);
  TargetGrad<T> r;
  if (t.raw) {  // z = α β u as any other entry: only the normalizations' radial terms
    r.tile_grad = g;
    r.x_coef = row.normalized && row.norm > eps ? -g * t.z0 * row.inv : T(0);
    r.w_coef = col.normalized && col.norm > eps ? -g * t.z0 * col.inv : T(0);
    r.d_m1 = r.d_m2 = r.d_m3 = T(0);
    return r;
  }
  const T gc = g * row.amp * col.amp * t.psi.d_c;  // ∂L/∂c
  r.tile_grad = gc * row.inv * col.inv / (row.scale * col.scale);
  // c = u / (‖x‖‖W‖) and a = ‖x‖ (b = ‖W‖) when not normalized; both norms are flat below eps.
  r.x_coef = (row.norm > eps ? -gc * t.cos * row.inv : T(0)) +
             (!row.normalized && row.norm > eps ? g * col.amp * t.psi.value : T(0));
  r.w_coef = (col.norm > eps ? -gc * t.cos * col.inv : T(0)) +
             (!col.normalized && col.norm > eps ? g * row.amp * t.psi.value : T(0));
  const T ab = g * row.amp * col.amp;
  r.d_m1 = ab * t.psi.d_m1;
  r.d_m2 = ab * t.psi.d_m2;
  r.d_m3 = ab * t.psi.d_m3;
  return r;
}

}  // namespace marginops
