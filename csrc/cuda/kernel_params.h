// The CUDA kernels' shared interface: one plain params struct that both backends' kernels read
// (tiles/, chunked/), the device error record, and the entry points they share (dtype support,
// margin_psi). No torch headers, so CI compile-checks the kernels with nvcc alone; the launchers
// (launch.h, tiles/tile_launch.h, chunked/chunked_launch.h) bind tensors to it.
//
// Shapes (row-major, contiguous):
//   x [B, D] x_dtype, weight [weight_rows, D] w_dtype, labels [B] int64,
//   class_index [C] int64 (local classes, strictly increasing) or null,
//   bias [C] acc (already gathered by class_index), row_margins [B, 3] acc, curricular [B, 2] acc.
// "acc" is double when x and weight are both float64 (acc_double), else float.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../head_config.h"

namespace marginops::cuda {

enum DType : int32_t { kHalf = 0, kBFloat16 = 1, kFloat = 2, kDouble = 3 };

// A bad index a kernel met (the one recorded first, not necessarily the lowest): a label outside [0, num_classes) that
// is not ignore_index, or a class_index entry outside the weight's classes or out of order. It lives in host memory
// mapped into the device: row_prep_kernel writes it, the launcher reads it at the next call (or at check_errors())
// without synchronizing and raises the ValueError the host check raises. kind is written last; claimed makes the first
// finder the only writer.
enum ErrorKind : int32_t { kNoError = 0, kBadLabel = 1, kBadClassIndex = 2, kUnsortedClassIndex = 3 };
struct DeviceError {
  int32_t claimed;
  int32_t kind;
  int64_t index, value;
  int64_t limit;   // num_classes (labels), local classes (class_index), class_index[index − 1]
  int64_t ignore;  // ignore_index (labels)
};

struct HeadParams {
  int64_t B = 0, D = 0;
  int64_t C = 0;            // classes computed by this call
  int64_t K = 1;            // weight rows per class
  int64_t weight_rows = 0;  // rows of weight (local classes · K)
  DType x_dtype = kFloat, w_dtype = kFloat;
  bool acc_double = false;
  bool allow_tf32 = false;  // float32 products may run on tensor cores as TF32 (torch's allow_tf32)
  const void* x = nullptr;
  const void* w = nullptr;
  const int64_t* labels = nullptr;
  const int64_t* class_index = nullptr;
  const void* bias = nullptr;
  const void* row_margins = nullptr;
  const void* curricular = nullptr;
  HeadConfig cfg{};
  DeviceError* error = nullptr;  // where row_prep_kernel records a bad label or class_index

  // Workspace, sized by workspace_bytes(): per-row prepass data and per-weight-row norms.
  void* rows = nullptr;             // RowInfo<acc>[B]
  void* w_norm = nullptr;           // acc [C·K]
  int splits = 1;                   // class splits of the forward and dx passes
  void* partial = nullptr;          // acc [splits, B, 4] (max, sum-exp, logit sum, best logit)
  int64_t* partial_best = nullptr;  // [splits, B] best computed column

  // Forward outputs, [B]: acc, best_class int64.
  void* lse = nullptr;
  void* target_logit = nullptr;
  void* logit_sum = nullptr;
  void* best_logit = nullptr;
  int64_t* best_class = nullptr;

  // Backward inputs (acc [B] or null = zero) and outputs.
  const void* g_lse = nullptr;
  const void* g_target = nullptr;
  const void* g_sum = nullptr;
  const void* lse_in = nullptr;  // the forward's lse, acc [B]
  double grad_skip = 0;          // see margin_ce_backward's schema; 0: every tile (exact)
  void* dx_part = nullptr;       // acc [splits, B, D]
  void* rsum_part = nullptr;     // acc [splits, B]
  void* dx = nullptr;            // x_dtype [B, D], or null
  void* dw = nullptr;            // w_dtype [weight_rows, D], or null (rows not computed: caller zeroes)
  void* dbias = nullptr;         // acc [C], or null
  void* dm = nullptr;            // acc [B, 3], or null
};

// Whether the (x, weight) dtype pair has kernels: equal dtypes, or float32 weight with float16 /
// bfloat16 features (mixed precision as users train).
bool supported_dtypes(DType x, DType w);

// ψ elementwise (margin_psi op): c, m1, m2, m3 and the five outputs are acc [n].
cudaError_t margin_psi(const void* c, const void* m1, const void* m2, const void* m3, int64_t n, int32_t kind,
                       int32_t policy, double lambda, bool is_double, void* out_value, void* out_dc, void* out_dm1,
                       void* out_dm2, void* out_dm3, cudaStream_t stream);

}  // namespace marginops::cuda
