// The head optimizers' row ops (schemas in marginops.cpp) on any device: arguments checked and
// bound to row_step::Params, then run by the device's Run::run(params) (cpu/row_step_cpu.cpp,
// cuda/optim/row_step_launch.h).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>

#include "row_step.h"

namespace marginops::row_step {

inline Store store_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kBFloat16:
      return kBFloat16;
    case at::kFloat:
      return kFloat;
    case at::kDouble:
      return kDouble;
    default:
      TORCH_CHECK_VALUE(false, name, " must be bfloat16, float32 or float64, got ", t.scalar_type());
  }
}

// The params of a step on n rows of param: rows[i] (or first_row + i) takes row i of data
// (grad [n, D] in the arithmetic dtype, float64 for a float64 param and float32 otherwise; or,
// for the catch-up, coef [n, 2, 2] float64). The state tensors are shaped like param.
inline Params bind(Kind kind, const at::Tensor& param, const std::optional<at::Tensor>& state0,
                   const std::optional<at::Tensor>& state1, const at::Tensor& data,
                   const std::optional<at::Tensor>& rows, int64_t first_row) {
  TORCH_CHECK_VALUE(param.dim() >= 1 && param.is_contiguous(), "param must be a contiguous tensor, got ",
                    param.sizes());
  Params p;
  p.kind = kind;
  p.param_type = store_of(param, "param");
  p.param = param.data_ptr();
  const int64_t R = param.size(0);
  p.D = R > 0 ? param.numel() / R : 1;
  p.state_type = p.param_type;
  const std::optional<at::Tensor>* states[2] = {&state0, &state1};
  for (int k = 0; k < 2; ++k) {
    const auto& s = *states[k];
    if (!s.has_value() || !s->defined()) continue;
    TORCH_CHECK_VALUE(s->sizes() == param.sizes() && s->is_contiguous() && s->device() == param.device(),
                      "the optimizer state must be a contiguous tensor like param ", param.sizes(), " on ",
                      param.device(), ", got ", s->sizes(), " on ", s->device());
    TORCH_CHECK_VALUE(k == 0 || s->scalar_type() == state0->scalar_type(), "both moments must have one dtype, got ",
                      state0->scalar_type(), " and ", s->scalar_type());
    p.state_type = store_of(*s, "the optimizer state");
    (k == 0 ? p.state0 : p.state1) = s->data_ptr();
  }
  const bool coef = kind == kCatchUp;
  const auto want = coef || param.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t per_row = coef ? 4 : p.D;
  TORCH_CHECK_VALUE(
      data.is_contiguous() && data.scalar_type() == want && data.device() == param.device() && data.dim() >= 1 &&
          data.numel() == data.size(0) * per_row,
      coef ? "coef must be a contiguous float64 [n, 2, 2] tensor" : "grad must be a contiguous [n, D] tensor", " of ",
      want, " on ", param.device(), " (D = ", p.D, "), got ", data.scalar_type(), " ", data.sizes(), " on ",
      data.device());
  p.n = data.size(0);
  if (coef) {
    p.coef = data.data_ptr<double>();
  } else {
    p.grad = data.data_ptr();
  }
  if (rows.has_value() && rows->defined()) {
    TORCH_CHECK_VALUE(rows->dim() == 1 && rows->scalar_type() == at::kLong && rows->numel() == p.n &&
                          rows->is_contiguous() && rows->device() == param.device(),
                      "rows must be a contiguous 1-D int64 tensor of ", p.n, " entries on ", param.device(), ", got ",
                      rows->scalar_type(), " ", rows->sizes(), " on ", rows->device());
    if (rows->is_cpu()) {  // on CUDA the caller's contract: the head's rows, checked by its forward
      const int64_t* r = rows->data_ptr<int64_t>();
      for (int64_t i = 0; i < p.n; ++i)
        TORCH_CHECK_VALUE(r[i] >= 0 && r[i] < R, "rows[", i, "] = ", r[i], " is not a row of param (", R, " rows)");
    }
    p.rows = rows->data_ptr<int64_t>();
  } else {
    TORCH_CHECK_VALUE(first_row >= 0 && first_row + p.n <= R, "rows [", first_row, ", ", first_row + p.n,
                      ") are not rows of param (", R, " rows)");
    p.first_row = first_row;
  }
  TORCH_CHECK_VALUE(dispatch(p, [](auto...) {}), "the optimizer state must be stored in param's dtype, float32 or ",
                    "bfloat16, got ", state0->scalar_type(), " for a ", param.scalar_type(), " param");
  return p;
}

template <typename Run>
void sgd_step(const at::Tensor& param, const std::optional<at::Tensor>& momentum, const at::Tensor& grad,
              const std::optional<at::Tensor>& rows, int64_t first_row, double lr, double momentum_factor,
              double dampening, double weight_decay, bool nesterov, bool first, int64_t seed) {
  Params p = bind(kSgd, param, momentum, std::nullopt, grad, rows, first_row);
  p.lr = lr;
  p.momentum = momentum_factor;
  p.keep = 1 - dampening;
  p.weight_decay = weight_decay;
  p.nesterov = nesterov;
  p.first = first;
  p.seed = static_cast<uint64_t>(seed);
  Run::run(p, param);
}

template <typename Run>
void adamw_step(const at::Tensor& param, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                const at::Tensor& grad, const std::optional<at::Tensor>& rows, int64_t first_row, double lr,
                double beta1, double beta2, double eps, double weight_decay, int64_t step, int64_t seed) {
  TORCH_CHECK_VALUE(step >= 1, "step must count from 1, got ", step);
  Params p = bind(kAdamW, param, exp_avg, exp_avg_sq, grad, rows, first_row);
  p.decay = 1 - lr * weight_decay;
  p.beta1 = beta1;
  p.beta2 = beta2;
  p.eps = eps;
  p.step_size = lr / (1 - std::pow(beta1, static_cast<double>(step)));
  p.bias2_sqrt = std::sqrt(1 - std::pow(beta2, static_cast<double>(step)));
  p.seed = static_cast<uint64_t>(seed);
  Run::run(p, param);
}

template <typename Run>
void sgd_catch_up(const at::Tensor& param, const std::optional<at::Tensor>& momentum, const at::Tensor& rows,
                  const at::Tensor& coef, int64_t seed) {
  Params p = bind(kCatchUp, param, momentum, std::nullopt, coef, rows, 0);
  p.seed = static_cast<uint64_t>(seed);
  Run::run(p, param);
}

}  // namespace marginops::row_step
