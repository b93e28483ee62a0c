// CUDA registrations of every stablenets op. The definitions live in
// entry.cuh (checks, regime choice), narrow_*.cuh/.h and wide*.cuh.
#include <torch/library.h>

#include "entry.cuh"

TORCH_LIBRARY_IMPL(stablenets, CUDA, m) {
  // bfloat16/float16: narrow stacks natively, wide ones on float32 copies (entry.cuh).
  constexpr auto native = &stablenets::cuda::narrow_reduced_native;
  SN_IMPL_NATIVE(m, "resnet_forward", &stablenets::cuda::resnet_forward, native);
  SN_IMPL_NATIVE(m, "resnet_backward", &stablenets::cuda::resnet_backward, native);
  SN_IMPL_NATIVE(m, "antisymmetric_forward", &stablenets::cuda::antisymmetric_forward, native);
  SN_IMPL_NATIVE(m, "antisymmetric_backward", &stablenets::cuda::antisymmetric_backward, native);
  SN_IMPL_NATIVE(m, "leapfrog_forward", &stablenets::cuda::leapfrog_forward, native);
  SN_IMPL_NATIVE(m, "leapfrog_backward", &stablenets::cuda::leapfrog_backward, native);
  SN_IMPL_NATIVE(m, "leapfrog_backward_reversible", &stablenets::cuda::leapfrog_backward_reversible,
                 native);
  SN_IMPL_NATIVE(m, "verlet_forward", &stablenets::cuda::verlet_forward, native);
  SN_IMPL_NATIVE(m, "verlet_backward", &stablenets::cuda::verlet_backward, native);
  SN_IMPL_NATIVE(m, "verlet_backward_reversible", &stablenets::cuda::verlet_backward_reversible,
                 native);
}
