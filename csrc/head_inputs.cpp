#include "head_inputs.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <mutex>
#include <type_traits>
#include <vector>

#include "margin_math.h"

namespace marginops {
namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(is_supported_float(t.scalar_type()), name, " must be float16, bfloat16, float32 or float64, got ",
                    t.scalar_type());
}

void check_device(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
}

const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return "float16";
    case at::kBFloat16:
      return "bfloat16";
    case at::kFloat:
      return "float32";
    case at::kDouble:
      return "float64";
    default:
      return c10::toString(t);
  }
}

// The one dtype rule (marginops/_checks.py dtype_pair_error): equal dtypes, or a float32 weight
// with float16/bfloat16 x. Same message as the Python check.
void check_dtype_pair(const at::Tensor& x, const at::Tensor& weight) {
  const at::ScalarType xt = x.scalar_type(), wt = weight.scalar_type();
  const bool ok = xt == wt || (wt == at::kFloat && (xt == at::kHalf || xt == at::kBFloat16));
  TORCH_CHECK_VALUE(ok, "x is ", dtype_name(xt), " but weight is ", dtype_name(wt),
                    ": use equal dtypes, or float32 weight with float16/bfloat16 x");
}

}  // namespace

at::ScalarType HeadArgs::acc_dtype() const {
  return x.scalar_type() == at::kDouble && weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

HeadArgs check_head_args(MO_HEAD_PARAMS) {
  HeadConfig cfg;
#define MO_FILL_(kind, name, cfg_type)                                                                    \
  if constexpr (std::is_integral_v<cfg_type> && !std::is_same_v<cfg_type, bool>) {                        \
    TORCH_CHECK_VALUE(static_cast<MO_CPP_##kind>(static_cast<cfg_type>(name)) == name, #name " = ", name, \
                      " is out of range");                                                                \
  }                                                                                                       \
  cfg.name = static_cast<cfg_type>(name);
  MO_HEAD_SCALARS(MO_FILL_)
#undef MO_FILL_
  return check_head_args(MO_HEAD_TENSOR_NAMES, cfg);
}

HeadConfig topk_config(int64_t local_classes, int64_t class_offset, bool normalize_x, bool normalize_w, double s,
                       int64_t subcenters) {
  HeadConfig cfg;
  cfg.num_classes = class_offset + std::max<int64_t>(local_classes, 1);
  cfg.class_offset = class_offset;
  cfg.ignore_index = -1;
  cfg.margin_kind = kIdentity;
  cfg.theta_policy = kNone;
  cfg.normalize_x = normalize_x;
  cfg.normalize_w = normalize_w;
  cfg.s = s;
  cfg.m1 = 1.0;
  cfg.subcenters = subcenters;
  return cfg;
}

HeadArgs check_head_args(MO_HEAD_TENSOR_PARAMS, const HeadConfig& cfg) {
#define MO_LOCAL_(kind, name, cfg_type) [[maybe_unused]] const cfg_type name = cfg.name;
  MO_HEAD_SCALARS(MO_LOCAL_)
#undef MO_LOCAL_
  TORCH_CHECK_VALUE(x.dim() == 2, "x must have shape [B, D], got ", x.sizes());
  check_float(x, "x");
  const int64_t B = x.size(0), D = x.size(1);
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == D, "weight must have shape [C, ", D, "] to match x ",
                    x.sizes(), ", got ", weight.sizes());
  check_float(weight, "weight");
  check_dtype_pair(x, weight);
  check_device(weight, x, "weight");
  TORCH_CHECK_VALUE(subcenters >= 1, "subcenters must be >= 1, got ", subcenters);
  TORCH_CHECK_VALUE(weight.size(0) % subcenters == 0, "weight has ", weight.size(0),
                    " rows, not a multiple of subcenters = ", subcenters);
  const int64_t C = weight.size(0) / subcenters;  // local classes
  TORCH_CHECK_VALUE(!at::isFloatingType(labels.scalar_type()) && labels.scalar_type() != at::kBool,
                    "labels must hold integer class ids, got dtype ", labels.scalar_type());
  TORCH_CHECK_VALUE(labels.scalar_type() == at::kLong, "labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == B, "labels must have shape [", B, "] to match x ", x.sizes(),
                    ", got ", labels.sizes());
  check_device(labels, x, "labels");

  HeadArgs a;
  a.x = x.contiguous();
  a.weight = weight.contiguous();
  a.labels = labels.contiguous();
  a.rows = B;
  a.dim = D;
  a.columns = C;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == C, "bias must have shape [", C,
                      "] (one per class) to match weight ", weight.sizes(), ", got ", bias->sizes());
    check_float(*bias, "bias");
    check_device(*bias, x, "bias");
    a.bias = bias->contiguous();
  }
  if (row_margins.has_value() && row_margins->defined()) {
    TORCH_CHECK_VALUE(margin_kind == kCombined,
                      "row_margins are supported by the combined margin (kind 1) only, got kind ", margin_kind);
    TORCH_CHECK_VALUE(row_margins->dim() == 2 && row_margins->size(0) == B && row_margins->size(1) == 3,
                      "row_margins must have shape [", B, ", 3] (m1, m2, m3 per row), got ", row_margins->sizes());
    check_float(*row_margins, "row_margins");
    check_device(*row_margins, x, "row_margins");
    a.row_margins = row_margins->contiguous();
  }
  if (curricular.has_value() && curricular->defined()) {
    TORCH_CHECK_VALUE(normalize_x && normalize_w, "curricular needs normalized features and weights (c = z / s)");
    TORCH_CHECK_VALUE(curricular->dim() == 2 && curricular->size(0) == B && curricular->size(1) == 2,
                      "curricular must have shape [", B, ", 2] (threshold, t per row), got ", curricular->sizes());
    check_float(*curricular, "curricular");
    check_device(*curricular, x, "curricular");
    a.curricular = curricular->contiguous();
  }
  if (class_index.has_value() && class_index->defined()) {
    TORCH_CHECK_VALUE(class_index->dim() == 1 && class_index->scalar_type() == at::kLong,
                      "class_index must be a 1-D int64 tensor, got ", class_index->sizes(), " ",
                      class_index->scalar_type());
    TORCH_CHECK_VALUE(class_index->size(0) <= C, "class_index has ", class_index->size(0),
                      " entries but weight holds only ", C, " classes");
    check_device(*class_index, x, "class_index");
    a.class_index = class_index->contiguous();
    a.columns = class_index->size(0);
  }

  TORCH_CHECK_VALUE(num_classes >= 1, "num_classes must be positive, got ", num_classes);
  TORCH_CHECK_VALUE(class_offset >= 0 && class_offset + C <= num_classes, "class_offset = ", class_offset, " with ", C,
                    " weight rows does not fit in num_classes = ", num_classes);
  TORCH_CHECK_VALUE(margin_kind >= kIdentity && margin_kind <= kMultiplicative, "margin_kind must be 0, 1 or 2, got ",
                    margin_kind);
  TORCH_CHECK_VALUE(theta_policy >= kFallback && theta_policy <= kClip, "theta_policy must be in [0, 4], got ",
                    theta_policy);
  TORCH_CHECK_VALUE(std::isfinite(s) && s > 0, "s must be a positive finite scale, got ", s);
  TORCH_CHECK_VALUE(std::isfinite(lambda_) && lambda_ >= 0, "lambda_ must be >= 0, got ", lambda_);
  TORCH_CHECK_VALUE(std::isfinite(m1) && std::isfinite(m2) && std::isfinite(m3),
                    "margins must be finite, got m1 = ", m1, ", m2 = ", m2, ", m3 = ", m3);
  if (margin_kind == kMultiplicative) {
    TORCH_CHECK_VALUE(m1 >= 1 && std::floor(m1) == m1, "the multiplicative margin m must be a positive integer, got ",
                      m1);
  }
  TORCH_CHECK_VALUE(std::isfinite(interclass_filter) && interclass_filter >= 0 && interclass_filter <= 1,
                    "interclass_filter must lie in [0, 1] (0: off), got ", interclass_filter);
  TORCH_CHECK_VALUE(interclass_filter == 0 || (normalize_x && normalize_w),
                    "interclass_filter needs normalized features and weights (it compares cosines)");
  a.cfg = cfg;
  return a;
}

