// Op schemas (defined once here) and the stub that makes this library importable as
// marginops._C. Implementations register per dispatch key: csrc/cpu/, csrc/cuda/ (register_cuda.cpp).
#include <Python.h>
#include <torch/library.h>

#include "head_inputs.h"

extern "C" {
// Importing marginops._C loads this library, which runs the TORCH_LIBRARY registrations.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

// The head arguments (MO_HEAD_SCHEMA, generated from csrc/head_params.h's tables, which say what
// each means) appear in the same order in both training ops.
TORCH_LIBRARY(marginops, m) {
  // Per-row statistics of z over the computed classes, without materializing z:
  //   lse = logsumexp_j z_ij, target_logit = z_iy (0 where y is not computed here),
  //   logit_sum = Σ_j z_ij, best_logit/best_class = max/argmax_j of the margin-free logits.
  // grad_skip only reaches the backward (see below); the forward takes it so autograd can.
  // backend: 0 auto (CUDA: chunked; the CPU's tiled path), 1 chunked, 2 tiles (CUDA only);
  // workspace_bytes: the chunked backend's budget for all its extra memory, 0 = 64 MiB.
  m.def("margin_ce_forward(" MO_HEAD_SCHEMA
        "float grad_skip=0., int backend=0, int workspace_bytes=0) -> (Tensor lse, Tensor target_logit, Tensor "
        "logit_sum, Tensor best_logit, "
        "Tensor best_class)");
  // Gradients of Σ_i (grad_lse_i·lse_i + grad_target_logit_i·z_iy + grad_logit_sum_i·Σ_j z_ij)
  // given the forward's lse. output_mask picks (x, weight, bias, row_margins); an output that is
  // not asked for comes back empty. grad_skip in [0, 1): 0 is exact; above 0, a tile whose
  // non-label probabilities exp(z − lse) all lie below it, holding no row with a grad_logit_sum,
  // keeps only its label entries (its products become one row update per label).
  m.def(
      "margin_ce_backward(Tensor? grad_lse, Tensor? grad_target_logit, Tensor? grad_logit_sum, "
      "Tensor lse, " MO_HEAD_SCHEMA
      "bool[4] output_mask, float grad_skip=0., int backend=0, int workspace_bytes=0) -> (Tensor grad_x, Tensor "
      "grad_weight, Tensor grad_bias, "
      "Tensor grad_row_margins)");
  // The k largest margin-free logits of each row among the computed classes and their global
  // class ids, without a [B, C] tensor (inference). Not differentiable.
  m.def(
      "margin_topk(Tensor x, Tensor weight, Tensor? bias, Tensor? class_index, int k, "
      "int class_offset, bool normalize_x, bool normalize_w, float s, int subcenters) -> "
      "(Tensor values, Tensor classes)");
  // ψ and its derivatives, elementwise, exactly as the kernels apply them (for tests).
  // Labels and class_index on CUDA are checked by the kernels, without a synchronization; a bad
  // value raises its ValueError at the next call on that device, or here (after synchronizing
  // every device that ran the ops). set_sync_checks(True) adds the host check before each CUDA
  // call (a copy to the host per call, for debugging) and returns the previous setting.
  m.def("check_errors() -> ()", [] { marginops::run_error_checkers(); });
  m.def("set_sync_checks(bool enabled) -> bool", [](bool enabled) {
    const bool old = marginops::sync_checks();
    marginops::set_sync_checks(enabled);
    return old;
  });
  m.def(
      "margin_psi(Tensor cos, Tensor m1, Tensor m2, Tensor m3, int margin_kind, "
      "int theta_policy, float lambda_) -> (Tensor psi, Tensor d_cos, Tensor d_m1, "
      "Tensor d_m2, Tensor d_m3)");
  // marginops.optim's steps (row_step.h), in place, one pass over each row: param's rows `rows`
  // (or first_row + i) from grad [n, D] (float64 for a float64 param, else float32) by
  // torch.optim.SGD's or AdamW's formulas, and sparse="exact"'s catch-up (w, momentum) <- coef[i]
  // (row-major 2x2 per row, float64). The state in param's dtype, float32 or bfloat16; a bfloat16
  // param rounded stochastically (seed).
  m.def(
      "sgd_step_(Tensor(a!) param, Tensor(b!)? momentum, Tensor grad, Tensor? rows, int first_row, float lr, "
      "float momentum_factor, float dampening, float weight_decay, bool nesterov, bool first, int seed) -> ()");
  m.def(
      "adamw_step_(Tensor(a!) param, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor grad, Tensor? rows, "
      "int first_row, float lr, float beta1, float beta2, float eps, float weight_decay, int step, int seed) -> ()");
  m.def("sgd_catch_up_(Tensor(a!) param, Tensor(b!)? momentum, Tensor rows, Tensor coef, int seed) -> ()");
}
