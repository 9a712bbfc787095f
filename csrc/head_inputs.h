// Argument checking shared by the CPU implementation and the CUDA launcher. Every failure is a
// ValueError in Python that names the argument and shows the value or shape it expected.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "head_config.h"

namespace marginops {

// Arguments of margin_ce_forward / margin_ce_backward after checking; tensors are contiguous.
struct HeadArgs {
  at::Tensor x;            // [B, D] float16/bfloat16/float32/float64
  at::Tensor weight;       // [C, D] any of those dtypes
  at::Tensor labels;       // [B] int64 global class ids
  at::Tensor bias;         // [C] or undefined
  at::Tensor row_margins;  // [B, 3] (m1, m2, m3 per row) or undefined
  // [B, 2] CurricularFace (τ_i, t_i): a non-target cosine c > τ_i becomes c·(t_i + c); or undefined
  at::Tensor curricular;
  at::Tensor class_index;  // [K] int64 strictly increasing local classes, or undefined
  HeadConfig cfg;
  int64_t rows;     // B
  int64_t dim;      // D
  int64_t columns;  // classes this call computes: K with class_index, else C / subcenters

  // The dtype of all arithmetic: float64 when x and weight are both float64, else float32.
  at::ScalarType acc_dtype() const;
};

// The head arguments (head_params.h's tables) checked, the scalars into a HeadConfig (a value
// that does not fit its field's type is refused). The second form takes the scalars as a
// HeadConfig (callers that build one: top-k).
HeadArgs check_head_args(MO_HEAD_PARAMS);
HeadArgs check_head_args(MO_HEAD_TENSOR_PARAMS, const HeadConfig& cfg);

// margin_topk's HeadConfig: no margin and no labels, the classes [class_offset, class_offset +
// local_classes) of a one-shard head.
HeadConfig topk_config(int64_t local_classes, int64_t class_offset, bool normalize_x, bool normalize_w, double s,
                       int64_t subcenters);

// A per-row gradient of the backward op: [B] on x's device, or undefined.
at::Tensor check_row_grad(const std::optional<at::Tensor>& grad, const HeadArgs& args, const char* name);

// The ops' `backend` argument: auto (the device's default: CUDA's chunked, the CPU's tiled path),
// or one of CUDA's two (cuda/chunked/, cuda/tiles/); and `workspace_bytes`, the chunked backend's budget for all its
// extra memory (0: kDefaultWorkspaceBytes).
enum Backend : int64_t { kAuto = 0, kChunked = 1, kTiles = 2 };
constexpr int64_t kDefaultWorkspaceBytes = int64_t(64) << 20;
void check_backend(int64_t backend, int64_t workspace_bytes);
size_t workspace_budget(int64_t workspace_bytes);

// The backward's grad_skip threshold: in [0, 1).
void check_grad_skip(double grad_skip);

// Label values and class_index order, read on the host. Raises on the first bad entry.
void check_label_values(const at::Tensor& labels_cpu, const HeadConfig& cfg);
void check_class_index_values(const at::Tensor& class_index_cpu, int64_t local_classes);

// The ValueErrors of those checks, one message each, for the host check and for a bad value a
// CUDA kernel recorded (`where` is appended: how it was found).
[[noreturn]] void raise_bad_label(int64_t index, int64_t value, int64_t num_classes, int64_t ignore_index,
                                  const char* where = "");
[[noreturn]] void raise_bad_class_index(int64_t index, int64_t value, int64_t local_classes, const char* where = "");
[[noreturn]] void raise_unsorted_class_index(int64_t index, int64_t previous, int64_t value, const char* where = "");

// Whether the CUDA ops also check labels and class_index on the host before launching (a copy to
// the host and a synchronization per call: for debugging). Off by default: the kernels check them
// and the error is raised at the next call or at check_errors() (marginops.set_sync_checks).
bool sync_checks();
void set_sync_checks(bool enabled);

// What check_errors() runs: each registered backend's check of what its kernels recorded
// (synchronizing first). The CUDA launcher registers one when it loads.
using ErrorChecker = void (*)();
void add_error_checker(ErrorChecker checker);
void run_error_checkers();

// The column of each row's target among the computed classes, or -1 when the row is ignored or
// its class is not among them (another shard's, or not sampled). Host tensors in and out.
at::Tensor target_columns(const at::Tensor& labels_cpu, const at::Tensor& class_index_cpu, const HeadConfig& cfg,
                          int64_t columns);

}  // namespace marginops
