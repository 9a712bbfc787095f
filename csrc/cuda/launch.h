// The ops' bodies for the CUDA kernels: argument checks (shared with the CPU path), label and
// class_index checks (by the kernels, raised at the next call; on the host too with
// sync_checks()), workspace, and the parts of the ops' bodies both backends share (params, backward, topk, psi).
// Templated on a Runtime (stream, SM count, capture state, error check, device guard, the device error record, host
// copies) so that tests/cuda_emu can run the same code on its CPU emulation of the kernels.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "../head_inputs.h"
#include "kernel_params.h"

namespace marginops::cuda {

inline DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return kHalf;
    case at::kBFloat16:
      return kBFloat16;
    case at::kFloat:
      return kFloat;
    default:
      return kDouble;
  }
}

inline at::ScalarType scalar_type_of(DType t) {
  switch (t) {
    case kHalf:
      return at::kHalf;
    case kBFloat16:
      return at::kBFloat16;
    case kFloat:
      return at::kFloat;
    default:
      return at::kDouble;
  }
}

// The kernels' params for checked arguments, with the workspace carved out of one allocation
// that `keep` holds alive.
struct Launch {
  HeadParams p;
  std::vector<at::Tensor> keep;
};

// Consecutive 256-byte-aligned pieces of one byte allocation that `l` keeps alive (total bytes:
// the pieces' sizes plus 255 each for alignment); take(0) is null.
struct WorkspaceCarver {
  uint8_t* base;
  size_t offset = 0;
  WorkspaceCarver(size_t total, const at::TensorOptions& opts, Launch& l) {
    l.keep.push_back(at::empty({static_cast<int64_t>(total)}, opts.dtype(at::kByte)));
    base = l.keep.back().data_ptr<uint8_t>();
  }
  void* take(size_t bytes) {
    void* ptr = bytes ? base + offset : nullptr;
    offset += (bytes + 255) / 256 * 256;
    return ptr;
  }
};

// Raises the ValueError of a bad label or class_index that a kernel recorded in `e` since the
// last check (an earlier call's, or this one's after a synchronization), clearing the record.
inline void raise_recorded_error(DeviceError* e) {
  if (e == nullptr) return;
  const int32_t kind = *static_cast<volatile int32_t*>(&e->kind);
  if (kind == kNoError) return;
  const DeviceError r = *e;
  *static_cast<volatile int32_t*>(&e->kind) = kNoError;
  *static_cast<volatile int32_t*>(&e->claimed) = 0;
  const char* where =
      " (found by the CUDA kernels of an earlier call, whose results where it was used are NaN or wrong; "
      "marginops.set_sync_checks(True) checks each call on the host before it runs)";
  switch (kind) {
    case kBadLabel:
      raise_bad_label(r.index, r.value, r.limit, r.ignore, where);
    case kBadClassIndex:
      raise_bad_class_index(r.index, r.value, r.limit, where);
    default:
      raise_unsorted_class_index(r.index, r.limit, r.value, where);
  }
}

// The params of checked arguments, without the workspace (each backend carves its own). Labels
// (row_prep_kernel) and class_index (the weight-row gathers) are checked by the kernels into the
// runtime's error record, read here at the next call without a synchronization; with
// sync_checks() also on the host before launching.
template <typename Runtime>
Launch prepare_params(const HeadArgs& a) {
  const HeadConfig& cfg = a.cfg;
  // check_head_args enforced the one dtype rule, which is exactly the pairs the kernels have
  TORCH_INTERNAL_ASSERT(supported_dtypes(dtype_of(a.x.scalar_type()), dtype_of(a.weight.scalar_type())));
  TORCH_CHECK_VALUE(cfg.subcenters <= 32, "on CUDA, at most 32 sub-centers per class, got ", cfg.subcenters);
  DeviceError* error = Runtime::error_record();
  raise_recorded_error(error);
  if (sync_checks() && !Runtime::capturing()) {
    check_label_values(Runtime::to_host(a.labels), cfg);
    if (a.class_index.defined())
      check_class_index_values(Runtime::to_host(a.class_index), a.weight.size(0) / cfg.subcenters);
  }
  const auto acc = a.acc_dtype();
  Launch l;
  HeadParams& p = l.p;
  p.B = a.rows;
  p.D = a.dim;
  p.C = a.columns;
  p.K = cfg.subcenters;
  p.weight_rows = a.weight.size(0);
  p.x_dtype = dtype_of(a.x.scalar_type());
  p.w_dtype = dtype_of(a.weight.scalar_type());
  p.acc_double = acc == at::kDouble;
  // torch.backends.cuda.matmul.allow_tf32 (or fp32_precision = "tf32"), the switch cuBLAS reads
  p.allow_tf32 = at::globalContext().allowTF32CuBLAS();
  p.x = a.x.data_ptr();
  p.w = a.weight.data_ptr();
  p.labels = a.labels.data_ptr<int64_t>();
  p.class_index = a.class_index.defined() ? a.class_index.data_ptr<int64_t>() : nullptr;
  p.cfg = cfg;
  p.error = error;
  const auto keep = [&](at::Tensor t) {
    l.keep.push_back(t);
    return t.data_ptr();
  };
  if (a.bias.defined()) {
    p.bias = keep((a.class_index.defined() ? a.bias.index_select(0, a.class_index) : a.bias).to(acc).contiguous());
  }
  if (a.row_margins.defined()) p.row_margins = keep(a.row_margins.to(acc).contiguous());
  if (a.curricular.defined()) p.curricular = keep(a.curricular.to(acc).contiguous());
  return l;
}

