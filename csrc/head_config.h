// The scalar arguments of the margin cross-entropy ops, as one plain struct (no torch headers):
// the CPU path, the CUDA launcher and the kernels' params all read it.
#pragma once

#include <cstdint>

namespace marginops {

struct HeadConfig {
  // Labels are global class ids in [0, num_classes) or ignore_index. This call sees the classes
  // [class_offset, class_offset + weight rows) (a shard); with class_index, only those rows of it.
  int64_t num_classes;
  int64_t class_offset;
  int64_t ignore_index;
  int32_t kind;    // MarginKind
  int32_t policy;  // ThetaPolicy
  bool normalize_x;
  bool normalize_w;
  double s;
  double m1, m2, m3;  // overridden per row by row_margins [B, 3] when given
  double lambda;
  // K weight rows per class (sub-center ArcFace): class c owns rows c·K … c·K + K − 1 and its
  // logit is the largest of theirs.
  int64_t subcenters;
  // insightface's interclass_filtering_threshold t_f (0: off). With t_f > 0, a non-label class
  // whose cosine c_ij exceeds t_f gets logit exactly 0 (bias included) and no gradient.
  double interclass_filter;
  // The target's ∂z/∂c is a·b (ψ′ taken as 1) and the margin parameters get no gradient:
  // insightface's ArcFace, which applies the margin under no_grad.
  bool straight_through;
};

}  // namespace marginops
