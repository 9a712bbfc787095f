// margin_psi on the CPU: margin_math.h's ψ applied elementwise, so tests can compare the exact
// function the kernels use against the eager reference and autograd.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../margin_math.h"

namespace marginops::cpu {
namespace {

template <typename T>
void psi_loop(const at::Tensor& c, const at::Tensor& m1, const at::Tensor& m2, const at::Tensor& m3, int64_t kind,
              int64_t policy, double lambda, std::array<at::Tensor, 5>& out) {
  const int64_t n = c.numel();
  const T *cp = c.data_ptr<T>(), *p1 = m1.data_ptr<T>(), *p2 = m2.data_ptr<T>(), *p3 = m3.data_ptr<T>();
  T* o[5];
  for (int k = 0; k < 5; ++k) o[k] = out[k].data_ptr<T>();
  for (int64_t i = 0; i < n; ++i) {
    const Psi<T> r =
        margin_psi<T>(static_cast<int32_t>(kind), static_cast<int32_t>(policy), cp[i], p1[i], p2[i], p3[i], T(lambda));
    o[0][i] = r.value;
    o[1][i] = r.d_c;
    o[2][i] = r.d_m1;
    o[3][i] = r.d_m2;
    o[4][i] = r.d_m3;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> margin_psi(
    const at::Tensor& cos, const at::Tensor& m1, const at::Tensor& m2, const at::Tensor& m3, int64_t margin_kind,
    int64_t theta_policy, double lambda) {
  TORCH_CHECK_VALUE(cos.scalar_type() == at::kFloat || cos.scalar_type() == at::kDouble,
                    "cos must be float32 or float64, got ", cos.scalar_type());
  const auto same = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.sizes() == cos.sizes() && t.scalar_type() == cos.scalar_type(), name, " must match cos (",
                      cos.sizes(), ", ", cos.scalar_type(), "), got ", t.sizes(), ", ", t.scalar_type());
    return t.contiguous();
  };
  const at::Tensor c = cos.contiguous(), a = same(m1, "m1"), b = same(m2, "m2"), d = same(m3, "m3");
  std::array<at::Tensor, 5> out;
  for (auto& t : out) t = at::empty_like(c);
  if (c.scalar_type() == at::kDouble) {
    psi_loop<double>(c, a, b, d, margin_kind, theta_policy, lambda, out);
  } else {
    psi_loop<float>(c, a, b, d, margin_kind, theta_policy, lambda, out);
  }
  return {out[0], out[1], out[2], out[3], out[4]};
}

}  // namespace

TORCH_LIBRARY_IMPL(marginops, CPU, m) {
  m.impl("margin_psi", &margin_psi);
}

}  // namespace marginops::cpu
