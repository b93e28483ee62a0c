// Forward-Euler ResNet stack on the CPU: Y <- Y + h act(Y K_j^T + b_j).
// States per layer: [Y_j, A_j = act(P_j)] (A gives act' without a second
// activation evaluation in the backward). The antisymmetric stack runs the same
// kernels on W_j = (K_j - K_j^T - gamma I) / 2: narrow stacks transform all
// layers up front, wide ones one layer at a time into a reused d x d buffer
// (a whole transformed copy of a wide weight costs as much as the GEMMs).
#include <torch/library.h>

#include "resnet_impl.h"
#include "stablenets/kernels.h"
#include "tile.h"

namespace stablenets {
namespace cpu_detail {
namespace {

// S: the storage type of y, out and states (T, or bfloat16/float16 with T = float).
template <typename T, Act A, typename S = T>
void forward_narrow(const S* y, const T* K, const T* b, T h, int64_t N, int64_t B, int64_t d,
                    S* out, S* states) {
  for_tiles(B, N * d * d, [&](int64_t, int64_t row0, int64_t rows) {
    std::vector<T> buf(2 * d * kTile);
    T* Y = buf.data();
    T* P = Y + d * kTile;
    load_tile(y + row0 * d, rows, d, Y);
    for (int64_t j = 0; j < N; ++j) {
      tile_gemm<T, false>(K + j * d * d, d, b + j * d, Y, P, T(1), false);
      if (states) save_state(Y, rows, d, states + ((j * 2 + 0) * B + row0) * d);
#pragma omp simd
      for (int64_t e = 0; e < d * kTile; ++e) {
        const T a = act_f<A, T>(P[e]);
        if constexpr (!kStoresPre<A>) P[e] = a;
        Y[e] += h * a;
      }
      if (states) save_state(P, rows, d, states + ((j * 2 + 1) * B + row0) * d);
    }
    store_tile(Y, rows, d, out + row0 * d);
  });
}

template <typename T, Act A, typename S = T>
void backward_narrow(const S* gout, const S* states, const T* K, T h, int64_t N, int64_t B,
                     int64_t d, S* gy, Partials<T>& part) {
  for_tiles(B, N * d * d, [&](int64_t c, int64_t row0, int64_t rows) {
    std::vector<T> buf(3 * d * kTile);
    T* L = buf.data();
    T* Y = L + d * kTile;
    T* G = Y + d * kTile;
    load_tile(gout + row0 * d, rows, d, L);
    for (int64_t j = N - 1; j >= 0; --j) {
      const S* ys = states + ((j * 2 + 0) * B + row0) * d;
      const S* as = states + ((j * 2 + 1) * B + row0) * d;
      auto layer = [&](const auto* Ys, const auto* As) {
#pragma omp simd
        for (int64_t e = 0; e < d * kTile; ++e)
          G[e] = h * L[e] * stored_grad<A, T>(widen<T>(As[e]));
        tile_outer(G, Ys, d, rows, T(1), part.dw(c, j, d));
        tile_rowsum(G, d, rows, part.db(c, j, d));
        tile_gemm<T, true>(K + j * d * d, d, nullptr, G, L, T(1), true);  // L += G K_j
      };
      // a full tile's states read in place (kStatesInPlace), else tiles of T
      if constexpr (kStatesInPlace<S, T>) {
        if (rows == kTile) {
          layer(ys, as);
          continue;
        }
      }
      layer(state_tile(ys, rows, d, Y), state_tile(as, rows, d, G));
    }
    store_tile(L, rows, d, gy + row0 * d);
  });
}

// Layer j's weight: K_j, or its antisymmetric transform written into buf.
template <typename T>
at::Tensor layer_weight(const at::Tensor& K, int64_t j, const double* gamma, at::Tensor& buf) {
  if (!gamma) return K[j];
  buf.copy_(K[j]);
  antisymmetrize_inplace<T>(buf.data_ptr<T>(), K.size(1), static_cast<T>(*gamma));
  return buf;
}

template <typename T, Act A>
void forward_wide(const at::Tensor& y, const at::Tensor& K, const at::Tensor& b, T h,
                  at::Tensor& out, at::Tensor& states, bool store, const double* gamma) {
  const int64_t N = K.size(0);
  store = store && N > 0;
  // Y_j: in its state slot when states are kept (Y_{j+1} is written straight
  // into the next slot), else updated in place in out.
  at::Tensor cur = store ? slot(states, 0, 0) : out;
  cur.copy_(y);
  at::Tensor P = store ? at::Tensor() : at::empty_like(out);
  at::Tensor wbuf = gamma ? at::empty({K.size(1), K.size(2)}, K.options()) : at::Tensor();
  for (int64_t j = 0; j < N; ++j) {
    if (store) P = slot(states, j, 1);
    at::mm_out(P, cur, layer_weight<T>(K, j, gamma, wbuf).t());
    const at::Tensor next = store && j + 1 < N ? slot(states, j + 1, 0) : out;
    act_step<T, A>(next, cur, P, h, b[j].data_ptr<T>());
    cur = next;
  }
}

template <typename T, Act A>
void backward_wide(const at::Tensor& gout, const at::Tensor& states, const at::Tensor& K, T h,
                   at::Tensor& gy, at::Tensor& gw, at::Tensor& gb, const double* gamma) {
  const int64_t N = K.size(0), d = K.size(1);
  gy.copy_(gout);
  at::Tensor G = at::empty_like(gy);
  at::Tensor wbuf = gamma ? at::empty({d, d}, K.options()) : at::Tensor();
  at::Tensor gwbuf = gamma ? at::empty({d, d}, K.options()) : at::Tensor();
  for (int64_t j = N - 1; j >= 0; --j) {
    const T* ap = slot(states, j, 1).data_ptr<T>();
    const T* lp = gy.data_ptr<T>();
    T* gp = G.data_ptr<T>();
    colsum_pass<T>(G.size(0), d, gb[j].data_ptr<T>(), false, [&](int64_t e) {
      return gp[e] = h * lp[e] * stored_grad<A, T>(ap[e]);
    });
    at::Tensor gwj = gw[j];
    if (gamma) {
      // dL/dW_j, then dL/dK_j = (dL/dW_j - dL/dW_j^T) / 2
      at::mm_out(gwbuf, G.t(), slot(states, j, 0));
      antisymmetrize<T>(gwbuf.data_ptr<T>(), 1, d, T(0), gwj.data_ptr<T>());
    } else {
      at::mm_out(gwj, G.t(), slot(states, j, 0));
    }
    gy.addmm_(G, layer_weight<T>(K, j, gamma, wbuf));
  }
}

// ------------------------------------------------- bfloat16 / float16, wide
//
// Storage (inputs, outputs, stored states, gradients) in T = bfloat16 (float16 takes
// float32 copies: tile.h, wide_reduced_native), the layer's products as ATen GEMMs
// in T (oneDNN accumulates them in float32, on AVX-512 BF16 / AMX where the CPU has
// them: 2x the float32 GEMM on this machine, 1.7 against 3.4 ms), and the
// rest in float32: the carried state Y (forward) and adjoint L (backward) stay
// float32 across all layers, T copies of them feed the GEMMs and the stored states.
// Plain PyTorch under autocast rounds Y to T at every layer instead.

template <typename T, Act A>
void forward_wide_reduced(const at::Tensor& y, const at::Tensor& K, const at::Tensor& b, float h,
                          at::Tensor& out, at::Tensor& states, bool store, const double* gamma) {
  const int64_t N = K.size(0), B = y.size(0), d = y.size(1);
  store = store && N > 0;
  at::Tensor Y32 = y.to(at::kFloat);
  float* yp = Y32.data_ptr<float>();
  at::Tensor cur = store ? slot(states, 0, 0) : out;  // Y_j in T: the GEMM's input
  cur.copy_(y);
  at::Tensor P = at::empty({B, d}, y.options());
  at::Tensor wbuf = gamma ? at::empty({d, d}, K.options()) : at::Tensor();
  for (int64_t j = 0; j < N; ++j) {
    at::mm_out(P, cur, layer_weight<T>(K, j, gamma, wbuf).t());
    const at::Tensor next = store && j + 1 < N ? slot(states, j + 1, 0) : out;
    const T* pp = P.data_ptr<T>();
    const T* bj = b.data_ptr<T>() + j * d;
    T* np = next.data_ptr<T>();
    T* ap = store ? slot(states, j, 1).data_ptr<T>() : nullptr;
    act_step_reduced<T, A>(B, d, yp, np, pp, ap, h, bj);
    cur = next;
  }
}

template <typename T, Act A>
void backward_wide_reduced(const at::Tensor& gout, const at::Tensor& states, const at::Tensor& K,
                           float h, at::Tensor& gy, at::Tensor& gw, at::Tensor& gb,
                           const double* gamma) {
  const int64_t N = K.size(0), B = gout.size(0), d = K.size(1);
  at::Tensor L32 = gout.to(at::kFloat);
  float* lp = L32.data_ptr<float>();
  at::Tensor G = at::empty({B, d}, gout.options()), GK = at::empty({B, d}, gout.options());
  at::Tensor wbuf = gamma ? at::empty({d, d}, K.options()) : at::Tensor();
  at::Tensor gwbuf = gamma ? at::empty({d, d}, K.options()) : at::Tensor();
  std::vector<float> gb32(d);
  for (int64_t j = N - 1; j >= 0; --j) {
    const T* ap = slot(states, j, 1).data_ptr<T>();
    T* gp = G.data_ptr<T>();
    colsum_pass<float>(B, d, gb32.data(), false, [&](int64_t e) {
      const float g = h * lp[e] * stored_grad<A, float>(static_cast<float>(ap[e]));
      gp[e] = round_to<T>(g);
      return g;
    });
    put_bias_grad<T>(gb, j, gb32.data());
    at::Tensor gwj = gw[j];
    if (gamma) {
      at::mm_out(gwbuf, G.t(), slot(states, j, 0));
      antisymmetrize<T>(gwbuf.data_ptr<T>(), 1, d, T(0), gwj.data_ptr<T>());
    } else {
      at::mm_out(gwj, G.t(), slot(states, j, 0));
    }
    at::mm_out(GK, G, layer_weight<T>(K, j, gamma, wbuf));  // L += G K_j, in float32
    const T* gk = GK.data_ptr<T>();
    ew(B * d, [&](int64_t e0, int64_t e1) {
#pragma omp simd
      for (int64_t e = e0; e < e1; ++e) lp[e] += static_cast<float>(gk[e]);
    });
  }
  gy.copy_(L32);
}

}  // namespace

// Narrow stacks keep float32 tiles over bf16/fp16 memory; wide ones serve bfloat16
// (their GEMMs in bf16), while wide float16 takes float32 copies (tile.h:
// reduced_native, wide_reduced_native).
bool resnet_reduced_native(const at::Tensor& first) { return reduced_native(first); }

at::Tensor antisymmetric_weight(const at::Tensor& K_in, double gamma) {
  const at::Tensor K = K_in.contiguous();
  at::Tensor out = at::empty_like(K);
  AT_DISPATCH_FLOATING_TYPES(K.scalar_type(), "antisymmetrize", [&] {
    antisymmetrize<scalar_t>(K.data_ptr<scalar_t>(), K.size(0), K.size(1),
                             static_cast<scalar_t>(gamma), out.data_ptr<scalar_t>());
  });
  return out;
}

// Narrow stacks in bfloat16/float16: the float32 tile kernels reading and writing
// reduced-precision memory; weights (N d^2, small) converted to float32 up front.
static std::vector<float> narrow_weight_f32(const at::Tensor& K_in, const double* gamma) {
  std::vector<float> K = small_float(K_in);
  if (!gamma) return K;
  std::vector<float> W(K.size());
  antisymmetrize<float>(K.data(), K_in.size(0), K_in.size(1), static_cast<float>(*gamma), W.data());
  return W;
}

T2 resnet_forward_impl(const at::Tensor& y_in, const at::Tensor& K_in, const at::Tensor& b_in,
                       double step, Act act, bool store, const double* gamma) {
  if (in_float32_below(y_in, K_in)) {  // tile.h: float32 parameters
    return rp_detail::down(
        resnet_forward_impl(rp_detail::up(y_in), K_in, b_in, step, act, store, gamma),
        y_in.scalar_type());
  }
  const at::Tensor y = y_in.contiguous(), b = b_in.contiguous();
  const int64_t N = K_in.size(0), B = y.size(0), d = y.size(1);
  at::Tensor out = at::empty({B, d}, y.options());
  at::Tensor states = empty_states(y, store ? N : 0, 2);
  if (is_reduced(y.scalar_type())) {
    const std::vector<float> Kf = narrow(d) ? narrow_weight_f32(K_in, gamma) : std::vector<float>();
    const std::vector<float> bf = narrow(d) ? small_float(b) : std::vector<float>();
    AT_DISPATCH_REDUCED_FLOATING_TYPES(y.scalar_type(), "resnet_forward_reduced", [&] {
      SN_DISPATCH_ACT(act, [&] {
        if (narrow(d)) {
          forward_narrow<float, kAct, scalar_t>(
              y.data_ptr<scalar_t>(), Kf.data(), bf.data(),
              static_cast<float>(step), N, B, d, out.data_ptr<scalar_t>(),
              store ? states.data_ptr<scalar_t>() : nullptr);
        } else {
          forward_wide_reduced<scalar_t, kAct>(y, params_as(K_in, y.scalar_type()),
                                               params_as(b, y.scalar_type()),
                                               static_cast<float>(step), out, states, store, gamma);
        }
      });
    });
    return {out, states};
  }
  // Narrow stacks: transform all layers up front (d <= 32, so it is tiny).
  const at::Tensor K = (gamma && narrow(d)) ? antisymmetric_weight(K_in, *gamma) : K_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "resnet_forward", [&] {
    const scalar_t h = static_cast<scalar_t>(step);
    SN_DISPATCH_ACT(act, [&] {
      if (narrow(d)) {
        forward_narrow<scalar_t, kAct>(y.data_ptr<scalar_t>(), K.data_ptr<scalar_t>(),
                                       b.data_ptr<scalar_t>(), h, N, B, d,
                                       out.data_ptr<scalar_t>(),
                                       store ? states.data_ptr<scalar_t>() : nullptr);
      } else {
        forward_wide<scalar_t, kAct>(y, K, b, h, out, states, store, gamma);
      }
    });
  });
  return {out, states};
}

T3 resnet_backward_impl(const at::Tensor& gout_in, const at::Tensor& states_in,
                        const at::Tensor& K_in, double step, Act act, const double* gamma) {
  if (in_float32_below(gout_in, K_in)) {  // tile.h: float32 parameters
    auto [gy, gw, gb] = resnet_backward_impl(rp_detail::up(gout_in), rp_detail::up(states_in),
                                             K_in, step, act, gamma);
    return {rp_detail::down(gy, gout_in.scalar_type()), gw, gb};
  }
  const at::Tensor gout = gout_in.contiguous(), states = states_in.contiguous();
  // the parameters' gradients in the parameters' dtype (y's, or float32: tile.h)
  const at::ScalarType param_type = K_in.scalar_type();
  const int64_t N = K_in.size(0), B = gout.size(0), d = gout.size(1);
  at::Tensor gy = at::empty({B, d}, gout.options());
  at::Tensor gw, gb;
  if (is_reduced(gout.scalar_type())) {
    if (narrow(d)) {
      const std::vector<float> Kf = narrow_weight_f32(K_in, gamma);
      const int64_t chunks = num_chunks(B, N * d * d);
      Partials<float> part(chunks, N, d, gout.options().dtype(at::kFloat));
      AT_DISPATCH_REDUCED_FLOATING_TYPES(gout.scalar_type(), "resnet_backward_reduced", [&] {
        SN_DISPATCH_ACT(act, [&] {
          backward_narrow<float, kAct, scalar_t>(
              gout.data_ptr<scalar_t>(), states.data_ptr<scalar_t>(), Kf.data(),
              static_cast<float>(step), N, B, d, gy.data_ptr<scalar_t>(), part);
        });
      });
      if (!gamma) {
        std::tie(gw, gb) = part.sum(chunks, param_type);
        return {gy, gw, gb};
      }
      std::tie(gw, gb) = part.sum(chunks);
      gw = antisymmetric_weight(gw, 0.0);
      return {gy, gw.to(param_type), gb.to(param_type)};
    }
    gw = empty_cached({N, d, d}, gout.options());
    gb = at::empty({N, d}, gout.options().dtype(param_type));
    AT_DISPATCH_REDUCED_FLOATING_TYPES(gout.scalar_type(), "resnet_backward_reduced", [&] {
      SN_DISPATCH_ACT(act, [&] {
        backward_wide_reduced<scalar_t, kAct>(gout, states, params_as(K_in, gout.scalar_type()),
                                              static_cast<float>(step), gy, gw, gb, gamma);
      });
    });
    return {gy, params_as(gw, param_type), gb};
  }
  const at::Tensor K = (gamma && narrow(d)) ? antisymmetric_weight(K_in, *gamma) : K_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES(gout.scalar_type(), "resnet_backward", [&] {
    const scalar_t h = static_cast<scalar_t>(step);
    SN_DISPATCH_ACT(act, [&] {
      if (narrow(d)) {
        Partials<scalar_t> part(num_chunks(B, N * d * d), N, d, gout.options());
        backward_narrow<scalar_t, kAct>(gout.data_ptr<scalar_t>(), states.data_ptr<scalar_t>(),
                                        K.data_ptr<scalar_t>(), h, N, B, d,
                                        gy.data_ptr<scalar_t>(), part);
        std::tie(gw, gb) = part.sum(num_chunks(B, N * d * d));
        if (gamma) gw = antisymmetric_weight(gw, 0.0);  // dL/dK = (dL/dW - dL/dW^T) / 2
      } else {
        gw = empty_cached({N, d, d}, gout.options());
        gb = at::empty({N, d}, gout.options());
        backward_wide<scalar_t, kAct>(gout, states, K, h, gy, gw, gb, gamma);
      }
    });
  });
  return {gy, gw, gb};
}

}  // namespace cpu_detail

