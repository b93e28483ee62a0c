// Convolutional stacks on the CPU: ATen (oneDNN) convolutions plus the fused
// elementwise passes of conv_elementwise.h, run plane by plane (one (b, c)
// plane has one bias value, so the inner loop is a plain vectorisable run
// over H*W elements). The layer loops live in conv_stack.h.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "stablenets/conv_stack.h"

namespace stablenets {
namespace cpu_detail {

struct ConvLauncher {
  static constexpr bool kHoistAct = true;

  template <class Op, typename T>
  static void launch(const Op& op, const at::Tensor& like, const T* bias) {
    const int64_t B = like.size(0), C = like.size(1);
    if (B * C == 0) return;
    const int64_t hw = like.numel() / (B * C);
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(hw, 1));
    at::parallel_for(0, B * C, grain, [&](int64_t p0, int64_t p1) {
      const Op o = op;
      for (int64_t p = p0; p < p1; ++p) {
        const T b = bias ? bias[p % C] : T(0);
        const int64_t e1 = (p + 1) * hw;
#pragma omp simd
        for (int64_t e = p * hw; e < e1; ++e) o(e, b);
      }
    });
  }
};

}  // namespace cpu_detail
}  // namespace stablenets

TORCH_LIBRARY_IMPL(stablenets, CPU, m) {
  SN_REGISTER_CONV_OPS(m, ::stablenets::cpu_detail::ConvLauncher);
}
