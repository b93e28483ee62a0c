// CUDA registrations of every stablenets op. The definitions live in
// entry.cuh (checks, regime choice), narrow_*.cuh/.h and wide*.cuh.
#include <torch/library.h>

#include "entry.cuh"

TORCH_LIBRARY_IMPL(stablenets, CUDA, m) {
  SN_IMPL(m, "resnet_forward", &stablenets::cuda::resnet_forward);
  SN_IMPL(m, "resnet_backward", &stablenets::cuda::resnet_backward);
  SN_IMPL(m, "antisymmetric_forward", &stablenets::cuda::antisymmetric_forward);
  SN_IMPL(m, "antisymmetric_backward", &stablenets::cuda::antisymmetric_backward);
  SN_IMPL(m, "leapfrog_forward", &stablenets::cuda::leapfrog_forward);
  SN_IMPL(m, "leapfrog_backward", &stablenets::cuda::leapfrog_backward);
  SN_IMPL(m, "leapfrog_backward_reversible", &stablenets::cuda::leapfrog_backward_reversible);
  SN_IMPL(m, "verlet_forward", &stablenets::cuda::verlet_forward);
  SN_IMPL(m, "verlet_backward", &stablenets::cuda::verlet_backward);
  SN_IMPL(m, "verlet_backward_reversible", &stablenets::cuda::verlet_backward_reversible);
}
