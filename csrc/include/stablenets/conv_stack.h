// The convolutional stacks' layer loops, written once for every backend.
//
// Each layer is ATen convolutions (oneDNN on the CPU, cuDNN on the GPU) plus
// fused elementwise passes (conv_elementwise.h) run by a backend `Launcher`:
//
//   struct Launcher {
//     static constexpr bool kHoistAct;      // instantiate loops per known activation
//     static bool channels_last();          // run activations channels-last
//     static void fresh_buffer(const at::Tensor& t);  // called on the states buffer before
//                                                     // its first write
//     template <class Op, typename T>
//     static void launch(const Op& op, const at::Tensor& like, const T* bias);
//   };
//
// `launch` calls op(e, bias[channel(e)]) (or 0 with bias == nullptr) for every
// element e, in memory order, of the (B, C, H, W) tensor `like`, which is
// channels-last (channel e % C) or contiguous (channel (e / HW) % C) as the
// launcher's channels_last() says; every tensor of a pass has that layout. csrc/cpu/conv.cpp and
// csrc/cuda/conv.cu provide one each and register ConvStack<Launcher>'s ops.
//
// The maths (K Y = conv2d(Y, K) with "same" padding, K^T its adjoint
// conv_transpose2d(Y, K)), for layer j with P = pre-activation:
//   resnet:        Y_{j+1} = Y_j + h act(P_j),             P_j = K_j Y_j + b_j
//   antisymmetric: resnet with kernels (K - K^T - gamma I) / 2
//   leapfrog:      Y_{j+1} = 2 Y_j - Y_{j-1} - h^2 K_j^T act(P_j)
//   verlet:        Z_{j+1/2} = Z_{j-1/2} - h act(P1_j),     P1_j = K_j Y_j + b_j
//                  Y_{j+1} = Y_j + h act(P2_j),             P2_j = K_j^T Z_{j+1/2} + b_j
// Stored states (layers, slots, B, C, H, W):
//   resnet, antisymmetric, leapfrog: [Y_j, P_j];  verlet: [Y_j, P1_j, Z_{j+1/2}, P2_j].
// Pre-activations are kept (not act(P)) so that any activation's derivative is
// available from act_grad(act, p). The backward reads every stored slot once.
// The reversible backwards rebuild the states from the final pair instead.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <type_traits>
#include <utility>

#include "stablenets/activation.h"
#include "stablenets/checks.h"
#include "stablenets/conv_elementwise.h"
#include "stablenets/kernels.h"

namespace stablenets {
namespace conv_detail {

using at::Tensor;
using T6 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// ------------------------------------------------------------------ checks

inline void check_conv_stack(const Tensor& y, const Tensor& weight, const Tensor& bias) {
  check_float_tensor(y, "y");
  check_float_tensor(weight, "weight");
  check_float_tensor(bias, "bias");
  TORCH_CHECK_VALUE(y.dim() == 4, "y: expected a 4-D tensor (batch, channels, height, width), ",
                    "got shape ", y.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 5 && weight.size(1) == weight.size(2) &&
                        weight.size(3) == weight.size(4),
                    "weight: expected shape (layers, channels, channels, k, k), got ",
                    weight.sizes());
  TORCH_CHECK_VALUE(weight.size(0) > 0, "weight: expected at least one layer, got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(weight.size(3) % 2 == 1,
                    "weight: expected an odd kernel size k (\"same\" padding k // 2 keeps the "
                    "image size), got k = ",
                    weight.size(3));
  check_params_like_y(y, weight, bias, "channels", /*float32_params=*/true);
}

inline void check_conv_states(const Tensor& states, int64_t slots, const Tensor& grad,
                              const Tensor& weight) {
  TORCH_CHECK_VALUE(states.dim() == 6 && states.size(1) == slots &&
                        states.sizes().slice(2) == grad.sizes(),
                    "states: expected shape (layers, ", slots,
                    ", batch, channels, height, width) with the gradient's shape ", grad.sizes(),
                    " last, got ", states.sizes());
  TORCH_CHECK_VALUE(states.size(0) == weight.size(0),
                    "states: holds no stored states (the forward ran with store=False) or does "
                    "not match weight; expected ",
                    weight.size(0), " layers, got ", states.size(0));
  TORCH_CHECK_VALUE(states.scalar_type() == grad.scalar_type() && states.device() == grad.device(),
                    "states: expected the dtype and device of the gradient");
}

// ------------------------------------------------------------ convolutions

inline int64_t pad_of(const Tensor& K) { return K.size(-1) / 2; }

// K Y (transposed = false) or K^T Y (transposed = true), no bias; in y's memory format.
inline Tensor conv(const Tensor& y, const Tensor& K, bool transposed) {
  const int64_t p = pad_of(K);
  return at::convolution(y, K, Tensor(), {1, 1}, {p, p}, {1, 1}, transposed, {0, 0}, 1)
      .contiguous(y.suggest_memory_format());
}

// Gradients of conv(input, K, transposed) given the output gradient g:
// (d input, d K, d bias) as selected by mask.
inline std::tuple<Tensor, Tensor, Tensor> conv_grads(const Tensor& g, const Tensor& input,
                                                     const Tensor& K, bool transposed,
                                                     std::array<bool, 3> mask) {
  const int64_t p = pad_of(K);
  const std::array<int64_t, 1> bias_sizes{K.size(0)};
  auto out = at::convolution_backward(
      g, input, K, mask[2] ? at::OptionalIntArrayRef(at::IntArrayRef(bias_sizes)) : at::OptionalIntArrayRef(),
      {1, 1}, {p, p}, {1, 1}, transposed, {0, 0}, 1, mask);
  if (std::get<0>(out).defined())
    std::get<0>(out) = std::get<0>(out).contiguous(input.suggest_memory_format());
  return out;
}

// Layer j's slot s of states (layers, slots, B, C, H, W): a contiguous block,
// viewed channels-last (its memory then holds (B, H, W, C)) where the backend
// runs channels-last. Only the matching backward reads states, so the order
// inside a block is the backend's.
inline Tensor slot(const Tensor& states, int64_t j, int64_t s, bool channels_last) {
  Tensor t = states.select(0, j).select(0, s);
  if (!channels_last) return t;
  return t.view({t.size(0), t.size(2), t.size(3), t.size(1)}).permute({0, 3, 1, 2});
}

// out = (K - K^T - gamma I) / 2 for every layer of a CPU tensor, in one loop: K^T's
// kernel is K with the channels swapped and the taps flipped, I the identity at the
// centre tap. Each value is rounded once (in its dtype's op-math type); for float32 and
// float64 the result is the ATen expression's below, bit for bit. The ATen version made
// about ten small ops a call (transpose, flip, sub, mul, eye, ...; some 25-35 us of a
// (64, 32, 7, 7) one-layer step, forward and backward).
inline Tensor antisymmetrize_on_host(const Tensor& K_in, double gamma) {
  const Tensor K = K_in.contiguous();
  Tensor out = at::empty_like(K);
  const int64_t N = K.size(0), C = K.size(1), tap = K.size(3) * K.size(4), centre = tap / 2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, K.scalar_type(), "antisymmetrize",
                                  [&] {
    using F = at::opmath_type<scalar_t>;
    const scalar_t* k = K.data_ptr<scalar_t>();
    scalar_t* a = out.data_ptr<scalar_t>();
    const F g = static_cast<F>(gamma);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t o = 0; o < C; ++o)
        for (int64_t i = 0; i < C; ++i) {
          const scalar_t* kio = k + ((n * C + o) * C + i) * tap;  // K[n, o, i, :]
          const scalar_t* kt = k + ((n * C + i) * C + o) * tap;   // K[n, i, o, :]
          scalar_t* dst = a + ((n * C + o) * C + i) * tap;
          for (int64_t t = 0; t < tap; ++t) {
            const F d = static_cast<F>(kio[t]) - static_cast<F>(kt[tap - 1 - t]);
            dst[t] = static_cast<scalar_t>(o == i && t == centre ? (d - g) * F(0.5) : d * F(0.5));
          }
        }
  });
  return out;
}

