// The narrow kernels for double, padded width 64 (see narrow_table.cuh: one
// translation unit per dtype and width, compiled in parallel, with no ATen header).
#include "narrow_table.cuh"

namespace stablenets {
namespace cuda_detail {
namespace narrow {
SN_NARROW_INSTANTIATE(double, 64)
}  // namespace narrow
}  // namespace cuda_detail
}  // namespace stablenets
