// CUDA registrations of every stablenets op. The definitions live in
// entry.cuh (checks, regime choice), narrow_*.cuh/.h and wide*.cuh.
#include <torch/library.h>

#include "entry.cuh"

TORCH_LIBRARY_IMPL(stablenets, CUDA, m) {
  m.impl("resnet_forward", &stablenets::cuda::resnet_forward);
  m.impl("resnet_backward", &stablenets::cuda::resnet_backward);
  m.impl("antisymmetric_forward", &stablenets::cuda::antisymmetric_forward);
  m.impl("antisymmetric_backward", &stablenets::cuda::antisymmetric_backward);
  m.impl("leapfrog_forward", &stablenets::cuda::leapfrog_forward);
  m.impl("leapfrog_backward", &stablenets::cuda::leapfrog_backward);
  m.impl("leapfrog_backward_reversible", &stablenets::cuda::leapfrog_backward_reversible);
  m.impl("verlet_forward", &stablenets::cuda::verlet_forward);
  m.impl("verlet_backward", &stablenets::cuda::verlet_backward);
  m.impl("verlet_backward_reversible", &stablenets::cuda::verlet_backward_reversible);
}