at::Tensor check_row_grad(const std::optional<at::Tensor>& grad, const HeadArgs& args, const char* name) {
  if (!grad.has_value() || !grad->defined()) return at::Tensor();
  TORCH_CHECK_VALUE(grad->dim() == 1 && grad->size(0) == args.rows, name, " must have shape [", args.rows, "], got ",
                    grad->sizes());
  check_device(*grad, args.x, name);
  return grad->contiguous();
}

void check_backend(int64_t backend, int64_t workspace_bytes) {
  TORCH_CHECK_VALUE(backend >= kAuto && backend <= kTiles, "backend must be 0 (auto), 1 (chunked) or 2 (tiles), got ",
                    backend);
  TORCH_CHECK_VALUE(workspace_bytes >= 0, "workspace_bytes must be >= 0 (0: the default, ", kDefaultWorkspaceBytes,
                    " bytes), got ", workspace_bytes);
}

size_t workspace_budget(int64_t workspace_bytes) {
  return static_cast<size_t>(workspace_bytes == 0 ? kDefaultWorkspaceBytes : workspace_bytes);
}

void check_grad_skip(double grad_skip) {
  TORCH_CHECK_VALUE(grad_skip >= 0.0 && grad_skip < 1.0, "grad_skip must lie in [0, 1), got ", grad_skip);
}