// (K - K^T - gamma I) / 2 for every layer; K^T's kernel is K with the channels
// swapped and the taps flipped.
inline Tensor antisymmetric_kernel(const Tensor& K, double gamma) {
  if (K.is_cpu()) return antisymmetrize_on_host(K, gamma);
  Tensor A = (K - K.transpose(1, 2).flip({3, 4})).mul_(0.5);
  const int64_t c = K.size(3) / 2;
  A.select(3, c).select(3, c).sub_(at::eye(K.size(1), K.options()), 0.5 * gamma);
  return A.contiguous();
}

// dL/dK from dL/dA for A = antisymmetric_kernel(K, gamma).
inline Tensor antisymmetric_kernel_grad(const Tensor& gA) {
  if (gA.is_cpu()) return antisymmetrize_on_host(gA, 0.0);
  return (gA - gA.transpose(1, 2).flip({3, 4})).mul_(0.5).contiguous();
}

// -------------------------------------------------------- elementwise passes

// The storage types of every pass: float32, float64, and bfloat16/float16 (arithmetic
// in float32, conv_elementwise.h), where the backend runs those itself
// (Launcher::kNativeReduced; else reduced_precision.h hands the ops float32 copies).
#define SN_DISPATCH_CONV_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

template <class L>
struct Ew {
  using IC_Tanh = std::integral_constant<Act, Act::Tanh>;
  using IC_Relu = std::integral_constant<Act, Act::Relu>;
  using IC_Identity = std::integral_constant<Act, Act::Identity>;

  // f(A) with A a compile-time activation where the launcher wants that and
  // the activation is one of these, else the runtime value (any activation).
  template <typename F>
  static void with_act(Act a, const F& f) {
    if constexpr (L::kHoistAct) {
      switch (a) {
        case Act::Tanh:
          return f(IC_Tanh{});
        case Act::Relu:
          return f(IC_Relu{});
        case Act::Identity:
          return f(IC_Identity{});
        default:
          break;
      }
    }
    f(a);
  }

  template <typename T>
  static T* ptr(const Tensor& t) {
    return t.defined() ? t.data_ptr<T>() : nullptr;
  }

  // out = base + s act(x + bias); [p_out = x + bias]
  static void residual_act(Act act, const Tensor& x, const Tensor& bias, const Tensor& base,
                           double s, const Tensor& p_out, const Tensor& out) {
    SN_DISPATCH_CONV_TYPES(out.scalar_type(), "conv_residual_act", [&] {
      using T = scalar_t;
      with_act(act, [&](auto A) {
        if (p_out.defined()) {
          conv_ew::ResidualAct<T, decltype(A), true> op{A, ptr<T>(x), ptr<T>(base), ptr<T>(p_out),
                                                        ptr<T>(out), static_cast<conv_ew::Math<T>>(s)};
          L::launch(op, out, ptr<T>(bias));
        } else {
          conv_ew::ResidualAct<T, decltype(A), false> op{A, ptr<T>(x), ptr<T>(base), nullptr,
                                                         ptr<T>(out), static_cast<conv_ew::Math<T>>(s)};
          L::launch(op, out, ptr<T>(bias));
        }
      });
    });
  }

  // a_out = act(x + bias); [p_out = x + bias]; [d_out = act'(x + bias)]
  static void bias_act(Act act, const Tensor& x, const Tensor& bias, const Tensor& p_out,
                       const Tensor& a_out, const Tensor& d_out) {
    SN_DISPATCH_CONV_TYPES(a_out.scalar_type(), "conv_bias_act", [&] {
      using T = scalar_t;
      with_act(act, [&](auto A) {
        using AT = decltype(A);
        if (d_out.defined()) {
          TORCH_INTERNAL_ASSERT(!p_out.defined());
          conv_ew::BiasAct<T, AT, false, true> op{A, ptr<T>(x), nullptr, ptr<T>(a_out),
                                                  ptr<T>(d_out)};
          L::launch(op, a_out, ptr<T>(bias));
        } else if (p_out.defined()) {
          conv_ew::BiasAct<T, AT, true, false> op{A, ptr<T>(x), ptr<T>(p_out), ptr<T>(a_out),
                                                  nullptr};
          L::launch(op, a_out, ptr<T>(bias));
        } else {
          conv_ew::BiasAct<T, AT, false, false> op{A, ptr<T>(x), nullptr, ptr<T>(a_out), nullptr};
          L::launch(op, a_out, ptr<T>(bias));
        }
      });
    });
  }

