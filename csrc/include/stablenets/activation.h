// Activations and their derivatives, shared by the CPU and CUDA kernels.
//
// Three ways to get act'(p): from p (act_grad), from a = act(p) (act_g_out /
// act_grad_out: exact for every activation except silu, which is not one-to-one)
// or from both (act_grad_pa). Kernels that keep act(P) for the backward keep P
// instead for silu (kStoresPre) and go through stored_act / stored_grad.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SN_HOST_DEVICE inline
#endif

namespace stablenets {

enum class Act : int32_t {
  Identity = 0,
  Tanh = 1,
  Relu = 2,
  Sigmoid = 3,
  Softplus = 4,   // log(1 + e^p), beta 1 (torch's threshold 20 is within rounding)
  LeakyRelu = 5,  // negative slope kLeakySlope, as torch's default
  Silu = 6,       // p * sigmoid(p)
};

constexpr double kLeakySlope = 0.01;

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
SN_HOST_DEVICE T act_sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// log(1 + e^x) without overflow: max(x, 0) + log1p(e^-|x|).
template <typename T>
SN_HOST_DEVICE T act_softplus(T x) {
  const T ax = x < T(0) ? -x : x;
  return (x > T(0) ? x : T(0)) + std::log1p(std::exp(-ax));
}

template <typename T>
SN_HOST_DEVICE T act_silu_grad(T x) {
  const T s = act_sigmoid<T>(x);
  return s * (T(1) + x * (T(1) - s));
}

template <typename T>
SN_HOST_DEVICE T act_fwd(Act a, T p) {
  switch (a) {
    case Act::Tanh:
      return act_tanh<T>(p);
    case Act::Relu:
      return p > T(0) ? p : T(0);
    case Act::Sigmoid:
      return act_sigmoid<T>(p);
    case Act::Softplus:
      return act_softplus<T>(p);
    case Act::LeakyRelu:
      return p > T(0) ? p : T(kLeakySlope) * p;
    case Act::Silu:
      return p * act_sigmoid<T>(p);
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
    case Act::Sigmoid: {
      const T s = act_sigmoid<T>(p);
      return s * (T(1) - s);
    }
    case Act::Softplus:
      return act_sigmoid<T>(p);
    case Act::LeakyRelu:
      return p > T(0) ? T(1) : T(kLeakySlope);
    case Act::Silu:
      return act_silu_grad<T>(p);
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
  } else if constexpr (A == Act::Sigmoid) {
    return act_sigmoid<T>(p);
  } else if constexpr (A == Act::Softplus) {
    return act_softplus<T>(p);
  } else if constexpr (A == Act::LeakyRelu) {
    return p > T(0) ? p : T(kLeakySlope) * p;
  } else if constexpr (A == Act::Silu) {
    return p * act_sigmoid<T>(p);
  } else {
    return p;
  }
}

// Activations whose derivative cannot be read off act(p): kernels keep p.
template <Act A>
constexpr bool kStoresPre = A == Act::Silu;

// d act / d p expressed through the output a = act(p) (tanh: 1 - a^2; relu:
// a > 0; sigmoid: a (1 - a); softplus: 1 - e^-a; leaky relu: a > 0 or slope;
// identity: 1), so kernels that keep a need no second activation evaluation in
// the backward. Not defined for silu (kStoresPre): use stored_grad.
template <Act A, typename T>
SN_HOST_DEVICE T act_g_out(T a) {
  static_assert(!kStoresPre<A>, "act'(p) is not a function of act(p) for this activation");
  if constexpr (A == Act::Tanh) {
    return T(1) - a * a;
  } else if constexpr (A == Act::Relu) {
    return a > T(0) ? T(1) : T(0);
  } else if constexpr (A == Act::Sigmoid) {
    return a * (T(1) - a);
  } else if constexpr (A == Act::Softplus) {
    return -std::expm1(-a);
  } else if constexpr (A == Act::LeakyRelu) {
    return a > T(0) ? T(1) : T(kLeakySlope);
  } else {
    return T(1);
  }
}

// What a kernel keeps of a pre-activation p for its backward: act(p), or p
// itself for kStoresPre activations; stored_act / stored_grad read it back.
template <Act A, typename T>
SN_HOST_DEVICE T stored_act(T s) {
  if constexpr (kStoresPre<A>) {
    return act_f<A, T>(s);
  } else {
    return s;
  }
}
template <Act A, typename T>
SN_HOST_DEVICE T stored_grad(T s) {
  if constexpr (A == Act::Silu) {
    return act_silu_grad<T>(s);
  } else {
    return act_g_out<A, T>(s);
  }
}

// Runtime-Act d act / d p for kernels that hold both p and a = act(p) (the CUDA
// kernels choose the activation per call): from a where that is exact, else from p.
template <typename T>
SN_HOST_DEVICE T act_grad_pa(Act act, T p, T a) {
  switch (act) {
    case Act::Tanh:
      return T(1) - a * a;
    case Act::Relu:
      return a > T(0) ? T(1) : T(0);
    case Act::Sigmoid:
      return a * (T(1) - a);
    case Act::Softplus:
      return act_sigmoid<T>(p);
    case Act::LeakyRelu:
      return p > T(0) ? T(1) : T(kLeakySlope);
    case Act::Silu:
      return act_silu_grad<T>(p);
    default:
      return T(1);
  }
}

}  // namespace stablenets

// One case of SN_DISPATCH_ACT: `constexpr Act kAct = Act::name`, then the body.
#define SN_ACT_CASE_BODY(name, ...)                                \
  {                                                                \
    constexpr ::stablenets::Act kAct = ::stablenets::Act::name;    \
    return __VA_ARGS__();                                          \
  }

// Runs __VA_ARGS__ with `constexpr Act kAct` bound to the runtime value.
#define SN_DISPATCH_ACT(act, ...)                                  \
  [&] {                                                            \
    switch (act) {                                                 \
      case ::stablenets::Act::Tanh: SN_ACT_CASE_BODY(Tanh, __VA_ARGS__)           \
      case ::stablenets::Act::Relu: SN_ACT_CASE_BODY(Relu, __VA_ARGS__)           \
      case ::stablenets::Act::Sigmoid: SN_ACT_CASE_BODY(Sigmoid, __VA_ARGS__)     \
      case ::stablenets::Act::Softplus: SN_ACT_CASE_BODY(Softplus, __VA_ARGS__)   \
      case ::stablenets::Act::LeakyRelu: SN_ACT_CASE_BODY(LeakyRelu, __VA_ARGS__) \
      case ::stablenets::Act::Silu: SN_ACT_CASE_BODY(Silu, __VA_ARGS__)           \
      default: SN_ACT_CASE_BODY(Identity, __VA_ARGS__)                            \
    }                                                              \
  }()