inline const void* row_grad(const at::Tensor& g, at::ScalarType acc, Launch& l) {
  if (!g.defined()) return nullptr;
  at::Tensor t = g.to(acc).contiguous();
  l.keep.push_back(t);
  return t.data_ptr();
}

// What both backends' backwards do around their kernels: the lse and row-gradient checks, the
// gradients' buffers per output_mask (p.dx, p.dw, p.dbias, p.dm set; null when not asked for),
// then run(l) launches the kernels, then the bias gradient is scattered to its classes.
template <typename Runtime, typename Run>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_with(const std::optional<at::Tensor>& grad_lse,
                                                                         const std::optional<at::Tensor>& grad_target,
                                                                         const std::optional<at::Tensor>& grad_sum,
                                                                         const at::Tensor& lse, const HeadArgs& a,
                                                                         std::array<bool, 4> output_mask, Launch& l,
                                                                         Run run) {
  TORCH_CHECK_VALUE(lse.dim() == 1 && lse.size(0) == a.rows, "lse must have shape [", a.rows, "], got ", lse.sizes());
  const auto acc = a.acc_dtype();
  const auto opts = a.x.options();
  l.p.g_lse = row_grad(check_row_grad(grad_lse, a, "grad_lse"), acc, l);
  l.p.g_target = row_grad(check_row_grad(grad_target, a, "grad_target_logit"), acc, l);
  l.p.g_sum = row_grad(check_row_grad(grad_sum, a, "grad_logit_sum"), acc, l);
  l.p.lse_in = row_grad(lse, acc, l);
  const bool need_dx = output_mask[0], need_dw = output_mask[1];
  const bool need_db = output_mask[2] && a.bias.defined(), need_dm = output_mask[3] && a.row_margins.defined();
  at::Tensor dx = need_dx ? at::empty_like(a.x) : at::empty({0}, opts);
  at::Tensor dw = need_dw ? (a.class_index.defined() ? at::zeros_like(a.weight) : at::empty_like(a.weight))
                          : at::empty({0}, a.weight.options());
  at::Tensor dbias_cols = need_db ? at::zeros({a.columns}, opts.dtype(acc)) : at::Tensor();
  at::Tensor dm = need_dm ? at::zeros({a.rows, 3}, opts.dtype(acc)) : at::Tensor();
  l.p.dx = need_dx ? dx.data_ptr() : nullptr;
  l.p.dw = need_dw ? dw.data_ptr() : nullptr;
  l.p.dbias = need_db ? dbias_cols.data_ptr() : nullptr;
  l.p.dm = need_dm ? dm.data_ptr() : nullptr;
  if (need_dx || need_dw || need_db || need_dm) run(l);
  at::Tensor db = at::empty({0}, opts);
  if (need_db) {
    db = at::zeros_like(a.bias);
    if (a.class_index.defined()) {
      db.index_copy_(0, a.class_index, dbias_cols.to(db.scalar_type()));
    } else {
      db.copy_(dbias_cols);
    }
  }
  return {dx, dw, db, need_dm ? dm.to(a.row_margins.scalar_type()) : at::empty({0}, opts)};
}

