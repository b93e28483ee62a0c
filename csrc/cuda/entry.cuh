// Argument checks and regime choice for every op; the definitions of
// stablenets::cuda::* (kernels.h). Narrow stacks go to narrow_host.h, wide ones
// to wide.cuh.
//
// bfloat16/float16: the backends register these ops with SN_IMPL_NATIVE and
// narrow_reduced_native (reduced_precision.h), so a narrow reduced call comes
// here in its own dtype and runs the narrow kernels over 16-bit memory, its
// weights converted to float32 up front (compute_weights); a wide one runs on
// float32 copies (InFloat32). A narrow call this device cannot run (shared
// memory) takes that float32-copy path too (reduced_fallback).
#pragma once

#include <ATen/ATen.h>
#if !defined(SN_CPU_EMULATION)
#include <c10/cuda/CUDAGuard.h>
#define SN_DEVICE_GUARD(t) const c10::cuda::CUDAGuard sn_device_guard((t).device())
#else
#define SN_DEVICE_GUARD(t) (void)0
#endif

#include <tuple>
#include <utility>

#include "narrow.h"
#include "stablenets/activation.h"
#include "stablenets/checks.h"
#include "stablenets/kernels.h"
#include "stablenets/reduced_precision.h"
#include "wide.cuh"

namespace stablenets {
namespace cuda_detail {
namespace {

using at::Tensor;

// Weights and biases as the kernels take them: float32 for a bfloat16/float16
// stack (they are small; the narrow kernels compute in float), else as given.
Tensor compute_weights(const Tensor& t) {
  return is_reduced(t.scalar_type()) ? t.to(at::kFloat).contiguous() : t.contiguous();
}

// The float32-copy path of a reduced-precision call the narrow kernels could
// not take: fn on float32 copies of args, its tensors rounded to the dtype.
template <typename F, typename... A>
auto reduced_fallback(at::ScalarType dtype, const F& fn, const A&... args) {
  return rp_detail::down(fn(rp_detail::up(args)...), dtype);
}

Tensor antisymmetric_weight(const Tensor& K, double gamma) {
  Tensor eye = at::eye(K.size(1), K.options());
  return (K - K.transpose(1, 2) - eye * gamma).mul_(0.5).contiguous();
}

T2 resnet_forward_impl(const Tensor& y_in, const Tensor& K_in, const Tensor& b_in, double h,
                       Act act, bool store) {
  const Tensor y = y_in.contiguous(), K = compute_weights(K_in), b = compute_weights(b_in);
  const int64_t N = K.size(0), B = y.size(0), d = y.size(1);
  Tensor out = at::empty({B, d}, y.options());
  Tensor states = at::empty({store ? N : 0, 2, B, d}, y.options());
  if (y.numel() == 0) return {out, states};
  if (d <= kNarrowMax &&
      narrow_forward(Arch::ResNet, y, Tensor(), K, b, h, act, out, Tensor(), states))
    return {out, states};
  if (is_reduced(y.scalar_type()))
    return reduced_fallback(
        y.scalar_type(),
        [&](const Tensor& yf) { return resnet_forward_impl(yf, K, b, h, act, store); }, y);
  wide::resnet_forward(y, K, b, h, act, out, states);
  return {out, states};
}

T3 resnet_backward_impl(const Tensor& g_in, const Tensor& states_in, const Tensor& K_in,
                        const Tensor& b_in, double h, Act act, bool antisym) {
  const Tensor g = g_in.contiguous(), states = states_in.contiguous(), K = compute_weights(K_in),
               b = compute_weights(b_in);
  const int64_t N = K.size(0), B = g.size(0), d = g.size(1);
  if (g.numel() == 0)
    return {at::zeros_like(g), at::zeros({N, d, d}, g.options()), at::zeros({N, d}, g.options())};
  if (d <= kNarrowMax) {
    Tensor gy = at::empty({B, d}, g.options()), dW = at::empty({N, d, d}, g.options()),
           db = at::empty({N, d}, g.options());
    if (narrow_backward(Arch::ResNet, false, antisym, g, Tensor(), states, Tensor(), Tensor(), K, b,
                        h, act, gy, Tensor(), dW, db))
      return {gy, dW, db};
  }
  if (is_reduced(g.scalar_type()))
    return reduced_fallback(
        g.scalar_type(),
        [&](const Tensor& gf, const Tensor& sf) {
          return resnet_backward_impl(gf, sf, K, b, h, act, antisym);
        },
        g, states);
  return wide::resnet_backward(g, states, K, h, act, antisym);
}

T4 zero_grads4(const Tensor& g, int64_t N) {
  const int64_t d = g.size(1);
  return {at::zeros_like(g), at::zeros_like(g), at::zeros({N, d, d}, g.options()),
          at::zeros({N, d}, g.options())};
}

}  // namespace
}  // namespace cuda_detail

// ------------------------------------------------------------- the ops

namespace cuda {

using at::Tensor;
using cuda_detail::Arch;
using cuda_detail::kNarrowMax;

T2 resnet_forward(const Tensor& y, const Tensor& weight, const Tensor& bias, double step,
                  c10::string_view activation, bool store) {
  check_stack(y, weight, bias);
  check_step(step);
  const Act act = parse_activation(activation);
  SN_DEVICE_GUARD(y);
  return cuda_detail::resnet_forward_impl(y, weight, bias, step, act, store);
}

T3 resnet_backward(const Tensor& grad_out, const Tensor& states, const Tensor& weight,
                   const Tensor& bias, double step, c10::string_view activation) {
  check_stack(grad_out, weight, bias);
  check_states(states, 2, grad_out, weight);
  check_step(step);
  const Act act = parse_activation(activation);
  SN_DEVICE_GUARD(grad_out);
  return cuda_detail::resnet_backward_impl(grad_out, states, weight, bias, step, act, false);
}

T2 antisymmetric_forward(const Tensor& y, const Tensor& weight, const Tensor& bias, double step,
                         double gamma, c10::string_view activation, bool store) {
  check_stack(y, weight, bias);
  check_step(step);
  check_gamma(gamma);
  const Act act = parse_activation(activation);
  SN_DEVICE_GUARD(y);
  return cuda_detail::resnet_forward_impl(
      y, cuda_detail::antisymmetric_weight(cuda_detail::compute_weights(weight), gamma), bias,
      step, act, store);
}

T3 antisymmetric_backward(const Tensor& grad_out, const Tensor& states, const Tensor& weight,
                          const Tensor& bias, double step, double gamma,
                          c10::string_view activation) {
  check_stack(grad_out, weight, bias);
  check_states(states, 2, grad_out, weight);
  check_step(step);
  check_gamma(gamma);
  const Act act = parse_activation(activation);
  SN_DEVICE_GUARD(grad_out);
  // A = (K - K^T - gamma I) / 2  =>  dL/dK = (dL/dA - dL/dA^T) / 2
  const Tensor A = cuda_detail::antisymmetric_weight(cuda_detail::compute_weights(weight), gamma);
  return cuda_detail::resnet_backward_impl(grad_out, states, A, bias, step, act, true);
}

T3 leapfrog_forward(const Tensor& y_in, const Tensor& yprev_in, const Tensor& weight,
                    const Tensor& bias, double step, c10::string_view activation, bool store) {
  check_stack(y_in, weight, bias);
  check_like(yprev_in, "y_prev", y_in);
  check_step(step);
  const Act act = parse_activation(activation);
  SN_DEVICE_GUARD(y_in);
  const Tensor y = y_in.contiguous(), yprev = yprev_in.contiguous(),
               K = cuda_detail::compute_weights(weight), b = cuda_detail::compute_weights(bias);
  const int64_t N = K.size(0), B = y.size(0), d = y.size(1);
  Tensor states = at::empty({store ? N : 0, 2, B, d}, y.options());
  if (y.numel() == 0) return {y.clone(), yprev.clone(), states};
  if (d <= kNarrowMax) {
    Tensor out0 = at::empty({B, d}, y.options()), out1 = at::empty({B, d}, y.options());
    if (cuda_detail::narrow_forward(Arch::Leapfrog, y, yprev, K, b, step, act, out0, out1, states))
      return {out0, out1, states};
  }
  if (is_reduced(y.scalar_type()))
    return cuda_detail::reduced_fallback(y.scalar_type(), &leapfrog_forward, y, yprev, K, b, step,
                                         activation, store);
  auto outs = cuda_detail::wide::leapfrog_forward(y, yprev, K, b, step, act, states);
  return {outs.first, outs.second, states};
}

T4 leapfrog_backward(const Tensor& grad_y, const Tensor& grad_y_prev, const Tensor& states_in,
                     const Tensor& weight, const Tensor& bias, double step,
                     c10::string_view activation) {
  check_stack(grad_y, weight, bias);
  check_like(grad_y_prev, "grad_y_prev", grad_y);
  check_states(states_in, 2, grad_y, weight);
  check_step(step);
  const Act act = parse_activation(activation);
  SN_DEVICE_GUARD(grad_y);
  const Tensor ga = grad_y.contiguous(), gc = grad_y_prev.contiguous(),
               states = states_in.contiguous(), K = cuda_detail::compute_weights(weight),
               b = cuda_detail::compute_weights(bias);
  const int64_t N = K.size(0), B = ga.size(0), d = ga.size(1);
  if (ga.numel() == 0) return cuda_detail::zero_grads4(ga, N);
  if (d <= kNarrowMax) {
    Tensor g0 = at::empty({B, d}, ga.options()), g1 = at::empty({B, d}, ga.options()),
           dW = at::empty({N, d, d}, ga.options()), db = at::empty({N, d}, ga.options());
    if (cuda_detail::narrow_backward(Arch::Leapfrog, false, false, ga, gc, states, Tensor(),
                                     Tensor(), K, b, step, act, g0, g1, dW, db))
      return {g0, g1, dW, db};
  }
  if (is_reduced(ga.scalar_type()))
    return cuda_detail::reduced_fallback(ga.scalar_type(), &leapfrog_backward, ga, gc, states, K,
                                         b, step, activation);
  return cuda_detail::wide::leapfrog_backward(ga, gc, states, K, step, act);
}

T6 leapfrog_backward_reversible(const Tensor& grad_y, const Tensor& grad_y_prev, const Tensor& y_in,
                                const Tensor& yprev_in, const Tensor& weight, const Tensor& bias,
                                double step, c10::string_view activation) {
  check_stack(grad_y, weight, bias);
  check_like(grad_y_prev, "grad_y_prev", grad_y);
  check_like(y_in, "y", grad_y);
  check_like(yprev_in, "y_prev", grad_y);
  check_step(step);
  const Act act = parse_activation(activation);
  SN_DEVICE_GUARD(grad_y);
  const Tensor ga = grad_y.contiguous(), gc = grad_y_prev.contiguous(), y = y_in.contiguous(),
               yprev = yprev_in.contiguous(), K = cuda_detail::compute_weights(weight),
               b = cuda_detail::compute_weights(bias);
  const int64_t N = K.size(0), B = ga.size(0), d = ga.size(1);
  if (ga.numel() == 0) {
    auto [g0, g1, dW, db] = cuda_detail::zero_grads4(ga, N);
    return {g0, g1, dW, db, y.clone(), yprev.clone()};
  }
  if (d <= kNarrowMax) {
    Tensor g0 = at::empty({B, d}, ga.options()), g1 = at::empty({B, d}, ga.options()),
           dW = at::empty({N, d, d}, ga.options()), db = at::empty({N, d}, ga.options()),
           r0 = at::empty({B, d}, ga.options()), r1 = at::empty({B, d}, ga.options());
    if (cuda_detail::narrow_backward(Arch::Leapfrog, true, false, ga, gc, Tensor(), y, yprev, K, b,
                                     step, act, g0, g1, dW, db, r0, r1))
      return {g0, g1, dW, db, r0, r1};
  }
  if (is_reduced(ga.scalar_type()))
    return cuda_detail::reduced_fallback(ga.scalar_type(), &leapfrog_backward_reversible, ga, gc,
                                         y, yprev, K, b, step, activation);
  return cuda_detail::wide::leapfrog_backward_reversible(ga, gc, y, yprev, K, b, step, act);
}

T3 verlet_forward(const Tensor& y_in, const Tensor& z_in, const Tensor& weight, const Tensor& bias,
                  double step, c10::string_view activation, bool store) {
  check_stack(y_in, weight, bias);
  check_like(z_in, "z", y_in);
  check_step(step);
  const Act act = parse_activation(activation);
  SN_DEVICE_GUARD(y_in);
  const Tensor y = y_in.contiguous(), z = z_in.contiguous(),
               K = cuda_detail::compute_weights(weight), b = cuda_detail::compute_weights(bias);
  const int64_t N = K.size(0), B = y.size(0), d = y.size(1);
  Tensor states = at::empty({store ? N : 0, 4, B, d}, y.options());
  if (y.numel() == 0) return {y.clone(), z.clone(), states};
  Tensor out0 = at::empty({B, d}, y.options()), out1 = at::empty({B, d}, y.options());
  if (d <= kNarrowMax &&
      cuda_detail::narrow_forward(Arch::Verlet, y, z, K, b, step, act, out0, out1, states))
    return {out0, out1, states};
  if (is_reduced(y.scalar_type()))
    return cuda_detail::reduced_fallback(y.scalar_type(), &verlet_forward, y, z, K, b, step,
                                         activation, store);
  cuda_detail::wide::verlet_forward(y, z, K, b, step, act, out0, out1, states);
  return {out0, out1, states};
}

T4 verlet_backward(const Tensor& grad_y, const Tensor& grad_z, const Tensor& states_in,
                   const Tensor& weight, const Tensor& bias, double step,
                   c10::string_view activation) {
  check_stack(grad_y, weight, bias);
  check_like(grad_z, "grad_z", grad_y);
  check_states(states_in, 4, grad_y, weight);
  check_step(step);
  const Act act = parse_activation(activation);
  SN_DEVICE_GUARD(grad_y);
  const Tensor gy = grad_y.contiguous(), gz = grad_z.contiguous(), states = states_in.contiguous(),
               K = cuda_detail::compute_weights(weight), b = cuda_detail::compute_weights(bias);
  const int64_t N = K.size(0), B = gy.size(0), d = gy.size(1);
  if (gy.numel() == 0) return cuda_detail::zero_grads4(gy, N);
  if (d <= kNarrowMax) {
    Tensor g0 = at::empty({B, d}, gy.options()), g1 = at::empty({B, d}, gy.options()),
           dW = at::empty({N, d, d}, gy.options()), db = at::empty({N, d}, gy.options());
    if (cuda_detail::narrow_backward(Arch::Verlet, false, false, gy, gz, states, Tensor(), Tensor(),
                                     K, b, step, act, g0, g1, dW, db))
      return {g0, g1, dW, db};
  }
  if (is_reduced(gy.scalar_type()))
    return cuda_detail::reduced_fallback(gy.scalar_type(), &verlet_backward, gy, gz, states, K, b,
                                         step, activation);
  return cuda_detail::wide::verlet_backward(gy, gz, states, K, step, act);
}

T6 verlet_backward_reversible(const Tensor& grad_y, const Tensor& grad_z, const Tensor& y_in,
                              const Tensor& z_in, const Tensor& weight, const Tensor& bias,
                              double step, c10::string_view activation) {
  check_stack(grad_y, weight, bias);
  check_like(grad_z, "grad_z", grad_y);
  check_like(y_in, "y", grad_y);
  check_like(z_in, "z", grad_y);
  check_step(step);
  const Act act = parse_activation(activation);
  SN_DEVICE_GUARD(grad_y);
  const Tensor gy = grad_y.contiguous(), gz = grad_z.contiguous(), y = y_in.contiguous(),
               z = z_in.contiguous(), K = cuda_detail::compute_weights(weight),
               b = cuda_detail::compute_weights(bias);
  const int64_t N = K.size(0), B = gy.size(0), d = gy.size(1);
  if (gy.numel() == 0) {
    auto [g0, g1, dW, db] = cuda_detail::zero_grads4(gy, N);
    return {g0, g1, dW, db, y.clone(), z.clone()};
  }
  if (d <= kNarrowMax) {
    Tensor g0 = at::empty({B, d}, gy.options()), g1 = at::empty({B, d}, gy.options()),
           dW = at::empty({N, d, d}, gy.options()), db = at::empty({N, d}, gy.options()),
           r0 = at::empty({B, d}, gy.options()), r1 = at::empty({B, d}, gy.options());
    if (cuda_detail::narrow_backward(Arch::Verlet, true, false, gy, gz, Tensor(), y, z, K, b, step,
                                     act, g0, g1, dW, db, r0, r1))
      return {g0, g1, dW, db, r0, r1};
  }
  if (is_reduced(gy.scalar_type()))
    return cuda_detail::reduced_fallback(gy.scalar_type(), &verlet_backward_reversible, gy, gz, y,
                                         z, K, b, step, activation);
  return cuda_detail::wide::verlet_backward_reversible(gy, gz, y, z, K, b, step, act);
}

// Whether the ops above serve a bfloat16/float16 call themselves (the narrow
// kernels over 16-bit memory) given its first tensor argument: narrow stacks
// (d <= kNarrowMax); wide ones run on float32 copies (reduced_precision.h). A
// malformed first argument goes straight to the op's checks.
inline bool narrow_reduced_native(const Tensor& first) {
  return first.dim() != 2 || first.size(1) <= kNarrowMax;
}

}  // namespace cuda
}  // namespace stablenets

