// The scalar arguments of the margin cross-entropy ops, as one plain struct (no torch headers):
// the CPU path, the CUDA launchers and the kernels' params all read it. One field per row of
// MO_HEAD_SCALARS (head_params.h, which says what each means), of the row's cfg_type; zero-
// initialized, every option off.
#pragma once

#include <cstdint>

#include "head_params.h"

namespace marginops {

#define MO_CONFIG_FIELD_(kind, name, cfg_type) cfg_type name{};
struct HeadConfig {
  MO_HEAD_SCALARS(MO_CONFIG_FIELD_)
};
#undef MO_CONFIG_FIELD_

}  // namespace marginops