  // [lam_out = lam + add]; g = s (lam [+ add]) act'(p)   (lam_out may be lam)
  static void grad_act(Act act, const Tensor& lam, const Tensor& add, const Tensor& p, double s,
                       const Tensor& g, const Tensor& lam_out) {
    SN_DISPATCH_CONV_TYPES(g.scalar_type(), "conv_grad_act", [&] {
      using T = scalar_t;
      with_act(act, [&](auto A) {
        if (add.defined()) {
          TORCH_INTERNAL_ASSERT(lam_out.defined());
          conv_ew::GradAct<T, decltype(A), true> op{A, ptr<T>(lam), ptr<T>(add), ptr<T>(p),
                                                    ptr<T>(g), static_cast<conv_ew::Math<T>>(s),
                                                    ptr<T>(lam_out)};
          L::launch(op, g, static_cast<const T*>(nullptr));
        } else {
          conv_ew::GradAct<T, decltype(A), false> op{A, ptr<T>(lam), nullptr, ptr<T>(p),
                                                     ptr<T>(g), static_cast<conv_ew::Math<T>>(s),
                                                     nullptr};
          L::launch(op, g, static_cast<const T*>(nullptr));
        }
      });
    });
  }

  // out = 2 y - yp - h2 q
  static void leapfrog_step(const Tensor& y, const Tensor& yp, const Tensor& q, double h2,
                            const Tensor& out) {
    SN_DISPATCH_CONV_TYPES(out.scalar_type(), "conv_leapfrog_step", [&] {
      using T = scalar_t;
      conv_ew::LeapfrogStep<T> op{ptr<T>(y), ptr<T>(yp), ptr<T>(q), ptr<T>(out),
                                  static_cast<conv_ew::Math<T>>(h2)};
      L::launch(op, out, static_cast<const T*>(nullptr));
    });
  }

  // g = s g d
  static void scale_mul(const Tensor& g, const Tensor& d, double s) {
    SN_DISPATCH_CONV_TYPES(g.scalar_type(), "conv_scale_mul", [&] {
      using T = scalar_t;
      conv_ew::ScaleMul<T> op{ptr<T>(g), ptr<T>(d), static_cast<conv_ew::Math<T>>(s)};
      L::launch(op, g, static_cast<const T*>(nullptr));
    });
  }

  // out32 = cs c + 2 lam + gy (float32 c, lam), out16 = out32 in gy's dtype (bf16/fp16)
  static void leapfrog_adjoint_wide(const Tensor& out32, const Tensor& out16, const Tensor& c,
                                    double cs, const Tensor& lam, const Tensor& gy) {
    AT_DISPATCH_REDUCED_FLOATING_TYPES(gy.scalar_type(), "conv_leapfrog_adjoint_wide", [&] {
      using T = scalar_t;
      conv_ew::LeapfrogAdjointWide<T> op{ptr<float>(out32), ptr<T>(out16), ptr<float>(c),
                                         ptr<float>(lam), ptr<T>(gy), static_cast<float>(cs)};
      L::launch(op, out16, static_cast<const T*>(nullptr));
    });
  }

  // out = cs c + 2 lam + gy
  static void leapfrog_adjoint(const Tensor& out, const Tensor& c, double cs, const Tensor& lam,
                               const Tensor& gy) {
    SN_DISPATCH_CONV_TYPES(out.scalar_type(), "conv_leapfrog_adjoint", [&] {
      using T = scalar_t;
      conv_ew::LeapfrogAdjoint<T> op{ptr<T>(out), ptr<T>(c), ptr<T>(lam), ptr<T>(gy),
                                     static_cast<conv_ew::Math<T>>(cs)};
      L::launch(op, out, static_cast<const T*>(nullptr));
    });
  }
};

// ---------------------------------------------------------------- the ops

// Launcher::kAdjointAsForward (optional, default false): run K^T Y as a forward
// convolution with the adjoint kernel (channels swapped, taps flipped) instead
// of a transposed convolution, and the input gradient of K Y likewise. oneDNN's
// backward-data and transposed (deconvolution) primitives measured up to 7x
// slower than its forward one on the CPU at 8 channels (NCHW, 2026-12-05); the
// forward one is the best tuned everywhere.
template <class L, class = void>
struct AdjointAsForward : std::false_type {};
template <class L>
struct AdjointAsForward<L, std::void_t<decltype(L::kAdjointAsForward)>>
    : std::bool_constant<L::kAdjointAsForward> {};

// Launcher::relayout (optional): bool relayout(dst, a, b, s) writes dst = s (a [+ b])
// (b may be undefined) where dst and a have the same shape and one is NCHW, the other
// channels-last (b laid out as a), and returns false where it does not serve the call
// (then ATen's copy_/add_out/neg_out do). The CPU's is a blocked transpose (AVX-512
// 16x16 tiles for float32): ATen's copy_ between the two layouts took about 3x as long
// as the transpose itself at the mnist preset's stage shapes, four of them per
// forward+backward.
template <class L, class = void>
struct HasRelayout : std::false_type {};
template <class L>
struct HasRelayout<L, std::void_t<decltype(L::relayout(std::declval<const at::Tensor&>(),
                                                      std::declval<const at::Tensor&>(),
                                                      std::declval<const at::Tensor&>(), 1.0))>>
    : std::true_type {};

// Launcher::channel_sum32 (optional): at::Tensor channel_sum32(G), the float32
// per-channel sum of a bfloat16/float16 G, or undefined where it does not serve G.
template <class L, class = void>
struct HasChannelSum : std::false_type {};
template <class L>
struct HasChannelSum<L, std::void_t<decltype(L::channel_sum32(std::declval<const at::Tensor&>()))>>
    : std::true_type {};

template <class L>
struct ConvStack {
  using E = Ew<L>;

