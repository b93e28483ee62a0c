// The narrow kernels for double, padded width 16 (see narrow_host.h: one
// translation unit per dtype and width, compiled in parallel).
#define SN_NARROW_KERNELS_ONLY
#include "narrow_host.h"

namespace stablenets {
namespace cuda_detail {
namespace narrow {
SN_NARROW_INSTANTIATE(double, 16)
}  // namespace narrow
}  // namespace cuda_detail
}  // namespace stablenets
