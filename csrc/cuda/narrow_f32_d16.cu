// The narrow kernels for float, padded width 16 (see narrow_host.h: one
// translation unit per dtype and width, compiled in parallel).
#define SN_NARROW_KERNELS_ONLY
#include "narrow_host.h"

namespace stablenets {
namespace cuda_detail {
namespace narrow {
SN_NARROW_INSTANTIATE(float, 16)
}  // namespace narrow
}  // namespace cuda_detail
}  // namespace stablenets
