// The ResNet stack kernels on already-checked arguments, shared with the
// antisymmetric stack (which runs them on its transformed weights).
#pragma once

#include "stablenets/activation.h"
#include "stablenets/kernels.h"

namespace stablenets {
namespace cpu_detail {

T2 resnet_forward_impl(const at::Tensor& y, const at::Tensor& K, const at::Tensor& b, double step,
                       Act act, bool store);
// Returns (grad_y, grad_K, grad_b) for the weights K the forward used.
T3 resnet_backward_impl(const at::Tensor& grad_out, const at::Tensor& states, const at::Tensor& K,
                        double step, Act act);

}  // namespace cpu_detail
}  // namespace stablenets
