// C++ entry points of the CPU kernels, for the ctest program and for the op
// registrations. CUDA kernels follow the same signatures in stablenets::cuda.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <tuple>

#include "stablenets/reduced_precision.h"

namespace stablenets {

using T2 = std::tuple<at::Tensor, at::Tensor>;
using T3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using T4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// Reversible backwards: the four gradients, then the rebuilt forward inputs.
using T6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

#define SN_DECLARE_KERNELS(ns)                                                                  \
  namespace ns {                                                                                \
  T2 resnet_forward(const at::Tensor& y, const at::Tensor& weight, const at::Tensor& bias,      \
                    double step, c10::string_view activation, bool store);                       \
  T3 resnet_backward(const at::Tensor& grad_out, const at::Tensor& states,                      \
                     const at::Tensor& weight, const at::Tensor& bias, double step,             \
                     c10::string_view activation);                                              \
  T2 antisymmetric_forward(const at::Tensor& y, const at::Tensor& weight,                       \
                           const at::Tensor& bias, double step, double gamma,                   \
                           c10::string_view activation, bool store);                            \
  T3 antisymmetric_backward(const at::Tensor& grad_out, const at::Tensor& states,               \
                            const at::Tensor& weight, const at::Tensor& bias, double step,      \
                            double gamma, c10::string_view activation);                         \
  T3 leapfrog_forward(const at::Tensor& y, const at::Tensor& y_prev, const at::Tensor& weight,  \
                      const at::Tensor& bias, double step, c10::string_view activation,         \
                      bool store);                                                              \
  T4 leapfrog_backward(const at::Tensor& grad_y, const at::Tensor& grad_y_prev,                 \
                       const at::Tensor& states, const at::Tensor& weight,                      \
                       const at::Tensor& bias, double step, c10::string_view activation);       \
  T6 leapfrog_backward_reversible(const at::Tensor& grad_y, const at::Tensor& grad_y_prev,      \
                                  const at::Tensor& y, const at::Tensor& y_prev,                \
                                  const at::Tensor& weight, const at::Tensor& bias,             \
                                  double step, c10::string_view activation);                    \
  T3 verlet_forward(const at::Tensor& y, const at::Tensor& z, const at::Tensor& weight,         \
                    const at::Tensor& bias, double step, c10::string_view activation,           \
                    bool store);                                                                \
  T4 verlet_backward(const at::Tensor& grad_y, const at::Tensor& grad_z,                        \
                     const at::Tensor& states, const at::Tensor& weight, const at::Tensor& bias, \
                     double step, c10::string_view activation);                                 \
  T6 verlet_backward_reversible(const at::Tensor& grad_y, const at::Tensor& grad_z,             \
                                const at::Tensor& y, const at::Tensor& z,                       \
                                const at::Tensor& weight, const at::Tensor& bias, double step,  \
                                c10::string_view activation);                                   \
  }

SN_DECLARE_KERNELS(cpu)
SN_DECLARE_KERNELS(cuda)

#undef SN_DECLARE_KERNELS

}  // namespace stablenets