  // The layout every activation-sized tensor has inside the ops (channels-last
  // on the CPU: oneDNN's convolutions run up to 2x faster there than in NCHW).
  // Inputs are converted once (or read as they are where they already have it),
  // outputs returned contiguous (NCHW).
  static at::MemoryFormat fmt() {
    return L::channels_last() ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  }
  // An uninitialised tensor of t's shape in the internal layout, from the
  // launcher's allocator (on the CPU the block cache, so that a training step
  // does not page-fault its temporaries in again on every call).
  static Tensor scratch(const Tensor& t) { return scratch(t, t.scalar_type()); }
  static Tensor scratch(const Tensor& t, at::ScalarType dtype) {
    const auto options = t.options().dtype(dtype);
    if (!L::channels_last()) return L::empty(t.sizes(), options);
    return L::empty({t.size(0), t.size(2), t.size(3), t.size(1)}, options).permute({0, 3, 1, 2});
  }
  // A float32 copy of t (a tensor in the internal layout), in that layout.
  static Tensor widened(const Tensor& t) {
    Tensor o = scratch(t, at::kFloat);
    o.copy_(t);
    return o;
  }
  // dst = s (a [+ b]) through the launcher's layout conversion where it serves the call.
  static bool relayout(const Tensor& dst, const Tensor& a, const Tensor& b, double s) {
    if constexpr (HasRelayout<L>::value) {
      return L::relayout(dst, a, b, s);
    } else {
      return false;
    }
  }
  // dst = src (any two layouts).
  static void assign(const Tensor& dst, const Tensor& src) {
    if (!relayout(dst, src, Tensor(), 1.0)) dst.copy_(src);
  }
  // t in the internal layout: t itself where it has it (then read-only), else a copy.
  static Tensor internal(const Tensor& t) {
    if (t.is_contiguous(fmt())) return t;
    Tensor o = scratch(t);
    assign(o, t);
    return o;
  }
  // A copy of t of our own in the internal layout (written by the caller).
  static Tensor own_copy(const Tensor& t) {
    Tensor o = scratch(t);
    assign(o, t);
    return o;
  }
  // t (a tensor of ours) as an NCHW output: t itself where it is NCHW already.
  static Tensor nchw(const Tensor& t) {
    if (t.is_contiguous()) return t;
    return nchw_copy(t);
  }
  // A new NCHW tensor holding t (for outputs that must not alias a view of ours).
  static Tensor nchw_copy(const Tensor& t) {
    Tensor o = L::empty(t.sizes(), t.options());
    assign(o, t);
    return o;
  }
  // The rebuilt pair of an empty batch: undefined in stored mode (no seeds given).
  static Tensor clone_if_defined(const Tensor& t) {
    return t.defined() ? t.clone(at::MemoryFormat::Contiguous) : Tensor();
  }
  // a + b (tensors of ours) as an NCHW output, in one pass.
  static Tensor nchw_sum(const Tensor& a, const Tensor& b) {
    Tensor o = L::empty(a.sizes(), a.options());
    if (!relayout(o, a, b, 1.0)) at::add_out(o, a, b);
    return o;
  }
  static Tensor slot(const Tensor& states, int64_t j, int64_t s) {
    return conv_detail::slot(states, j, s, L::channels_last());
  }
  static Tensor empty_states(const Tensor& y, int64_t layers, int64_t slots) {
    Tensor t = L::empty({layers, slots, y.size(0), y.size(1), y.size(2), y.size(3)}, y.options());
    L::fresh_buffer(t);
    return t;
  }

  // The kernels of one call in the layout the convolutions take them in: K[j]
  // is layer j's (C, C, k, k) kernel, channels-last where the activations are
  // (else oneDNN reorders it on every call), and Kt[j] its adjoint where the
  // launcher runs K^T as a forward convolution (AdjointAsForward).
  struct Kernels {
    Tensor K, Kt;
  };
  // Parameters (float32 where a bfloat16/float16 stack runs under torch.autocast on the
  // CPU, checks.h) in the dtype of `like`, the one every elementwise pass and
  // convolution runs in; their gradients are returned in their own dtype.
  static Tensor in_dtype_of(const Tensor& p, const Tensor& like) {
    return p.scalar_type() == like.scalar_type() ? p : p.to(like.scalar_type());
  }
  // Whether layer gradients of the convolutions' dtype (bfloat16/float16) accumulate
  // into float32 parameter gradients: then each is widened before any sum, and the
  // bias gradient is summed from G in float32, so the parameters' gradients round once
  // (as autocast's float32 parameters' do), not once per term.
  static bool widen_grads(const Tensor& G, const Tensor& gW) {
    return G.scalar_type() != gW.scalar_type();
  }
  // gW_j = a + s b (s = 1: the sum of two terms), in gW's dtype.
  static void combine(Tensor gWj, const Tensor& a, const Tensor& b, double s) {
    if (a.scalar_type() == gWj.scalar_type()) {
      at::add_out(gWj, a, b, s);
    } else {
      gWj.copy_(a);
      gWj.add_(b, s);  // a float32 self: computed in float32
    }
  }
  static Tensor bias_grad32(const Tensor& G) {
    if constexpr (HasChannelSum<L>::value) {
      Tensor s = L::channel_sum32(G);
      if (s.defined()) return s;
    }
    return at::sum(G, {0, 2, 3}, false, at::kFloat);
  }
  static Tensor conv_layout(const Tensor& K) {  // (N, C, C, k, k)
    if (!L::channels_last()) return K.contiguous();
    return K.permute({0, 1, 3, 4, 2}).contiguous().permute({0, 1, 4, 2, 3});
  }
  // adjoint = false: K^T Y is never taken (the ResNet forward), so Kt is not built.
  // The kernels come in the dtype the convolutions run in, y's (`like`): float32
  // parameters of a bfloat16/float16 stack are cast here.
  static Kernels kernels(const Tensor& Kw, const Tensor& like, bool adjoint = true) {
    if (L::channels_last() && Kw.is_cpu())
      return kernels_on_host(Kw, like.scalar_type(), adjoint && AdjointAsForward<L>::value);
    const Tensor K = in_dtype_of(Kw, like);
    Kernels k;
    k.K = conv_layout(K);
    if constexpr (AdjointAsForward<L>::value) {
      if (adjoint) k.Kt = conv_layout(K.transpose(1, 2).flip({3, 4}));
    }
    return k;
  }
  // kernels() on the CPU, channels-last: both layouts written in one loop over K, cast
  // to `dtype` on the way (through ATen: a cast, a permute-copy, a flip and a second
  // permute-copy, each a TensorIterator pass with its own setup, about 25 us a call
  // at the mnist stages).
  static Kernels kernels_on_host(const Tensor& Kin, at::ScalarType dtype, bool adjoint) {
    const Tensor K = Kin.contiguous();
    const int64_t N = K.size(0), C = K.size(1), ks = K.size(3);
    // (N, C_out, k, k, C_in) in memory, viewed (N, C_out, C_in, k, k): channels-last
    const auto options = K.options().dtype(dtype);
    Tensor Kc = at::empty({N, C, ks, ks, C}, options), Ktc;
    if (adjoint) Ktc = at::empty({N, C, ks, ks, C}, options);
    SN_DISPATCH_CONV_TYPES(dtype, "conv_kernels", [&] {
      using D = scalar_t;
      if (K.scalar_type() == dtype) {
        fill_kernels<D, D>(K.data_ptr<D>(), Kc.data_ptr<D>(), adjoint ? Ktc.data_ptr<D>() : nullptr,
                           N, C, ks * ks);
      } else {  // float32 parameters of a bfloat16/float16 stack (checks.h)
        TORCH_INTERNAL_ASSERT(K.scalar_type() == at::kFloat);
        fill_kernels<float, D>(K.data_ptr<float>(), Kc.data_ptr<D>(),
                               adjoint ? Ktc.data_ptr<D>() : nullptr, N, C, ks * ks);
      }
    });
    Kernels k;
    k.K = Kc.permute({0, 1, 4, 2, 3});
    if (adjoint) k.Kt = Ktc.permute({0, 1, 4, 2, 3});
    return k;
  }
  template <typename S, typename D>
  static void fill_kernels(const S* src, D* dk, D* dt, int64_t N, int64_t C, int64_t tap) {
    const int64_t per_layer = C * C * tap;
    at::parallel_for(0, N * C, std::max<int64_t>(1, 16384 / (C * tap)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {  // r = (layer n, output channel o)
        const int64_t n = r / C, o = r % C;
        const S* Kn = src + n * per_layer;
        D* out = dk + r * C * tap;
        for (int64_t t = 0; t < tap; ++t)  // K[n, o, i, t] -> Kc[n, o, t, i]
          for (int64_t i = 0; i < C; ++i) out[t * C + i] = static_cast<D>(Kn[(o * C + i) * tap + t]);
        if (dt == nullptr) continue;
        // the adjoint kernel: Kt[n, o, i, t] = K[n, i, o, k*k - 1 - t] (channels swapped,
        // taps flipped)
        D* outt = dt + r * C * tap;
        for (int64_t t = 0; t < tap; ++t)
          for (int64_t i = 0; i < C; ++i)
            outt[t * C + i] = static_cast<D>(Kn[(i * C + o) * tap + (tap - 1 - t)]);
      }
    });
  }
  // K_j Y and K_j^T Y.
  static Tensor fwd(const Tensor& y, const Kernels& k, int64_t j) {
    return conv(y, k.K[j], false);
  }
  static Tensor adj(const Tensor& y, const Kernels& k, int64_t j) {
    return k.Kt.defined() ? conv(y, k.Kt[j], false) : conv(y, k.K[j], true);
  }
  // Gradients of X = K_j Y (transposed = false) or X = K_j^T Y (true) from
  // G = dL/dX: (dL/dY, dL/dK_j, dL/db_j of a bias added to X) as mask selects.
  static std::tuple<Tensor, Tensor, Tensor> grads(const Tensor& G, const Tensor& Y,
                                                  const Kernels& k, int64_t j, bool transposed,
                                                  std::array<bool, 3> mask) {
    if (!k.Kt.defined()) return conv_grads(G, Y, k.K[j], transposed, mask);
    Tensor gi;
    if (mask[0]) gi = transposed ? fwd(G, k, j) : adj(G, k, j);
    auto r = conv_grads(G, Y, k.K[j], transposed, {false, mask[1], mask[2]});
    return {gi, std::get<1>(r), std::get<2>(r)};
  }

