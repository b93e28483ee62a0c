// The definition of kernel_table<T, S, D>() (declared in narrow_kernels.cuh):
// naming the kernels here instantiates them. In the CUDA build only the
// narrow_<dtype>_d<D>.cu files include this, each instantiating the tables of
// one (dtype, width) with SN_NARROW_INSTANTIATE (and the float files the
// reduced-storage tables too, SN_NARROW_INSTANTIATE_REDUCED); they include no
// ATen header, so nvcc's host pass and its pass per target architecture parse
// only the kernels (see narrow_host.h).
#pragma once

#include "narrow_kernels.cuh"

namespace stablenets {
namespace cuda_detail {
namespace narrow {

template <typename T, typename S, int D>
KernelTable<T, S> kernel_table() {
  KernelTable<T, S> t;
  t.fwd_resnet = k_fwd_resnet<T, S, D>;
  t.fwd_leapfrog = k_fwd_leapfrog<T, S, D>;
  t.fwd_verlet = k_fwd_verlet<T, S, D>;
  t.bwd_resnet = k_bwd_resnet<T, S, D>;
  t.bwd_leapfrog = k_bwd_leapfrog<T, S, D, false>;
  t.bwd_leapfrog_rev = k_bwd_leapfrog<T, S, D, true>;
  t.bwd_verlet = k_bwd_verlet<T, S, D, false>;
  t.bwd_verlet_rev = k_bwd_verlet<T, S, D, true>;
  return t;
}

// Explicit instantiation (in namespace stablenets::cuda_detail::narrow) of one
// (dtype, width): storage and compute in T.
#define SN_NARROW_INSTANTIATE(T, D) template KernelTable<T, T> kernel_table<T, T, D>();
// bfloat16 and float16 storage over float compute, width D.
#define SN_NARROW_INSTANTIATE_REDUCED(D)                                 \
  template KernelTable<float, bf16_t> kernel_table<float, bf16_t, D>(); \
  template KernelTable<float, fp16_t> kernel_table<float, fp16_t, D>();

}  // namespace narrow
}  // namespace cuda_detail
}  // namespace stablenets
