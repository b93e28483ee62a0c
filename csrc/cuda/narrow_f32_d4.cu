// The narrow kernels for float, padded width 4 (see narrow_table.cuh: one
// translation unit per dtype and width, compiled in parallel, with no ATen header).
#include "narrow_table.cuh"

namespace stablenets {
namespace cuda_detail {
namespace narrow {
SN_NARROW_INSTANTIATE(float, 4)
}  // namespace narrow
}  // namespace cuda_detail
}  // namespace stablenets
