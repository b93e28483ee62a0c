// The definition of kernel_table<T, D>() (declared in narrow_kernels.cuh):
// naming the kernels here instantiates them. In the CUDA build only the
// narrow_<dtype>_d<D>.cu files include this, each instantiating one pair with
// SN_NARROW_INSTANTIATE; they include no ATen header, so nvcc's host pass and
// its pass per target architecture parse only the kernels (see narrow_host.h).
#pragma once

#include "narrow_kernels.cuh"

namespace stablenets {
namespace cuda_detail {
namespace narrow {

template <typename T, int D>
KernelTable<T> kernel_table() {
  KernelTable<T> t;
  t.fwd_resnet = k_fwd_resnet<T, D>;
  t.fwd_leapfrog = k_fwd_leapfrog<T, D>;
  t.fwd_verlet = k_fwd_verlet<T, D>;
  t.bwd_resnet = k_bwd_resnet<T, D>;
  t.bwd_leapfrog = k_bwd_leapfrog<T, D, false>;
  t.bwd_leapfrog_rev = k_bwd_leapfrog<T, D, true>;
  t.bwd_verlet = k_bwd_verlet<T, D, false>;
  t.bwd_verlet_rev = k_bwd_verlet<T, D, true>;
  return t;
}

// Explicit instantiation (in namespace stablenets::cuda_detail::narrow) of one pair.
#define SN_NARROW_INSTANTIATE(T, D) template KernelTable<T> kernel_table<T, D>();

}  // namespace narrow
}  // namespace cuda_detail
}  // namespace stablenets
