// The head optimizers' row ops on the CPU: row_step.h's update, one pass over each row.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../row_step_ops.h"

namespace marginops::row_step {
namespace {

struct CpuRun {
  static void run(const Params& p, const at::Tensor&) {
    dispatch(p, [&](auto kind, auto a, auto w, auto s) {
      using A = decltype(a);
      using W = decltype(w);
      using S = decltype(s);
      constexpr Kind K = decltype(kind)::value;
      const Hyper<A> h = hyper<A>(p);
      at::parallel_for(0, p.n, std::max<int64_t>(1, 4096 / p.D), [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) {
          const auto row = row_of<K, A>(p, i);
          for (int64_t d = 0; d < p.D; ++d) step_element<K, A, W, S>(p, h, i, row, d);
        }
      });
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(marginops, CPU, m) {
  m.impl("sgd_step_", &sgd_step<CpuRun>);
  m.impl("adamw_step_", &adamw_step<CpuRun>);
  m.impl("sgd_catch_up_", &sgd_catch_up<CpuRun>);
}

}  // namespace marginops::row_step
