// Antisymmetric stack on the CPU (Haber & Ruthotto eq. 4.12): the ResNet stack
// with A_j = (K_j - K_j^T - gamma I) / 2. The d x d transform is negligible next
// to the stack, so it runs as ATen ops and the ResNet kernels do the rest.
#include <torch/library.h>

#include "resnet_impl.h"
#include "stablenets/checks.h"
#include "stablenets/kernels.h"

namespace stablenets {
namespace {

at::Tensor antisymmetric_weight(const at::Tensor& K, double gamma) {
  at::Tensor eye = at::eye(K.size(1), K.options());
  return (K - K.transpose(1, 2) - eye * gamma).mul_(0.5).contiguous();
}

}  // namespace

namespace cpu {

T2 antisymmetric_forward(const at::Tensor& y, const at::Tensor& weight, const at::Tensor& bias,
                         double step, double gamma, c10::string_view activation, bool store) {
  check_stack(y, weight, bias);
  check_step(step);
  check_gamma(gamma);
  return cpu_detail::resnet_forward_impl(y, antisymmetric_weight(weight, gamma), bias, step,
                                         parse_activation(activation), store);
}

T3 antisymmetric_backward(const at::Tensor& grad_out, const at::Tensor& states,
                          const at::Tensor& weight, const at::Tensor& bias, double step,
                          double gamma, c10::string_view activation) {
  check_stack(grad_out, weight, bias);
  check_states(states, 2, grad_out, weight);
  check_step(step);
  check_gamma(gamma);
  auto [gy, gA, gb] = cpu_detail::resnet_backward_impl(
      grad_out, states, antisymmetric_weight(weight, gamma), step, parse_activation(activation));
  // A = (K - K^T - gamma I) / 2  =>  dL/dK = (dL/dA - dL/dA^T) / 2
  at::Tensor gK = (gA - gA.transpose(1, 2)).mul_(0.5);
  return {gy, gK, gb};
}

}  // namespace cpu
}  // namespace stablenets

TORCH_LIBRARY_IMPL(stablenets, CPU, m) {
  m.impl("antisymmetric_forward", &stablenets::cpu::antisymmetric_forward);
  m.impl("antisymmetric_backward", &stablenets::cpu::antisymmetric_backward);
}
