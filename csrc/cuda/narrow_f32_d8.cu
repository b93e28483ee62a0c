// The narrow kernels for float, padded width 8: float storage, and bfloat16 and
// float16 storage over float compute (see narrow_table.cuh: one translation
// unit per dtype and width, compiled in parallel, with no ATen header).
#include "narrow_table.cuh"

namespace stablenets {
namespace cuda_detail {
namespace narrow {
SN_NARROW_INSTANTIATE(float, 8)
SN_NARROW_INSTANTIATE_REDUCED(8)
}  // namespace narrow
}  // namespace cuda_detail
}  // namespace stablenets
