// Row-sparse steps of marginops.optim.SGD on the CPU, one pass over each row they touch (the
// elementwise torch ops they replace read and write every gathered row several times):
//   sgd_rows_      torch.optim.SGD's update of the rows `rows` of param (and their momentum) from
//                  grad [n, D]: g += wd·w; b = first ? g : μ·b + (1 − d)·g; w −= lr·(Nesterov ?
//                  g + μ·b : b)
//   sgd_catch_up_  sparse="exact"'s catch-up of those rows: (w, b) ← Q_i (w, b), Q_i = coef[i]
//                  (row-major 2×2, the product of the skipped steps' matrices)
// float32 or float64 parameters, the momentum in the same dtype (the Python path serves the rest).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>

namespace marginops {
namespace {

void check_rows(const at::Tensor& param, const std::optional<at::Tensor>& momentum, const at::Tensor& rows, int64_t n) {
  TORCH_CHECK(param.dim() >= 1 && param.is_contiguous(), "param must be a contiguous tensor, got ", param.sizes());
  TORCH_CHECK(param.scalar_type() == at::kFloat || param.scalar_type() == at::kDouble,
              "param must be float32 or float64, got ", param.scalar_type());
  if (momentum.has_value()) {
    TORCH_CHECK(momentum->sizes() == param.sizes() && momentum->scalar_type() == param.scalar_type() &&
                    momentum->is_contiguous(),
                "momentum must be a contiguous tensor like param ", param.sizes(), ", got ", momentum->sizes());
  }
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong && rows.size(0) == n,
              "rows must be a 1-D int64 tensor of ", n, " entries, got ", rows.sizes());
  const int64_t* r = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(r[i] >= 0 && r[i] < param.size(0), "rows[", i, "] = ", r[i], " is not a row of param");
}

void sgd_rows_(const at::Tensor& param, const std::optional<at::Tensor>& momentum, const at::Tensor& rows,
               const at::Tensor& grad, double lr, double momentum_factor, double dampening, double weight_decay,
               bool nesterov, bool first) {
  const int64_t n = rows.numel(), D = param.numel() / std::max<int64_t>(param.size(0), 1);
  check_rows(param, momentum, rows, n);
  TORCH_CHECK(grad.is_contiguous() && grad.scalar_type() == param.scalar_type() && grad.numel() == n * D,
              "grad must be a contiguous [", n, ", ", D, "] tensor like param, got ", grad.sizes());
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "sgd_rows_", [&] {
    scalar_t* w = param.data_ptr<scalar_t>();
    scalar_t* b = momentum.has_value() ? momentum->data_ptr<scalar_t>() : nullptr;
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const int64_t* r = rows.data_ptr<int64_t>();
    const auto lr_ = scalar_t(lr), mu = scalar_t(momentum_factor), keep = scalar_t(1 - dampening);
    const auto wd = scalar_t(weight_decay);
    at::parallel_for(0, n, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        scalar_t* wr = w + r[i] * D;
        scalar_t* br = b ? b + r[i] * D : nullptr;
        const scalar_t* gr = g + i * D;
        for (int64_t d = 0; d < D; ++d) {
          scalar_t step = weight_decay != 0 ? gr[d] + wd * wr[d] : gr[d];
          if (br) {
            const scalar_t m = first ? step : mu * br[d] + keep * step;
            br[d] = m;
            step = nesterov ? step + mu * m : m;
          }
          wr[d] = wr[d] - lr_ * step;
        }
      }
    });
  });
}

void sgd_catch_up_(const at::Tensor& param, const std::optional<at::Tensor>& momentum, const at::Tensor& rows,
                   const at::Tensor& coef) {
  const int64_t n = rows.numel(), D = param.numel() / std::max<int64_t>(param.size(0), 1);
  check_rows(param, momentum, rows, n);
  TORCH_CHECK(coef.is_contiguous() && coef.scalar_type() == at::kDouble && coef.numel() == 4 * n,
              "coef must be a contiguous float64 [", n, ", 2, 2] tensor, got ", coef.sizes());
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "sgd_catch_up_", [&] {
    scalar_t* w = param.data_ptr<scalar_t>();
    scalar_t* b = momentum.has_value() ? momentum->data_ptr<scalar_t>() : nullptr;
    const double* q = coef.data_ptr<double>();
    const int64_t* r = rows.data_ptr<int64_t>();
    at::parallel_for(0, n, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        scalar_t* wr = w + r[i] * D;
        scalar_t* br = b ? b + r[i] * D : nullptr;
        const auto q00 = scalar_t(q[4 * i]), q01 = scalar_t(q[4 * i + 1]);
        const auto q10 = scalar_t(q[4 * i + 2]), q11 = scalar_t(q[4 * i + 3]);
        for (int64_t d = 0; d < D; ++d) {
          const scalar_t w0 = wr[d], b0 = br ? br[d] : scalar_t(0);
          wr[d] = w0 * q00 + b0 * q01;
          if (br) br[d] = w0 * q10 + b0 * q11;
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(marginops, CPU, m) {
  m.impl("sgd_rows_", &sgd_rows_);
  m.impl("sgd_catch_up_", &sgd_catch_up_);
}

}  // namespace marginops