template <typename Runtime>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> psi_op(const at::Tensor& cos,
                                                                              const at::Tensor& m1,
                                                                              const at::Tensor& m2,
                                                                              const at::Tensor& m3, int64_t margin_kind,
                                                                              int64_t theta_policy, double lambda) {
  TORCH_CHECK_VALUE(cos.scalar_type() == at::kFloat || cos.scalar_type() == at::kDouble,
                    "cos must be float32 or float64, got ", cos.scalar_type());
  for (const at::Tensor* t : {&m1, &m2, &m3}) {
    TORCH_CHECK_VALUE(t->sizes() == cos.sizes() && t->scalar_type() == cos.scalar_type() && t->device() == cos.device(),
                      "m1, m2, m3 must match cos (", cos.sizes(), ", ", cos.scalar_type(), ", ", cos.device(), ")");
  }
  const auto guard = Runtime::guard(cos.device());
  const at::Tensor c = cos.contiguous(), a = m1.contiguous(), b = m2.contiguous(), d = m3.contiguous();
  std::array<at::Tensor, 5> out;
  for (auto& t : out) t = at::empty_like(c);
  Runtime::check(margin_psi(c.data_ptr(), a.data_ptr(), b.data_ptr(), d.data_ptr(), c.numel(),
                            static_cast<int32_t>(margin_kind), static_cast<int32_t>(theta_policy), lambda,
                            c.scalar_type() == at::kDouble, out[0].data_ptr(), out[1].data_ptr(), out[2].data_ptr(),
                            out[3].data_ptr(), out[4].data_ptr(), Runtime::stream()));
  return {out[0], out[1], out[2], out[3], out[4]};
}

// Top-k classes a chunk of classes at a time: temporaries of B × chunk, never B × C.
template <typename Runtime>
std::tuple<at::Tensor, at::Tensor> topk_op(const at::Tensor& x, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias,
                                           const std::optional<at::Tensor>& class_index, int64_t k,
                                           int64_t class_offset, bool normalize_x, bool normalize_w, double s,
                                           int64_t subcenters) {
  at::NoGradGuard no_grad;
  TORCH_CHECK_VALUE(x.dim() == 2, "x must have shape [B, D], got ", x.sizes());
  const at::Tensor no_labels = at::full({x.size(0)}, -1, x.options().dtype(at::kLong));
  const int64_t local = weight.dim() == 2 && subcenters >= 1 ? weight.size(0) / subcenters : 0;
  const HeadArgs a = check_head_args(x, weight, no_labels, bias, std::nullopt, std::nullopt, class_index,
                                     topk_config(local, class_offset, normalize_x, normalize_w, s, subcenters));
  // inference, not a training step: checked on the host (index_select would assert on the device)
  if (a.class_index.defined() && !Runtime::capturing())
    check_class_index_values(Runtime::to_host(a.class_index), local);
  TORCH_CHECK_VALUE(k >= 1 && k <= a.columns, "k = ", k, " must lie in [1, ", a.columns, "] (the number of classes)");
  const auto guard = Runtime::guard(x.device());
  const auto acc = a.acc_dtype();
  const int64_t B = a.rows, K = subcenters;
  at::Tensor xs = a.x.to(acc);
  if (normalize_x) xs = xs * (s / at::linalg_vector_norm(xs, 2, {1}, true).clamp_min(1e-12));
  const int64_t chunk = std::max<int64_t>(1, (int64_t(64) << 20) / std::max<int64_t>(1, B * K * 4));
  at::Tensor vals = at::full({B, k}, -std::numeric_limits<double>::infinity(), xs.options());
  at::Tensor cols = at::full({B, k}, -1, xs.options().dtype(at::kLong));
  for (int64_t c0 = 0; c0 < a.columns; c0 += chunk) {
    const int64_t n = std::min(chunk, a.columns - c0);
    at::Tensor cls = a.class_index.defined() ? a.class_index.narrow(0, c0, n) : at::arange(c0, c0 + n, cols.options());
    at::Tensor rows = (cls.unsqueeze(1) * K + at::arange(K, cls.options()).unsqueeze(0)).reshape({-1});
    at::Tensor w = a.weight.index_select(0, rows).to(acc);
    if (normalize_w) w = w / at::linalg_vector_norm(w, 2, {1}, true).clamp_min(1e-12);
    at::Tensor z = at::mm(xs, w.t()).view({B, n, K}).amax(2);
    if (a.bias.defined())
      z = z + (a.class_index.defined() ? a.bias.index_select(0, cls) : a.bias.narrow(0, c0, n)).to(acc);
    const auto [top, pos] = at::cat({vals, z}, 1).topk(k, 1);
    cols = at::cat({cols, at::arange(c0, c0 + n, cols.options()).unsqueeze(0).expand({B, n})}, 1).gather(1, pos);
    vals = top;
  }
  at::Tensor cls = a.class_index.defined() ? a.class_index.index({cols.clamp_min(0)}) : cols;
  return {vals, at::where(cols.ge(0), cls + class_offset, at::full_like(cols, -1))};
}

}  // namespace marginops::cuda
