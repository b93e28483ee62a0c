// The ResNet stack kernels on already-checked arguments, shared with the
// antisymmetric stack (which runs them on its transformed weights).
#pragma once

#include "stablenets/activation.h"
#include "stablenets/kernels.h"

namespace stablenets {
namespace cpu_detail {

// Whether the kernels below serve a bfloat16/float16 call themselves (wide stacks:
// GEMMs in the reduced dtype) rather than through InFloat32's float32 copies.
// first: y or grad_out.
bool resnet_reduced_native(const at::Tensor& first);

// gamma: nullptr for the ResNet stack; for the antisymmetric stack, its gamma,
// and the layers use W_j = (K_j - K_j^T - gamma I) / 2.
T2 resnet_forward_impl(const at::Tensor& y, const at::Tensor& K, const at::Tensor& b, double step,
                       Act act, bool store, const double* gamma);
// Returns (grad_y, grad_K, grad_b), grad_K with respect to K itself.
T3 resnet_backward_impl(const at::Tensor& grad_out, const at::Tensor& states, const at::Tensor& K,
                        double step, Act act, const double* gamma);

}  // namespace cpu_detail
}  // namespace stablenets