  static T2 resnet_forward_impl(const Tensor& y, const Tensor& Kw, const Tensor& b, double h,
                                Act act, bool store) {
    const int64_t N = Kw.size(0);
    Tensor states = empty_states(y, store ? N : 0, 2);
    if (y.numel() == 0) return {y.clone(at::MemoryFormat::Contiguous), states};
    const Kernels k = kernels(Kw, y, /*adjoint=*/false);
    Tensor Y;  // the state, when not stored
    if (store)
      assign(slot(states, 0, 0), y);
    else
      Y = own_copy(y);
    Tensor out;
    for (int64_t j = 0; j < N; ++j) {
      const Tensor Yj = store ? slot(states, j, 0) : Y;
      const Tensor X = fwd(Yj, k, j);
      // the last stored layer writes Y_N over its convolution's output (same index)
      const Tensor next = !store ? Y : j + 1 < N ? slot(states, j + 1, 0) : X;
      E::residual_act(act, X, b[j], Yj, h, store ? slot(states, j, 1) : Tensor(), next);
      out = next;
    }
    return {nchw(out), states};
  }

  // Returns (dL/dy, dL/dK, dL/db) for the kernels K the forward ran with.
  static T3 resnet_backward_impl(const Tensor& g_in, const Tensor& states, const Tensor& Kw,
                                 double h, Act act) {
    const int64_t N = Kw.size(0);
    if (g_in.numel() == 0)
      return {at::zeros_like(g_in, at::MemoryFormat::Contiguous), at::zeros_like(Kw),
              at::zeros({N, Kw.size(1)}, Kw.options())};
    const Kernels k = kernels(Kw, g_in);
    Tensor gW = at::empty(Kw.sizes(), Kw.options()), gb = at::empty({N, Kw.size(1)}, Kw.options());
    // lam = dL/dY_{j+1}: the incoming gradient (read only) until a layer adds
    // its input gradient, then a buffer of ours.
    const Tensor g = internal(g_in);
    Tensor lam = g, G = scratch(g), gi, own;
    const bool wide = widen_grads(G, gW);
    for (int64_t j = N - 1; j >= 0; --j) {
      if (gi.defined() && !own.defined()) own = scratch(g);
      E::grad_act(act, lam, gi, slot(states, j, 1), h, G, own);
      if (gi.defined()) lam = own;
      Tensor gw, gbj;
      std::tie(gi, gw, gbj) = grads(G, slot(states, j, 0), k, j, false, {true, true, !wide});
      gW[j].copy_(gw);
      gb[j].copy_(wide ? bias_grad32(G) : gbj);
    }
    return {nchw_sum(lam, gi), gW, gb};
  }

  static T2 resnet_forward(const Tensor& y, const Tensor& weight, const Tensor& bias, double step,
                           c10::string_view activation, bool store) {
    check_conv_stack(y, weight, bias);
    check_step(step);
    const Act act = parse_activation(activation);
    return resnet_forward_impl(y, weight, in_dtype_of(bias, y).contiguous(), step, act, store);
  }

  static T3 resnet_backward(const Tensor& grad_out, const Tensor& states, const Tensor& weight,
                            const Tensor& bias, double step, c10::string_view activation) {
    check_conv_stack(grad_out, weight, bias);
    check_conv_states(states, 2, grad_out, weight);
    check_step(step);
    const Act act = parse_activation(activation);
    return resnet_backward_impl(grad_out, states.contiguous(), weight, step, act);
  }