// Every dense op's registration for one dispatch key: the CUDA build (stacks.cu,
// CUDA) and its CPU emulator (testing/cpu_emulator.cpp, CPU) register the same
// list. bfloat16/float16: narrow stacks natively, wide ones on float32 copies.
#define SN_REGISTER_DENSE_OPS(m)                                                                  \
  do {                                                                                            \
    namespace SC = ::stablenets::cuda;                                                            \
    constexpr auto native = &SC::narrow_reduced_native;                                           \
    SN_IMPL_NATIVE(m, "resnet_forward", &SC::resnet_forward, native);                             \
    SN_IMPL_NATIVE(m, "resnet_backward", &SC::resnet_backward, native);                           \
    SN_IMPL_NATIVE(m, "antisymmetric_forward", &SC::antisymmetric_forward, native);               \
    SN_IMPL_NATIVE(m, "antisymmetric_backward", &SC::antisymmetric_backward, native);             \
    SN_IMPL_NATIVE(m, "leapfrog_forward", &SC::leapfrog_forward, native);                         \
    SN_IMPL_NATIVE(m, "leapfrog_backward", &SC::leapfrog_backward, native);                       \
    SN_IMPL_NATIVE(m, "leapfrog_backward_reversible", &SC::leapfrog_backward_reversible, native); \
    SN_IMPL_NATIVE(m, "verlet_forward", &SC::verlet_forward, native);                             \
    SN_IMPL_NATIVE(m, "verlet_backward", &SC::verlet_backward, native);                           \
    SN_IMPL_NATIVE(m, "verlet_backward_reversible", &SC::verlet_backward_reversible, native);     \
  } while (0)
