// Argument checks shared by every backend. Messages name the argument and what
// was expected, so a bad call fails with an error a user can act on.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <string>

#include "stablenets/activation.h"

namespace stablenets {

inline Act parse_activation(c10::string_view name) {
  if (name == "tanh") return Act::Tanh;
  if (name == "relu") return Act::Relu;
  if (name == "identity") return Act::Identity;
  if (name == "sigmoid") return Act::Sigmoid;
  if (name == "softplus") return Act::Softplus;
  if (name == "leaky_relu") return Act::LeakyRelu;
  if (name == "silu") return Act::Silu;
  TORCH_CHECK_VALUE(false,
                    "activation: expected one of 'tanh', 'relu', 'identity', 'sigmoid', "
                    "'softplus', 'leaky_relu', 'silu', got '",
                    std::string(name.data(), name.size()), "'");
  return Act::Identity;
}

inline void check_step(double step) {
  TORCH_CHECK_VALUE(std::isfinite(step) && step > 0.0,
                    "step: expected a finite positive number, got ", step);
}

inline void check_float_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), name, ": expected a tensor, got None");
  // bfloat16/float16 reach the kernels' checks only in calls with mixed dtypes
  // (reduced_precision.h runs one-dtype calls in float32), which a later check refuses.
  const at::ScalarType s = t.scalar_type();
  TORCH_CHECK_VALUE(s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf,
                    name, ": expected a float32, float64, bfloat16 or float16 tensor, got ", s);
}

// Weight and bias against y, once their own shapes are checked: weight.size(1)
// is y's `unit` count (features, or channels of a convolutional stack), bias is
// (layers, unit), and both share y's dtype and device. float32_params: the op also
// takes float32 weight and bias with a bfloat16/float16 y on the CPU (every stack,
// dense and conv: torch.autocast on the CPU hands them their float32 parameters
// uncast; they return float32 parameter gradients).
inline void check_params_like_y(const at::Tensor& y, const at::Tensor& weight,
                                const at::Tensor& bias, const char* unit,
                                bool float32_params = false) {
  TORCH_CHECK_VALUE(weight.size(1) == y.size(1), "weight: expected ", unit, " = ", y.size(1),
                    " (from y of shape ", y.sizes(), "), got shape ", weight.sizes());
  TORCH_CHECK_VALUE(bias.dim() == 2 && bias.size(0) == weight.size(0) &&
                        bias.size(1) == weight.size(1),
                    "bias: expected shape (", weight.size(0), ", ", weight.size(1),
                    ") = (layers, ", unit, "), got ", bias.sizes());
  const bool reduced_y = y.scalar_type() == at::kBFloat16 || y.scalar_type() == at::kHalf;
  if (float32_params && reduced_y && y.is_cpu()) {
    const at::ScalarType t = weight.scalar_type();
    TORCH_CHECK_VALUE((t == y.scalar_type() || t == at::kFloat) && bias.scalar_type() == t,
                      "weight, bias: expected the dtype of y (", y.scalar_type(),
                      ") or both float32, got ", weight.scalar_type(), " and ",
                      bias.scalar_type());
  } else {
    TORCH_CHECK_VALUE(weight.scalar_type() == y.scalar_type() &&
                          bias.scalar_type() == y.scalar_type(),
                      "weight, bias: expected the dtype of y (", y.scalar_type(), "), got ",
                      weight.scalar_type(), " and ", bias.scalar_type());
  }
  TORCH_CHECK_VALUE(weight.device() == y.device() && bias.device() == y.device(),
                    "weight, bias: expected the device of y (", y.device(), "), got ",
                    weight.device(), " and ", bias.device());
}

// y (B, d), weight (N, d, d), bias (N, d): one stack's parameters. float32_params:
// as check_params_like_y's (the CPU's dense kernels take them too, csrc/cpu/tile.h).
inline void check_stack(const at::Tensor& y, const at::Tensor& weight, const at::Tensor& bias,
                        bool float32_params = false) {
  check_float_tensor(y, "y");
  check_float_tensor(weight, "weight");
  check_float_tensor(bias, "bias");
  TORCH_CHECK_VALUE(y.dim() == 2, "y: expected a 2-D tensor (batch, features), got shape ",
                    y.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 3 && weight.size(1) == weight.size(2),
                    "weight: expected shape (layers, features, features), got ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(0) > 0, "weight: expected at least one layer, got shape ",
                    weight.sizes());
  check_params_like_y(y, weight, bias, "features", float32_params);
}

// A second tensor that must match y exactly (a carried state or a gradient).
inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& y) {
  check_float_tensor(t, name);
  TORCH_CHECK_VALUE(t.sizes() == y.sizes(), name, ": expected shape ", y.sizes(), ", got ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == y.scalar_type(), name, ": expected dtype ",
                    y.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == y.device(), name, ": expected device ", y.device(), ", got ",
                    t.device());
}

// Stored states of a stack: (layers, slots, batch, features).
inline void check_states(const at::Tensor& states, int64_t slots, const at::Tensor& grad,
                         const at::Tensor& weight) {
  TORCH_CHECK_VALUE(states.dim() == 4 && states.size(1) == slots &&
                        states.size(2) == grad.size(0) && states.size(3) == grad.size(1),
                    "states: expected shape (layers, ", slots, ", ", grad.size(0), ", ",
                    grad.size(1), "), got ", states.sizes());
  TORCH_CHECK_VALUE(states.size(0) == weight.size(0),
                    "states: holds no stored states (the forward ran with store=False) or does "
                    "not match weight; expected ",
                    weight.size(0), " layers, got ", states.size(0));
  TORCH_CHECK_VALUE(states.scalar_type() == grad.scalar_type() && states.device() == grad.device(),
                    "states: expected dtype and device of the gradient");
}

inline void check_gamma(double gamma) {
  TORCH_CHECK_VALUE(std::isfinite(gamma) && gamma >= 0.0,
                    "gamma: expected a finite number >= 0, got ", gamma);
}

}  // namespace stablenets