  static T2 antisymmetric_forward(const Tensor& y, const Tensor& weight, const Tensor& bias,
                                  double step, double gamma, c10::string_view activation,
                                  bool store) {
    check_conv_stack(y, weight, bias);
    check_step(step);
    check_gamma(gamma);
    const Act act = parse_activation(activation);
    return resnet_forward_impl(y, antisymmetric_kernel(weight.contiguous(), gamma),
                               in_dtype_of(bias, y).contiguous(), step, act, store);
  }

  static T3 antisymmetric_backward(const Tensor& grad_out, const Tensor& states,
                                   const Tensor& weight, const Tensor& bias, double step,
                                   double gamma, c10::string_view activation) {
    check_conv_stack(grad_out, weight, bias);
    check_conv_states(states, 2, grad_out, weight);
    check_step(step);
    check_gamma(gamma);
    const Act act = parse_activation(activation);
    auto [gy, gA, gb] =
        resnet_backward_impl(grad_out, states.contiguous(),
                             antisymmetric_kernel(weight.contiguous(), gamma), step, act);
    return {gy, antisymmetric_kernel_grad(gA), gb};
  }

  // ---------------------------------------------------------- leapfrog

  static T3 leapfrog_forward(const Tensor& y, const Tensor& yprev_in, const Tensor& weight,
                             const Tensor& bias, double step, c10::string_view activation,
                             bool store) {
    check_conv_stack(y, weight, bias);
    check_like(yprev_in, "y_prev", y);
    check_step(step);
    const Act act = parse_activation(activation);
    const Tensor b = in_dtype_of(bias, y).contiguous();
    const int64_t N = weight.size(0);
    const double h2 = step * step;
    Tensor states = empty_states(y, store ? N : 0, 2);
    if (y.numel() == 0)
      return {y.clone(at::MemoryFormat::Contiguous), yprev_in.clone(at::MemoryFormat::Contiguous),
              states};
    const Kernels k = kernels(weight, y);
    // y_prev is often y itself (zero velocity): then one conversion serves both
    const bool same = yprev_in.is_same(y);
    if (!store) {
      Tensor Y = own_copy(y), Yp;
      if (same) {
        Yp = scratch(Y);
        Yp.copy_(Y);
      } else {
        Yp = own_copy(yprev_in);
      }
      for (int64_t j = 0; j < N; ++j) {
        Tensor X = fwd(Y, k, j);
        E::bias_act(act, X, b[j], Tensor(), X, Tensor());
        const Tensor Q = adj(X, k, j);
        E::leapfrog_step(Y, Yp, Q, h2, Yp);
        std::swap(Y, Yp);
      }
      return {nchw(Y), nchw(Yp), states};
    }
    assign(slot(states, 0, 0), y);
    const Tensor yprev = same ? slot(states, 0, 0) : internal(yprev_in);
    Tensor out;
    for (int64_t j = 0; j < N; ++j) {
      const Tensor Yj = slot(states, j, 0);
      const Tensor Yp = j == 0 ? yprev : slot(states, j - 1, 0);
      Tensor X = fwd(Yj, k, j);
      E::bias_act(act, X, b[j], slot(states, j, 1), X, Tensor());
      const Tensor Q = adj(X, k, j);
      // the last layer writes Y_N over Q (same index)
      out = j + 1 < N ? slot(states, j + 1, 0) : Q;
      E::leapfrog_step(Yj, Yp, Q, h2, out);
    }
    // Y_{N-1}: for one layer y itself (a plain copy where y is NCHW, not a conversion)
    return {nchw(out), nchw_copy(N == 1 ? y : slot(states, N - 1, 0)), states};
  }

  // states defined: stored mode; else (y_hi, y_lo) = (Y_N, Y_{N-1}) seed the rebuild,
  // and the last two results are the rebuilt inputs (Y_0, Y_{-1}). Gradients and
  // seeds in any layout (read only).
  static T6 leapfrog_backward_impl(const Tensor& ga_in, const Tensor& gc_in, const Tensor& states,
                                   const Tensor& y_hi, const Tensor& y_lo, const Tensor& Kw,
                                   const Tensor& b, double h, Act act) {
    const int64_t N = Kw.size(0);
    const bool rev = !states.defined();
    const double h2 = h * h;
    if (ga_in.numel() == 0)
      return {at::zeros_like(ga_in, at::MemoryFormat::Contiguous),
              at::zeros_like(ga_in, at::MemoryFormat::Contiguous), at::zeros_like(Kw),
              at::zeros({N, Kw.size(1)}, Kw.options()), clone_if_defined(y_hi),
              clone_if_defined(y_lo)};
    const Kernels k = kernels(Kw, ga_in);
    Tensor gW = at::empty(Kw.sizes(), Kw.options()), gb = at::empty({N, Kw.size(1)}, Kw.options());
    const Tensor ga = internal(ga_in), gc = internal(gc_in);
    const bool wide = widen_grads(ga, gW);
    // (a, cs * c) = (dL/dY_{j+1}, dL/dY_j so far). The incoming gradients are
    // read, never written; two buffers of our own (`own`) take the new a's in
    // turn, and the new c is the old a with its sign flipped (a flag, not a pass).
    Tensor a = ga, c = gc;
    double cs = 1.0;
    Tensor own[2];
    int next = 0;
    // bfloat16/float16: the adjoints (a, c) are carried in float32 from layer to layer
    // (a32, c32; a16 is a's copy the convolutions read), as the dense stacks carry
    // their states: a bf16 carry rounded the second-order recurrence at every layer,
    // up to 1.4x PyTorch autocast's input-gradient error (benchmarks/amp_error.py).
    const bool carry32 = c10::isReducedFloatingType(ga.scalar_type());
    Tensor a32, c32;
    if (carry32) a32 = widened(ga), c32 = widened(gc);
    Tensor A = scratch(ga), D = scratch(ga);
    Tensor Y, Yn;
    if (rev) {
      Y = own_copy(y_lo);
      Yn = own_copy(y_hi);
    }
    for (int64_t j = N - 1; j >= 0; --j) {
      Tensor Yj;
      if (rev) {
        Yj = Y;
        E::bias_act(act, fwd(Yj, k, j), b[j], Tensor(), A, D);
      } else {
        Yj = slot(states, j, 0);
        E::bias_act(act, slot(states, j, 1), Tensor(), Tensor(), A, D);
      }
      // Y_{j+1} = ... - h^2 K^T A:  dL/dA = -h^2 K lam, dL/dK (this term) = -h^2 (.)
      auto [gA, gwq, unused] = grads(a, A, k, j, true, {true, true, false});
      E::scale_mul(gA, D, -h2);  // gA is now G = dL/dP
      auto [gY, gwp, gbj] = grads(gA, Yj, k, j, false, {true, true, !wide});
      combine(gW[j], gwp, gwq, -h2);
      gb[j].copy_(wide ? bias_grad32(gA) : gbj);
      if (carry32) {
        // new a = cs c + 2 a + gY in float32 over c32 (always ours, never a32), and its
        // copy for the convolutions
        Tensor o16 = scratch(ga);
        E::leapfrog_adjoint_wide(c32, o16, c32, cs, a32, gY);
        std::swap(c32, a32);
        c = a, a = o16;
      } else {
        // new a = cs c + 2 a + gY, into c where c is ours, else into a buffer of ours
        Tensor out;
        if (c.is_same(own[0]) || c.is_same(own[1])) {
          out = c;
        } else {
          if (!own[next].defined()) own[next] = scratch(ga);
          out = own[next];
          next ^= 1;
          if (out.is_same(a)) {  // a is ours and about to become c: use the other buffer
            if (!own[next].defined()) own[next] = scratch(ga);
            out = own[next];
            next ^= 1;
          }
        }
        E::leapfrog_adjoint(out, c, cs, a, gY);
        c = a;
        a = out;
      }
      cs = -1.0;
      if (rev) {
        E::leapfrog_step(Y, Yn, adj(A, k, j), h2, Yn);  // Y_{j-1}
        std::swap(Y, Yn);
      }
    }
    // cs = -1 after any layer: dL/dY_{-1} = -c, written NCHW in one pass
    Tensor gprev = L::empty(c.sizes(), c.options());
    if (!relayout(gprev, c, Tensor(), -1.0)) at::neg_out(gprev, c);
    if (rev) return {nchw(a), gprev, gW, gb, nchw(Yn), nchw(Y)};  // (Y_0, Y_{-1})
    return {nchw(a), gprev, gW, gb, Tensor(), Tensor()};
  }

