// The per-element work of the convolutional stacks, shared by the CPU loops
// (csrc/cpu/conv.cpp) and the CUDA kernels (csrc/cuda/conv.cu).
//
// Every layer of a conv stack is one or two ATen convolutions plus one fused
// pass over the state built from these functors. A functor is called as
// op(e, b) for element e of a contiguous (B, C, H, W) tensor whose channel
// bias is b (0 where the pass has no bias). Inputs and outputs may alias
// (every element is read before it is written, at the same index). Optional
// outputs/inputs are template flags, so no loop carries a branch.
//
// Activations go through the runtime act_fwd / act_grad of activation.h, which
// take the pre-activation p, so every activation added there works here. The
// `ActT` parameter is either `Act` (runtime) or std::integral_constant<Act, X>:
// the CPU passes a constant for the activations it knows, so the switch folds
// and the loop vectorises, and the runtime value for any other.
//
// T is the storage type; the arithmetic runs in M = Math<T> (float for bfloat16
// and float16, so a pass rounds once per value it writes) and the scalars
// (step, factors) are M, never rounded to T.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "stablenets/activation.h"

namespace stablenets {
namespace conv_ew {

template <typename T>
struct MathOf {
  using type = T;
};
template <>
struct MathOf<c10::BFloat16> {
  using type = float;
};
template <>
struct MathOf<c10::Half> {
  using type = float;
};
template <typename T>
using Math = typename MathOf<T>::type;

template <typename ActT>
SN_HOST_DEVICE Act act_of(ActT a) {
  return static_cast<Act>(a);
}

// p = x + b;  [p_out = p];  out = base + s act(p)
// resnet/antisymmetric step (s = h), both Verlet half steps (s = -h, h) and
// their reversal (s = h, -h).
template <typename T, typename ActT, bool StoreP>
struct ResidualAct {
  ActT act;
  const T* x;
  const T* base;
  T* p_out;  // used when StoreP
  T* out;
  Math<T> s;
  SN_HOST_DEVICE void operator()(int64_t e, T b) const {
    using M = Math<T>;
    const M p = static_cast<M>(x[e]) + static_cast<M>(b);
    if constexpr (StoreP) p_out[e] = static_cast<T>(p);
    out[e] = static_cast<T>(static_cast<M>(base[e]) + s * act_fwd<M>(act_of(act), p));
  }
};

// p = x + b;  [p_out = p];  a_out = act(p);  [d_out = act'(p)]
// leapfrog forward (p stored, a fed to the transposed convolution) and
// backward (a and act' from the stored or rebuilt p in one read).
template <typename T, typename ActT, bool StoreP, bool StoreD>
struct BiasAct {
  ActT act;
  const T* x;
  T* p_out;  // used when StoreP
  T* a_out;
  T* d_out;  // used when StoreD
  SN_HOST_DEVICE void operator()(int64_t e, T b) const {
    using M = Math<T>;
    const M p = static_cast<M>(x[e]) + static_cast<M>(b);
    if constexpr (StoreP) p_out[e] = static_cast<T>(p);
    if constexpr (StoreD) d_out[e] = static_cast<T>(act_grad<M>(act_of(act), p));
    a_out[e] = static_cast<T>(act_fwd<M>(act_of(act), p));
  }
};

// [lam_out = lam + add];  g = s (lam [+ add]) act'(p)
// The adjoint of a residual step: add is the previous (later) layer's
// input-gradient convolution, folded in here instead of in a pass of its own.
// lam_out may be lam (in place) or a buffer of the caller's, so that an
// incoming gradient is read, never written, and needs no copy of its own.
template <typename T, typename ActT, bool Add>
struct GradAct {
  ActT act;
  const T* lam;
  const T* add;  // used when Add
  const T* p;
  T* g;
  Math<T> s;
  T* lam_out;    // used when Add
  SN_HOST_DEVICE void operator()(int64_t e, T) const {
    using M = Math<T>;
    M l = static_cast<M>(lam[e]);
    if constexpr (Add) {
      l += static_cast<M>(add[e]);
      lam_out[e] = static_cast<T>(l);
    }
    g[e] = static_cast<T>(s * l * act_grad<M>(act_of(act), static_cast<M>(p[e])));
  }
};

// out = 2 y - yp - h2 q   (leapfrog step; run backwards it rebuilds Y_{j-1})
template <typename T>
struct LeapfrogStep {
  const T* y;
  const T* yp;
  const T* q;
  T* out;
  Math<T> h2;
  SN_HOST_DEVICE void operator()(int64_t e, T) const {
    using M = Math<T>;
    out[e] = static_cast<T>(M(2) * static_cast<M>(y[e]) - static_cast<M>(yp[e]) -
                            h2 * static_cast<M>(q[e]));
  }
};

// g = s g d
template <typename T>
struct ScaleMul {
  T* g;
  const T* d;
  Math<T> s;
  SN_HOST_DEVICE void operator()(int64_t e, T) const {
    using M = Math<T>;
    g[e] = static_cast<T>(s * static_cast<M>(g[e]) * static_cast<M>(d[e]));
  }
};

// Leapfrog adjoint of one layer: (lam, c) = (dL/dY_{j+1}, dL/dY_j so far) becomes
// (c + 2 lam + gy, -lam) = (dL/dY_j, dL/dY_{j-1} so far). The caller keeps the
// second as lam with a sign flag (no pass, no buffer), so c arrives as cs * c:
// out = cs c + 2 lam + gy  (out may alias c).
template <typename T>
struct LeapfrogAdjoint {
  T* out;
  const T* c;
  const T* lam;
  const T* gy;
  Math<T> cs;
  SN_HOST_DEVICE void operator()(int64_t e, T) const {
    using M = Math<T>;
    out[e] = static_cast<T>(cs * static_cast<M>(c[e]) + M(2) * static_cast<M>(lam[e]) +
                            static_cast<M>(gy[e]));
  }
};

// The same for a bfloat16/float16 backward that carries its adjoints in float32:
// out32 = cs c + 2 lam + gy from float32 c and lam (out32 may alias c), and out16 the
// copy in the storage type the next convolution reads.
template <typename T>
struct LeapfrogAdjointWide {
  float* out32;
  T* out16;
  const float* c;
  const float* lam;
  const T* gy;
  float cs;
  SN_HOST_DEVICE void operator()(int64_t e, T) const {
    const float v = cs * c[e] + 2.0f * lam[e] + static_cast<float>(gy[e]);
    out32[e] = v;
    out16[e] = static_cast<T>(v);
  }
};

}  // namespace conv_ew
}  // namespace stablenets
