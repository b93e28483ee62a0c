// Reduced precision (bfloat16, float16) for every op, in one template.
//
// InFloat32<&kernel>::call wraps a kernel written for float32/float64: a call
// whose defined tensor arguments all share one reduced dtype runs the kernel
// on float32 copies of them, and returns its tensors (outputs, stored states,
// gradients, rebuilt inputs) in that dtype. So storage (what the caller holds
// and what the forward keeps for the backward) is bf16/fp16 while every
// product, every elementwise pass and the state carried from layer to layer
// through the whole stack are float32: a bf16 stack rounds once per op call,
// not once per layer as plain PyTorch under autocast does. A call with mixed
// dtypes is passed through unchanged, so the kernel's own checks name the
// argument whose dtype is wrong (checks.h accepts bf16/fp16 in each).
//
// This is the generic path every backend has (CPU, CUDA and the CUDA emulator
// register their kernels through it), and the one dtype dispatch of every op; a
// kernel that serves a reduced dtype itself (SN_IMPL_NATIVE: the CPU's wide
// stacks in bfloat16, whose GEMMs then run in bf16 with the carried state in
// float32, and the narrow tiles of all four dense stacks, float32 tiles over
// bf16/fp16 memory) is called directly where its predicate says so.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <type_traits>
#include <utility>

namespace stablenets {

inline bool is_reduced(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

namespace rp_detail {

// The one dtype of every defined tensor argument (Undefined if none), or mixed.
struct CommonDtype {
  at::ScalarType type = at::ScalarType::Undefined;
  bool mixed = false;
  void see(const at::Tensor& x) {
    if (!x.defined()) return;
    if (type == at::ScalarType::Undefined)
      type = x.scalar_type();
    else if (x.scalar_type() != type)
      mixed = true;
  }
  template <typename A>
  void see(const A&) {}
};

inline at::Tensor up(const at::Tensor& x) { return x.defined() ? x.to(at::kFloat) : x; }
template <typename A>
const A& up(const A& a) {
  return a;
}

inline at::Tensor down(const at::Tensor& x, at::ScalarType t) {
  return x.defined() ? x.to(t) : x;
}
template <typename... Ts>
std::tuple<Ts...> down(const std::tuple<Ts...>& r, at::ScalarType t) {
  return std::apply([&](const auto&... x) { return std::tuple<Ts...>(down(x, t)...); }, r);
}

}  // namespace rp_detail

// Native: nullptr, or bool(const at::Tensor& first) saying whether Fn serves a
// reduced-dtype call itself (given the call's first tensor argument). The
// signature is matched from the type of Fn (Sig), where R and Args deduce.
template <auto Fn, auto Native, typename Sig = decltype(Fn)>
struct InFloat32Impl;

template <auto Fn, auto Native, typename R, typename... Args>
struct InFloat32Impl<Fn, Native, R (*)(Args...)> {
  static R call(Args... args) {
    rp_detail::CommonDtype common;
    (common.see(args), ...);
    if (common.mixed || !is_reduced(common.type)) return Fn(args...);
    if constexpr (!std::is_null_pointer_v<decltype(Native)>) {
      if (Native(std::get<0>(std::forward_as_tuple(args...)))) return Fn(args...);
    }
    return rp_detail::down(Fn(rp_detail::up(args)...), common.type);
  }
};

template <auto Fn, auto Native = nullptr>
using InFloat32 = InFloat32Impl<Fn, Native>;

}  // namespace stablenets

// m.impl(name, fn) through InFloat32: the registration every backend uses.
#define SN_IMPL(m, name, fn) (m).impl(name, &::stablenets::InFloat32<fn>::call)
// The same for a kernel that serves reduced dtypes itself where native(first) says so.
#define SN_IMPL_NATIVE(m, name, fn, native) \
  (m).impl(name, &::stablenets::InFloat32<fn, native>::call)