  static T4 leapfrog_backward(const Tensor& grad_y, const Tensor& grad_y_prev,
                              const Tensor& states, const Tensor& weight, const Tensor& bias,
                              double step, c10::string_view activation) {
    check_conv_stack(grad_y, weight, bias);
    check_like(grad_y_prev, "grad_y_prev", grad_y);
    check_conv_states(states, 2, grad_y, weight);
    check_step(step);
    const Act act = parse_activation(activation);
    auto r = leapfrog_backward_impl(grad_y, grad_y_prev, states.contiguous(), Tensor(), Tensor(),
                                    weight, in_dtype_of(bias, grad_y).contiguous(), step, act);
    return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r)};
  }

  static T6 leapfrog_backward_reversible(const Tensor& grad_y, const Tensor& grad_y_prev,
                                         const Tensor& y, const Tensor& y_prev,
                                         const Tensor& weight, const Tensor& bias, double step,
                                         c10::string_view activation) {
    check_conv_stack(grad_y, weight, bias);
    check_like(grad_y_prev, "grad_y_prev", grad_y);
    check_like(y, "y", grad_y);
    check_like(y_prev, "y_prev", grad_y);
    check_step(step);
    const Act act = parse_activation(activation);
    return leapfrog_backward_impl(grad_y, grad_y_prev, Tensor(), y, y_prev, weight,
                                  in_dtype_of(bias, grad_y).contiguous(), step, act);
  }

  // ------------------------------------------------------------ verlet

  static T3 verlet_forward(const Tensor& y, const Tensor& z_in, const Tensor& weight,
                           const Tensor& bias, double step, c10::string_view activation,
                           bool store) {
    check_conv_stack(y, weight, bias);
    check_like(z_in, "z", y);
    check_step(step);
    const Act act = parse_activation(activation);
    const Tensor b = in_dtype_of(bias, y).contiguous();
    const int64_t N = weight.size(0);
    const double h = step;
    Tensor states = empty_states(y, store ? N : 0, 4);
    if (y.numel() == 0)
      return {y.clone(at::MemoryFormat::Contiguous), z_in.clone(at::MemoryFormat::Contiguous),
              states};
    const Kernels k = kernels(weight, y);
    if (!store) {
      Tensor Y = own_copy(y), Z = own_copy(z_in);
      for (int64_t j = 0; j < N; ++j) {
        E::residual_act(act, fwd(Y, k, j), b[j], Z, -h, Tensor(), Z);
        E::residual_act(act, adj(Z, k, j), b[j], Y, h, Tensor(), Y);
      }
      return {nchw(Y), nchw(Z), states};
    }
    const Tensor z = internal(z_in);
    assign(slot(states, 0, 0), y);
    Tensor out;
    for (int64_t j = 0; j < N; ++j) {
      const Tensor Yj = slot(states, j, 0), Zj = slot(states, j, 2);
      const Tensor Zprev = j == 0 ? z : slot(states, j - 1, 2);
      E::residual_act(act, fwd(Yj, k, j), b[j], Zprev, -h, slot(states, j, 1), Zj);
      const Tensor X = adj(Zj, k, j);
      out = j + 1 < N ? slot(states, j + 1, 0) : X;  // the last layer: Y_N over X
      E::residual_act(act, X, b[j], Yj, h, slot(states, j, 3), out);
    }
    return {nchw(out), nchw_copy(slot(states, N - 1, 2)), states};
  }

  // states defined: stored mode; else (y_end, z_end) = (Y_N, Z_{N-1/2}) seed the rebuild,
  // and the last two results are the rebuilt inputs (Y_0, Z_{-1/2}). Gradients and
  // seeds in any layout (read only).
  static T6 verlet_backward_impl(const Tensor& gy_in, const Tensor& gz_in, const Tensor& states,
                                 const Tensor& y_end, const Tensor& z_end, const Tensor& Kw,
                                 const Tensor& b, double h, Act act) {
    const int64_t N = Kw.size(0);
    const bool rev = !states.defined();
    if (gy_in.numel() == 0)
      return {at::zeros_like(gy_in, at::MemoryFormat::Contiguous),
              at::zeros_like(gy_in, at::MemoryFormat::Contiguous), at::zeros_like(Kw),
              at::zeros({N, Kw.size(1)}, Kw.options()), clone_if_defined(y_end),
              clone_if_defined(z_end)};
    const Kernels k = kernels(Kw, gy_in);
    Tensor gW = at::empty(Kw.sizes(), Kw.options()), gb = at::empty({N, Kw.size(1)}, Kw.options());
    // gy, gz: the incoming gradients (read only) until a layer adds to them,
    // then buffers of ours (own_y, own_z).
    Tensor gy = internal(gy_in), gz = internal(gz_in);
    Tensor G = scratch(gy), own_y, own_z = scratch(gy), gi;
    Tensor Y, Z, Zn, P1, P2;
    if (rev) {
      Y = own_copy(y_end);
      Z = own_copy(z_end);
      Zn = scratch(Z);
      P1 = scratch(Z);
      P2 = scratch(Z);
    }
    for (int64_t j = N - 1; j >= 0; --j) {
      Tensor Yj, Zj, P1j, P2j;
      if (rev) {
        // Y_j = Y_{j+1} - h act(K^T Z_{j+1/2} + b);  Z_{j-1/2} = Z_{j+1/2} + h act(K Y_j + b)
        E::residual_act(act, adj(Z, k, j), b[j], Y, -h, P2, Y);
        E::residual_act(act, fwd(Y, k, j), b[j], Z, h, P1, Zn);
        Yj = Y, Zj = Z, P1j = P1, P2j = P2;
      } else {
        Yj = slot(states, j, 0), P1j = slot(states, j, 1), Zj = slot(states, j, 2),
        P2j = slot(states, j, 3);
      }
      if (gi.defined() && !own_y.defined()) own_y = scratch(gy);
      E::grad_act(act, gy, gi, P2j, h, G, own_y);  // gy += (previous layer's K^T G1); G2
      if (gi.defined()) gy = own_y;
      // bfloat16/float16: the two halves' bias gradients summed in float32 and rounded
      // once (each rounded, then their sum, was up to 1.8x the error of PyTorch's
      // autocast, which adds the two rounded halves in the float32 parameter's gradient)
      const bool sum32 = c10::isReducedFloatingType(G.scalar_type());
      auto [gz2, gw2, gb2] = grads(G, Zj, k, j, true, {true, true, !sum32});
      if (sum32) gb2 = bias_grad32(G);
      E::grad_act(act, gz, gz2, P1j, -h, G, own_z);  // gz += K G2; G1
      gz = own_z;
      auto [gy1, gw1, gb1] = grads(G, Yj, k, j, false, {true, true, !sum32});
      Tensor gbj = gb[j];
      combine(gW[j], gw1, gw2, 1.0);
      if (sum32)
        gbj.copy_(gb2.add_(bias_grad32(G)));
      else
        at::add_out(gbj, gb1, gb2);
      gi = gy1;
      if (rev) std::swap(Z, Zn);
    }
    const Tensor gy_out = nchw_sum(gy, gi);
    if (rev) return {gy_out, nchw(gz), gW, gb, nchw(Y), nchw(Z)};  // (Y_0, Z_{-1/2})
    return {gy_out, nchw(gz), gW, gb, Tensor(), Tensor()};
  }

  static T4 verlet_backward(const Tensor& grad_y, const Tensor& grad_z, const Tensor& states,
                            const Tensor& weight, const Tensor& bias, double step,
                            c10::string_view activation) {
    check_conv_stack(grad_y, weight, bias);
    check_like(grad_z, "grad_z", grad_y);
    check_conv_states(states, 4, grad_y, weight);
    check_step(step);
    const Act act = parse_activation(activation);
    auto r = verlet_backward_impl(grad_y, grad_z, states.contiguous(), Tensor(), Tensor(), weight,
                                  in_dtype_of(bias, grad_y).contiguous(), step, act);
    return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r)};
  }

  static T6 verlet_backward_reversible(const Tensor& grad_y, const Tensor& grad_z,
                                       const Tensor& y, const Tensor& z, const Tensor& weight,
                                       const Tensor& bias, double step,
                                       c10::string_view activation) {
    check_conv_stack(grad_y, weight, bias);
    check_like(grad_z, "grad_z", grad_y);
    check_like(y, "y", grad_y);
    check_like(z, "z", grad_y);
    check_step(step);
    const Act act = parse_activation(activation);
    return verlet_backward_impl(grad_y, grad_z, Tensor(), y, z, weight,
                                in_dtype_of(bias, grad_y).contiguous(), step, act);
  }
};

}  // namespace conv_detail
}  // namespace stablenets

