// Antisymmetric stack on the CPU (Haber & Ruthotto eq. 4.12): the ResNet stack
// with A_j = (K_j - K_j^T - gamma I) / 2 (resnet.cpp applies the transform).
#include <torch/library.h>

#include "resnet_impl.h"
#include "stablenets/checks.h"
#include "stablenets/kernels.h"

namespace stablenets {

namespace cpu {

T2 antisymmetric_forward(const at::Tensor& y, const at::Tensor& weight, const at::Tensor& bias,
                         double step, double gamma, c10::string_view activation, bool store) {
  check_stack(y, weight, bias, /*float32_params=*/true);
  check_step(step);
  check_gamma(gamma);
  return cpu_detail::resnet_forward_impl(y, weight, bias, step, parse_activation(activation),
                                         store, &gamma);
}

T3 antisymmetric_backward(const at::Tensor& grad_out, const at::Tensor& states,
                          const at::Tensor& weight, const at::Tensor& bias, double step,
                          double gamma, c10::string_view activation) {
  check_stack(grad_out, weight, bias, /*float32_params=*/true);
  check_states(states, 2, grad_out, weight);
  check_step(step);
  check_gamma(gamma);
  return cpu_detail::resnet_backward_impl(grad_out, states, weight, step,
                                          parse_activation(activation), &gamma);
}

}  // namespace cpu
}  // namespace stablenets

TORCH_LIBRARY_IMPL(stablenets, CPU, m) {
  SN_IMPL_NATIVE(m, "antisymmetric_forward", &stablenets::cpu::antisymmetric_forward,
                 &stablenets::cpu_detail::resnet_reduced_native);
  SN_IMPL_NATIVE(m, "antisymmetric_backward", &stablenets::cpu::antisymmetric_backward,
                 &stablenets::cpu_detail::resnet_reduced_native);
}
