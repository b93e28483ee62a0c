// Activations and their derivatives, shared by the CPU and CUDA kernels.
//
// The derivative is always expressed through the pre-activation p, so a kernel
// that stored p can evaluate both act(p) and act'(p) without the other.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SN_HOST_DEVICE inline
#endif

namespace stablenets {

enum class Act : int32_t { Identity = 0, Tanh = 1, Relu = 2 };

// Rational minimax approximation of tanh (odd 13/6 polynomial ratio, clamped),
// accurate to a few float32 ulps. std::tanh does not vectorise in a C++
// extension; this does (min/max/fma/div only), which is worth ~10x on the CPU.
// GCC only turns the clamps into vector min/max with -fno-trapping-math (setup.py
// and CMakeLists.txt pass it); without it the loops stay scalar.
SN_HOST_DEVICE float fast_tanh(float x) {
  const float lim = 7.90531110763549805f;
  x = x < -lim ? -lim : x;
  x = x > lim ? lim : x;
  const float x2 = x * x;
  float p = -2.76076847742355e-16f;
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  p = p * x;
  float q = 1.19825839466702e-06f;
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  return p / q;
}

template <typename T>
SN_HOST_DEVICE T act_tanh(T x) {
  return std::tanh(x);
}
template <>
SN_HOST_DEVICE float act_tanh<float>(float x) {
  return fast_tanh(x);
}

template <typename T>
SN_HOST_DEVICE T act_fwd(Act a, T p) {
  switch (a) {
    case Act::Tanh:
      return act_tanh<T>(p);
    case Act::Relu:
      return p > T(0) ? p : T(0);
    default:
      return p;
  }
}

// d act / d p, evaluated at p.
template <typename T>
SN_HOST_DEVICE T act_grad(Act a, T p) {
  switch (a) {
    case Act::Tanh: {
      const T t = act_tanh<T>(p);
      return T(1) - t * t;
    }
    case Act::Relu:
      return p > T(0) ? T(1) : T(0);
    default:
      return T(1);
  }
}

// Compile-time forms, for inner loops that must stay branch-free to vectorise.
template <Act A, typename T>
SN_HOST_DEVICE T act_f(T p) {
  if constexpr (A == Act::Tanh) {
    return act_tanh<T>(p);
  } else if constexpr (A == Act::Relu) {
    return p > T(0) ? p : T(0);
  } else {
    return p;
  }
}

// d act / d p expressed through the output a = act(p): exact for all three
// activations (tanh: 1 - a^2; relu: a > 0; identity: 1), so kernels that keep
// a need no second activation evaluation in the backward.
template <Act A, typename T>
SN_HOST_DEVICE T act_g_out(T a) {
  if constexpr (A == Act::Tanh) {
    return T(1) - a * a;
  } else if constexpr (A == Act::Relu) {
    return a > T(0) ? T(1) : T(0);
  } else {
    return T(1);
  }
}

// Runtime-Act form of act_g_out, for kernels that choose the activation per call
// (the CUDA kernels): d act / d p from a = act(p), the same formula as act_grad.
template <typename T>
SN_HOST_DEVICE T act_grad_out(Act act, T a) {
  switch (act) {
    case Act::Tanh:
      return T(1) - a * a;
    case Act::Relu:
      return a > T(0) ? T(1) : T(0);
    default:
      return T(1);
  }
}

}  // namespace stablenets

// Runs __VA_ARGS__ with `constexpr Act kAct` bound to the runtime value.
#define SN_DISPATCH_ACT(act, ...)                                  \
  [&] {                                                            \
    switch (act) {                                                 \
      case ::stablenets::Act::Tanh: {                              \
        constexpr ::stablenets::Act kAct = ::stablenets::Act::Tanh; \
        return __VA_ARGS__();                                      \
      }                                                            \
      case ::stablenets::Act::Relu: {                              \
        constexpr ::stablenets::Act kAct = ::stablenets::Act::Relu; \
        return __VA_ARGS__();                                      \
      }                                                            \
      default: {                                                   \
        constexpr ::stablenets::Act kAct = ::stablenets::Act::Identity; \
        return __VA_ARGS__();                                      \
      }                                                            \
    }                                                              \
  }()
