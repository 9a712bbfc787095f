// The head arguments of margin_ce_forward / margin_ce_backward, declared once. Each table row is
// one argument, in schema order; everything else is generated from the two tables:
//   MO_HEAD_SCHEMA        the schema fragment "Tensor x, ..., bool straight_through, " (marginops.cpp)
//   MO_HEAD_PARAMS        the C++ parameter list of every implementation (CPU, CUDA, emulation)
//   MO_HEAD_PARAM_NAMES   the same names, to forward the arguments
//   HeadConfig            one field per scalar (head_config.h), filled by check_head_args
// Python reads the names, types and order back from the registered schema (marginops/ops.py), so
// a new scalar option is one row of MO_HEAD_SCALARS, the math that reads cfg.<name>, and the field
// of marginops' OpConfig that sets it.
//
// Row formats:
//   MO_HEAD_TENSORS: X(kind, name)            kind: Tensor or OptTensor (None allowed)
//   MO_HEAD_SCALARS: X(kind, name, cfg_type)  kind: int, float or bool (the schema's type);
//                                             cfg_type: HeadConfig's field type (int64_t, int32_t,
//                                             double or bool; a narrower one is range-checked)
// No torch headers: the kernels include head_config.h, which includes this.
#pragma once

#include <cstdint>

// x [B, D]; weight [C·subcenters, D]; labels [B] int64 global class ids; bias [C];
// row_margins [B, 3] (m1, m2, m3 per row, overriding cfg's; combined margin only);
// curricular [B, 2] CurricularFace (τ_i, t_i): a non-target cosine c > τ_i becomes c·(t_i + c);
// class_index [K] int64 strictly increasing local classes: compute only those.
// clang-format off
#define MO_HEAD_TENSORS(X) \
  X(Tensor, x)             \
  X(Tensor, weight)        \
  X(Tensor, labels)        \
  X(OptTensor, bias)       \
  X(OptTensor, row_margins) \
  X(OptTensor, curricular) \
  X(OptTensor, class_index)
// clang-format on

// num_classes, class_offset: labels are global class ids in [0, num_classes) or ignore_index; this
//   call sees the classes [class_offset, class_offset + C) (a shard); with class_index, only those.
// margin_kind, theta_policy: MarginKind, ThetaPolicy of margin_math.h.
// s, m1, m2, m3, lambda_: the margin ψ's scale and parameters (margin_math.h).
// subcenters: K weight rows per class (sub-center ArcFace): class c owns rows c·K … c·K + K − 1
//   and its logit is the largest of theirs.
// interclass_filter: insightface's interclass_filtering_threshold t_f (0: off). With t_f > 0, a
//   non-label class whose cosine exceeds t_f gets logit exactly 0 (bias included), no gradient.
// straight_through: the target's ∂z/∂c is a·b (ψ′ taken as 1) and the margin parameters get no
//   gradient (insightface's ArcFace, which applies the margin under no_grad).
#define MO_HEAD_SCALARS(X)            \
  X(int, num_classes, int64_t)        \
  X(int, class_offset, int64_t)       \
  X(int, ignore_index, int64_t)       \
  X(int, margin_kind, int32_t)        \
  X(int, theta_policy, int32_t)       \
  X(bool, normalize_x, bool)          \
  X(bool, normalize_w, bool)          \
  X(float, s, double)                 \
  X(float, m1, double)                \
  X(float, m2, double)                \
  X(float, m3, double)                \
  X(float, lambda_, double)           \
  X(int, subcenters, int64_t)         \
  X(float, interclass_filter, double) \
  X(bool, straight_through, bool)

// ---- generated ----------------------------------------------------------------------------------

// A schema kind's C++ parameter type and its spelling in a schema.
#define MO_CPP_Tensor const at::Tensor&
#define MO_CPP_OptTensor const std::optional<at::Tensor>&
#define MO_CPP_int int64_t
#define MO_CPP_float double
#define MO_CPP_bool bool
#define MO_SCHEMA_Tensor "Tensor "
#define MO_SCHEMA_OptTensor "Tensor? "
#define MO_SCHEMA_int "int "
#define MO_SCHEMA_float "float "
#define MO_SCHEMA_bool "bool "

// Each item is emitted with a leading comma; MO_DROP_FIRST removes the first one.
#define MO_DROP_FIRST_(first, ...) __VA_ARGS__
#define MO_DROP_FIRST(...) MO_DROP_FIRST_(__VA_ARGS__)
#define MO_PARAM_T_(kind, name) , MO_CPP_##kind name
#define MO_PARAM_S_(kind, name, cfg_type) , MO_CPP_##kind name
#define MO_NAME_T_(kind, name) , name
#define MO_NAME_S_(kind, name, cfg_type) , name
#define MO_SCHEMA_T_(kind, name) MO_SCHEMA_##kind #name ", "
#define MO_SCHEMA_S_(kind, name, cfg_type) MO_SCHEMA_##kind #name ", "

#define MO_HEAD_PARAMS MO_DROP_FIRST(MO_HEAD_TENSORS(MO_PARAM_T_) MO_HEAD_SCALARS(MO_PARAM_S_))
#define MO_HEAD_PARAM_NAMES MO_DROP_FIRST(MO_HEAD_TENSORS(MO_NAME_T_) MO_HEAD_SCALARS(MO_NAME_S_))
#define MO_HEAD_TENSOR_PARAMS MO_DROP_FIRST(MO_HEAD_TENSORS(MO_PARAM_T_))
#define MO_HEAD_TENSOR_NAMES MO_DROP_FIRST(MO_HEAD_TENSORS(MO_NAME_T_))
// Ends with ", ": the op's own arguments follow.
#define MO_HEAD_SCHEMA MO_HEAD_TENSORS(MO_SCHEMA_T_) MO_HEAD_SCALARS(MO_SCHEMA_S_)