// Registers every conv op for one dispatch key with ConvStack<Launcher>;
// Launcher::native_reduced(y) says whether bfloat16/float16 calls run in that
// dtype (convolutions included) rather than on float32 copies.
#define SN_REGISTER_CONV_OPS(m, Launcher)                                                    \
  do {                                                                                       \
    using L = Launcher;                                                                      \
    using S = ::stablenets::conv_detail::ConvStack<L>;                                       \
    SN_IMPL_NATIVE(m, "conv_resnet_forward", &S::resnet_forward, &L::native_reduced);        \
    SN_IMPL_NATIVE(m, "conv_resnet_backward", &S::resnet_backward, &L::native_reduced);      \
    SN_IMPL_NATIVE(m, "conv_antisymmetric_forward", &S::antisymmetric_forward, &L::native_reduced); \
    SN_IMPL_NATIVE(m, "conv_antisymmetric_backward", &S::antisymmetric_backward,             \
                   &L::native_reduced);                                                      \
    SN_IMPL_NATIVE(m, "conv_leapfrog_forward", &S::leapfrog_forward, &L::native_reduced);    \
    SN_IMPL_NATIVE(m, "conv_leapfrog_backward", &S::leapfrog_backward, &L::native_reduced);  \
    SN_IMPL_NATIVE(m, "conv_leapfrog_backward_reversible", &S::leapfrog_backward_reversible, \
                   &L::native_reduced);                                                      \
    SN_IMPL_NATIVE(m, "conv_verlet_forward", &S::verlet_forward, &L::native_reduced);        \
    SN_IMPL_NATIVE(m, "conv_verlet_backward", &S::verlet_backward, &L::native_reduced);      \
    SN_IMPL_NATIVE(m, "conv_verlet_backward_reversible", &S::verlet_backward_reversible,     \
                   &L::native_reduced);                                                      \
  } while (0)