void raise_bad_label(int64_t index, int64_t value, int64_t num_classes, int64_t ignore_index, const char* where) {
  TORCH_CHECK_VALUE(false, "labels[", index, "] = ", value, " is out of range: class ids must lie in [0, ", num_classes,
                    ") or equal ignore_index = ", ignore_index, where);
  abort();  // not reached
}

void raise_bad_class_index(int64_t index, int64_t value, int64_t local_classes, const char* where) {
  TORCH_CHECK_VALUE(false, "class_index[", index, "] = ", value, " is not a class of weight (", local_classes,
                    " classes)", where);
  abort();
}

void raise_unsorted_class_index(int64_t index, int64_t previous, int64_t value, const char* where) {
  TORCH_CHECK_VALUE(false, "class_index must be strictly increasing: class_index[", index - 1, "] = ", previous,
                    ", class_index[", index, "] = ", value, where);
  abort();
}

void check_label_values(const at::Tensor& labels_cpu, const HeadConfig& cfg) {
  const int64_t* y = labels_cpu.data_ptr<int64_t>();
  const int64_t n = labels_cpu.numel();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = y[i];
    if (v != cfg.ignore_index && (v < 0 || v >= cfg.num_classes))
      raise_bad_label(i, v, cfg.num_classes, cfg.ignore_index);
  }
}

void check_class_index_values(const at::Tensor& class_index_cpu, int64_t local_classes) {
  const int64_t* idx = class_index_cpu.data_ptr<int64_t>();
  const int64_t n = class_index_cpu.numel();
  for (int64_t k = 0; k < n; ++k) {
    if (idx[k] < 0 || idx[k] >= local_classes) raise_bad_class_index(k, idx[k], local_classes);
    if (k > 0 && idx[k] <= idx[k - 1]) raise_unsorted_class_index(k, idx[k - 1], idx[k]);
  }
}

namespace {
std::atomic<bool> g_sync_checks{false};
std::mutex g_checkers_mutex;
std::vector<ErrorChecker>& checkers() {
  static std::vector<ErrorChecker> list;
  return list;
}
}  // namespace

bool sync_checks() {
  return g_sync_checks.load();
}
void set_sync_checks(bool enabled) {
  g_sync_checks.store(enabled);
}

void add_error_checker(ErrorChecker checker) {
  std::lock_guard<std::mutex> lock(g_checkers_mutex);
  checkers().push_back(checker);
}

void run_error_checkers() {
  std::vector<ErrorChecker> list;
  {
    std::lock_guard<std::mutex> lock(g_checkers_mutex);
    list = checkers();
  }
  for (ErrorChecker f : list) f();
}

at::Tensor target_columns(const at::Tensor& labels_cpu, const at::Tensor& class_index_cpu, const HeadConfig& cfg,
                          int64_t columns) {
  const int64_t n = labels_cpu.numel();
  at::Tensor out = at::empty({n}, labels_cpu.options());
  const int64_t* y = labels_cpu.data_ptr<int64_t>();
  int64_t* t = out.data_ptr<int64_t>();
  const int64_t* idx = class_index_cpu.defined() ? class_index_cpu.data_ptr<int64_t>() : nullptr;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t local = y[i] == cfg.ignore_index ? -1 : y[i] - cfg.class_offset;
    int64_t col = -1;
    if (idx != nullptr) {
      const int64_t* pos = std::lower_bound(idx, idx + columns, local);
      if (local >= 0 && pos != idx + columns && *pos == local) col = pos - idx;
    } else if (local >= 0 && local < columns) {
      col = local;
    }
    t[i] = col;
  }
  return out;
}

}  // namespace marginops