namespace cpu {

T2 resnet_forward(const at::Tensor& y, const at::Tensor& weight, const at::Tensor& bias,
                  double step, c10::string_view activation, bool store) {
  check_stack(y, weight, bias, /*float32_params=*/true);
  check_step(step);
  return cpu_detail::resnet_forward_impl(y, weight, bias, step, parse_activation(activation),
                                         store, nullptr);
}

T3 resnet_backward(const at::Tensor& grad_out, const at::Tensor& states,
                   const at::Tensor& weight, const at::Tensor& bias, double step,
                   c10::string_view activation) {
  check_stack(grad_out, weight, bias, /*float32_params=*/true);
  check_states(states, 2, grad_out, weight);
  check_step(step);
  return cpu_detail::resnet_backward_impl(grad_out, states, weight, step,
                                          parse_activation(activation), nullptr);
}

}  // namespace cpu
}  // namespace stablenets

TORCH_LIBRARY_IMPL(stablenets, CPU, m) {
  SN_IMPL_NATIVE(m, "resnet_forward", &stablenets::cpu::resnet_forward,
                 &stablenets::cpu_detail::resnet_reduced_native);
  SN_IMPL_NATIVE(m, "resnet_backward", &stablenets::cpu::resnet_backward,
                 &stablenets::cpu_detail::resnet_reduced_native);
}
