// Verlet (Hamiltonian) stack on the CPU:
//   Z_{j+1/2} = Z_{j-1/2} - h act(Y_j K_j + b_j),   Y_{j+1} = Y_j + h act(Z_{j+1/2} K_j^T + b_j)
// outputs (Y_N, Z_{N-1/2}). States per layer: [Y_j, A1_j, Z_{j+1/2}, A2_j] with
// A = act(P), which gives act' in the backward without re-evaluating act.
// The reversible backward runs the two half steps backwards from the outputs.
//
// Backward with (ly, lz) = (dL/dY_{j+1}, dL/dZ_{j+1/2}):
//   G2 = h ly * act'(P2);   lz += G2 K;    dK += G2^T Z;   db += sum G2
//   G1 = -h lz * act'(P1);  ly += G1 K^T;  dK += Y^T G1;   db += sum G1
// where P1 = Y K + b, P2 = Z K^T + b.
#include <torch/library.h>

#include "stablenets/kernels.h"
#include "tile.h"

namespace stablenets {
namespace cpu_detail {
namespace {

template <typename T>
T* slot_ptr(T* states, int64_t j, int64_t s, int64_t B, int64_t row0, int64_t d) {
  return states + ((j * 4 + s) * B + row0) * d;
}

// S: the storage type of the inputs, outputs and states (T, or bfloat16/float16
// with T = float: float32 tiles, so (Y, Z) stay float32 through the stack, as in
// resnet.cpp's narrow kernels).
template <typename T, Act A, typename S = T>
void forward_narrow(const S* y, const S* z, const T* K, const T* b, T h, int64_t N, int64_t B,
                    int64_t d, S* out_y, S* out_z, S* states) {
  for_tiles(B, N * d * d, [&](int64_t, int64_t row0, int64_t rows) {
    std::vector<T> buf(3 * d * kTile);
    T* Y = buf.data();
    T* Z = Y + d * kTile;
    T* P = Z + d * kTile;
    load_tile(y + row0 * d, rows, d, Y);
    load_tile(z + row0 * d, rows, d, Z);
    for (int64_t j = 0; j < N; ++j) {
      const T* Kj = K + j * d * d;
      const T* bj = b + j * d;
      if (states) save_state(Y, rows, d, slot_ptr(states, j, 0, B, row0, d));
      tile_gemm<T, true>(Kj, d, bj, Y, P, T(1), false);  // P1 = Y K + b
#pragma omp simd
      for (int64_t e = 0; e < d * kTile; ++e) {  // the state keeps act(P1), or P1 (kStoresPre)
        const T a = act_f<A, T>(P[e]);
        if constexpr (!kStoresPre<A>) P[e] = a;
        Z[e] -= h * a;
      }
      if (states) save_state(P, rows, d, slot_ptr(states, j, 1, B, row0, d));
      tile_gemm<T, false>(Kj, d, bj, Z, P, T(1), false);  // P2 = Z K^T + b
#pragma omp simd
      for (int64_t e = 0; e < d * kTile; ++e) {
        const T a = act_f<A, T>(P[e]);
        if constexpr (!kStoresPre<A>) P[e] = a;
        Y[e] += h * a;
      }
      if (states) {
        save_state(Z, rows, d, slot_ptr(states, j, 2, B, row0, d));
        save_state(P, rows, d, slot_ptr(states, j, 3, B, row0, d));
      }
    }
    store_tile(Y, rows, d, out_y + row0 * d);
    store_tile(Z, rows, d, out_z + row0 * d);
  });
}

// Reversible: `states` is null and (y_out, z_out) seed the reconstruction, in T
// tiles (a reduced-precision call rebuilds the states in float32).
template <typename T, Act A, bool Reversible, typename S = T>
void backward_narrow(const S* gy_in, const S* gz_in, const S* states, const S* y_out,
                     const S* z_out, const T* K, const T* b, T h, int64_t N, int64_t B,
                     int64_t d, S* gy, S* gz, S* ry, S* rz, Partials<T>& part) {
  for_tiles(B, N * d * d, [&](int64_t c, int64_t row0, int64_t rows) {
    std::vector<T> buf(7 * d * kTile);
    T* ly = buf.data();
    T* lz = ly + d * kTile;
    T* Y = lz + d * kTile;
    T* Z = Y + d * kTile;
    T* P1 = Z + d * kTile;
    T* P2 = P1 + d * kTile;
    T* G = P2 + d * kTile;
    load_tile(gy_in + row0 * d, rows, d, ly);
    load_tile(gz_in + row0 * d, rows, d, lz);
    if (Reversible) {
      load_tile(y_out + row0 * d, rows, d, Y);  // Y_{j+1}
      load_tile(z_out + row0 * d, rows, d, Z);  // Z_{j+1/2}
    }
    for (int64_t j = N - 1; j >= 0; --j) {
      const T* Kj = K + j * d * d;
      const T* bj = b + j * d;
      if (Reversible) {
        tile_gemm<T, false>(Kj, d, bj, Z, P2, T(1), false);
#pragma omp simd
        for (int64_t e = 0; e < d * kTile; ++e) {  // P1, P2 then hold what a state keeps
          const T a = act_f<A, T>(P2[e]);
          if constexpr (!kStoresPre<A>) P2[e] = a;
          Y[e] -= h * a;
        }
        tile_gemm<T, true>(Kj, d, bj, Y, P1, T(1), false);
        if constexpr (!kStoresPre<A>) {
#pragma omp simd
          for (int64_t e = 0; e < d * kTile; ++e) P1[e] = act_f<A, T>(P1[e]);
        }
      }
      T* dw = part.dw(c, j, d);
      T* db = part.db(c, j, d);
      auto layer = [&](const auto* Ys, const auto* P1s, const auto* Zs, const auto* P2s) {
#pragma omp simd
        for (int64_t e = 0; e < d * kTile; ++e)
          G[e] = h * ly[e] * stored_grad<A, T>(widen<T>(P2s[e]));
        tile_gemm<T, true>(Kj, d, nullptr, G, lz, T(1), true);  // lz += G2 K
        tile_outer(G, Zs, d, rows, T(1), dw);
        tile_rowsum(G, d, rows, db);
#pragma omp simd
        for (int64_t e = 0; e < d * kTile; ++e)
          G[e] = -h * lz[e] * stored_grad<A, T>(widen<T>(P1s[e]));
        tile_gemm<T, false>(Kj, d, nullptr, G, ly, T(1), true);  // ly += G1 K^T
        tile_outer(Ys, G, d, rows, T(1), dw);
        tile_rowsum(G, d, rows, db);
      };
      // The states: the rebuilt tiles, or stored ones, a full tile's read in place
      // (kStatesInPlace), else converted into tiles of T.
      if (Reversible) {
        layer(static_cast<const T*>(Y), static_cast<const T*>(P1), static_cast<const T*>(Z),
              static_cast<const T*>(P2));
      } else {
        const S* s0 = slot_ptr(states, j, 0, B, row0, d);
        const S* s1 = slot_ptr(states, j, 1, B, row0, d);
        const S* s2 = slot_ptr(states, j, 2, B, row0, d);
        const S* s3 = slot_ptr(states, j, 3, B, row0, d);
        bool done = false;
        if constexpr (kStatesInPlace<S, T>) {
          if (rows == kTile) {
            layer(s0, s1, s2, s3);
            done = true;
          }
        }
        if (!done)
          layer(state_tile(s0, rows, d, Y), state_tile(s1, rows, d, P1), state_tile(s2, rows, d, Z),
                state_tile(s3, rows, d, P2));
      }
      if (Reversible) {
#pragma omp simd
        for (int64_t e = 0; e < d * kTile; ++e) Z[e] += h * stored_act<A, T>(P1[e]);
      }
    }
    store_tile(ly, rows, d, gy + row0 * d);
    store_tile(lz, rows, d, gz + row0 * d);
    if (Reversible) {  // the rebuilt inputs (Y_0, Z_{-1/2}), checked by the caller
      store_tile(Y, rows, d, ry + row0 * d);
      store_tile(Z, rows, d, rz + row0 * d);
    }
  });
}

// p <- what a state keeps of p: act(p), or p itself (kStoresPre).
template <typename T, Act A>
void activate(at::Tensor& p) {
  if constexpr (kStoresPre<A>) return;
  T* pp = p.data_ptr<T>();
  ew(p.numel(), [&](int64_t e0, int64_t e1) {
#pragma omp simd
    for (int64_t e = e0; e < e1; ++e) pp[e] = act_f<A, T>(pp[e]);
  });
}

// out += alpha * act(p) for a kept state s of p (see `activate`).
template <typename T, Act A>
void add_stored_act(at::Tensor& out, const at::Tensor& s, T alpha) {
  T* o = out.data_ptr<T>();
  const T* sp = s.data_ptr<T>();
  ew(out.numel(), [&](int64_t e0, int64_t e1) {
#pragma omp simd
    for (int64_t e = e0; e < e1; ++e) o[e] += alpha * stored_act<A, T>(sp[e]);
  });
}

template <typename T, Act A>
void forward_wide(const at::Tensor& K, const at::Tensor& b, T h, at::Tensor& Y, at::Tensor& Z,
                  at::Tensor& states, bool store) {
  const int64_t N = K.size(0);
  if (!store || N == 0) {
    at::Tensor P1 = at::empty_like(Y), P2 = at::empty_like(Y);
    for (int64_t j = 0; j < N; ++j) {
      at::mm_out(P1, Y, K[j]);
      act_step<T, A>(Z, Z, P1, -h, b[j].data_ptr<T>());
      at::mm_out(P2, Z, K[j].t());
      act_step<T, A>(Y, Y, P2, h, b[j].data_ptr<T>());
    }
    return;
  }
  // Keeping states: each half step writes its new Y or Z straight into its slot.
  at::Tensor y = slot(states, 0, 0), z = Z;  // Y_j, Z_{j-1/2}
  y.copy_(Y);
  for (int64_t j = 0; j < N; ++j) {
    at::Tensor P1 = slot(states, j, 1), zn = slot(states, j, 2), P2 = slot(states, j, 3);
    at::mm_out(P1, y, K[j]);
    act_step<T, A>(zn, z, P1, -h, b[j].data_ptr<T>());  // Z_{j+1/2}
    at::mm_out(P2, zn, K[j].t());
    const at::Tensor yn = j + 1 < N ? slot(states, j + 1, 0) : Y;
    act_step<T, A>(yn, y, P2, h, b[j].data_ptr<T>());  // Y_{j+1}
    y = yn;
    z = zn;
  }
  Z.copy_(z);
}

template <typename T, Act A, bool Reversible>
void backward_wide(const at::Tensor& states, const at::Tensor& K, const at::Tensor& b, T h,
                   at::Tensor& ly, at::Tensor& lz, at::Tensor& Y, at::Tensor& Z, at::Tensor& gw,
                   at::Tensor& gb) {
  const int64_t N = K.size(0);
  at::Tensor G = at::empty_like(ly), P1, P2;
  if (Reversible) {
    P1 = at::empty_like(ly);
    P2 = at::empty_like(ly);
  }
  for (int64_t j = N - 1; j >= 0; --j) {
    if (Reversible) {
      at::mm_out(P2, Z, K[j].t());
      act_step<T, A>(Y, Y, P2, -h, b[j].data_ptr<T>());
      at::addmm_out(P1, b[j], Y, K[j]);
      activate<T, A>(P1);
    } else {
      Y = slot(states, j, 0);
      P1 = slot(states, j, 1);
      Z = slot(states, j, 2);
      P2 = slot(states, j, 3);
    }
    at::Tensor gwj = gw[j];
    T* gp = G.data_ptr<T>();
    T* gbj = gb[j].data_ptr<T>();
    const int64_t B = G.size(0), d = G.size(1);
    {  // G2 = h ly act'(P2), db_j = sum G2
      const T* lp = ly.data_ptr<T>();
      const T* sp = P2.data_ptr<T>();
      colsum_pass<T>(B, d, gbj, false,
                     [&](int64_t e) { return gp[e] = h * lp[e] * stored_grad<A, T>(sp[e]); });
    }
    lz.addmm_(G, K[j]);
    at::mm_out(gwj, G.t(), Z);
    {  // G1 = -h lz act'(P1), db_j += sum G1
      const T* lp = lz.data_ptr<T>();
      const T* sp = P1.data_ptr<T>();
      colsum_pass<T>(B, d, gbj, true,
                     [&](int64_t e) { return gp[e] = -h * lp[e] * stored_grad<A, T>(sp[e]); });
    }
    ly.addmm_(G, K[j].t());
    gwj.addmm_(Y.t(), G);
    if (Reversible) add_stored_act<T, A>(Z, P1, h);
  }
}

// ------------------------------------------------------------ bfloat16, wide
//
// As resnet.cpp's wide reduced path (tile.h: wide_reduced_native): the GEMMs in
// bfloat16, the rest in float32. The two half-states (Y, Z) of the forward, the
// adjoints (dL/dY, dL/dZ) of the backward and the pair a reversible backward
// rebuilds stay float32 through all layers; bf16 copies of them feed the GEMMs
// and the stored states.

template <typename T, Act A>
void forward_wide_reduced(const at::Tensor& y, const at::Tensor& z, const at::Tensor& K,
                          const at::Tensor& b, float h, at::Tensor& out_y, at::Tensor& out_z,
                          at::Tensor& states, bool store) {
  const int64_t N = K.size(0), B = y.size(0), d = y.size(1);
  store = store && N > 0;
  at::Tensor Y32 = y.to(at::kFloat), Z32 = z.to(at::kFloat);
  // Y_j and Z_{j+1/2} in T (the GEMMs' inputs): their state slots when states are kept.
  at::Tensor Yt = store ? slot(states, 0, 0) : at::empty({B, d}, y.options());
  at::Tensor Zt = store ? at::Tensor() : at::empty({B, d}, y.options());
  at::Tensor P1 = store ? at::Tensor() : at::empty({B, d}, y.options());
  at::Tensor P2 = store ? at::Tensor() : at::empty({B, d}, y.options());
  Yt.copy_(y);
  for (int64_t j = 0; j < N; ++j) {
    const T* bj = b.data_ptr<T>() + j * d;
    if (store) {
      P1 = slot(states, j, 1);
      Zt = slot(states, j, 2);
      P2 = slot(states, j, 3);
    }
    at::mm_out(P1, Yt, K[j]);  // Z_{j+1/2} = Z_{j-1/2} - h act(Y_j K_j + b_j)
    act_step_reduced<T, A>(B, d, Z32.data_ptr<float>(), Zt.data_ptr<T>(), P1.data_ptr<T>(),
                           store ? P1.data_ptr<T>() : nullptr, -h, bj);
    at::mm_out(P2, Zt, K[j].t());  // Y_{j+1} = Y_j + h act(Z_{j+1/2} K_j^T + b_j)
    if (store && j + 1 < N) Yt = slot(states, j + 1, 0);
    act_step_reduced<T, A>(B, d, Y32.data_ptr<float>(),
                           store && j + 1 == N ? nullptr : Yt.data_ptr<T>(), P2.data_ptr<T>(),
                           store ? P2.data_ptr<T>() : nullptr, h, bj);
  }
  out_y.copy_(Y32);
  out_z.copy_(Z32);
}

template <typename T, Act A, bool Reversible>
void backward_wide_reduced(const at::Tensor& gy_in, const at::Tensor& gz_in,
                           const at::Tensor& states, const at::Tensor& y_out,
                           const at::Tensor& z_out, const at::Tensor& K, const at::Tensor& b,
                           float h, at::Tensor& gy, at::Tensor& gz, at::Tensor& gw,
                           at::Tensor& gb, at::Tensor& ry, at::Tensor& rz) {
  const int64_t N = K.size(0), B = gy_in.size(0), d = gy_in.size(1);
  const at::TensorOptions opt = gy_in.options();
  at::Tensor ly32 = gy_in.to(at::kFloat), lz32 = gz_in.to(at::kFloat);
  at::Tensor Y32, Z32;  // Y_{j+1} then Y_j, and Z_{j+1/2} (reversible)
  if (Reversible) {
    Y32 = y_out.to(at::kFloat);
    Z32 = z_out.to(at::kFloat);
  }
  float* lyp = ly32.data_ptr<float>();
  float* lzp = lz32.data_ptr<float>();
  // dK_j = G2^T Z_{j+1/2} + Y_j^T G1 = X^T W in one GEMM of 2B rows:
  // X = [G2; Y_j], W = [Z_{j+1/2}; G1].
  at::Tensor X = at::empty({2 * B, d}, opt), W = at::empty({2 * B, d}, opt);
  at::Tensor Xg = X.narrow(0, 0, B), Xy = X.narrow(0, B, B);
  at::Tensor Wz = W.narrow(0, 0, B), Wg = W.narrow(0, B, B);
  at::Tensor R = at::empty({B, d}, opt), S1, S2;  // S1, S2: what the states keep of P1, P2
  if (Reversible) {
    S1 = at::empty({B, d}, opt);
    S2 = at::empty({B, d}, opt);
    Wz.copy_(Z32);
  }
  std::vector<float> gb32(d);
  T* xg = Xg.data_ptr<T>();
  T* wg = Wg.data_ptr<T>();
  const T* rp = R.data_ptr<T>();
  for (int64_t j = N - 1; j >= 0; --j) {
    const T* bj = b.data_ptr<T>() + j * d;
    if (Reversible) {  // Y_j = Y_{j+1} - h act(Z_{j+1/2} K_j^T + b_j), then P1 = Y_j K_j + b_j
      at::mm_out(S2, Wz, K[j].t());
      act_step_reduced<T, A>(B, d, Y32.data_ptr<float>(), Xy.data_ptr<T>(), S2.data_ptr<T>(),
                             S2.data_ptr<T>(), -h, bj);
      at::mm_out(S1, Xy, K[j]);
      act_step_reduced<T, A>(B, d, nullptr, nullptr, S1.data_ptr<T>(), S1.data_ptr<T>(), 0.f,
                             bj);
    } else {
      Xy.copy_(slot(states, j, 0));
      S1 = slot(states, j, 1);
      Wz.copy_(slot(states, j, 2));
      S2 = slot(states, j, 3);
    }
    {  // G2 = h ly act'(P2), db_j = sum G2
      const T* sp = S2.data_ptr<T>();
      colsum_pass<float>(B, d, gb32.data(), false, [&](int64_t e) {
        const float g = h * lyp[e] * stored_grad<A, float>(static_cast<float>(sp[e]));
        xg[e] = round_to<T>(g);
        return g;
      });
    }
    at::mm_out(R, Xg, K[j]);  // lz += G2 K_j
    {  // G1 = -h lz act'(P1), db_j += sum G1
      const T* sp = S1.data_ptr<T>();
      colsum_pass<float>(B, d, gb32.data(), true, [&](int64_t e) {
        const float lz = lzp[e] + static_cast<float>(rp[e]);
        lzp[e] = lz;
        const float g = -h * lz * stored_grad<A, float>(static_cast<float>(sp[e]));
        wg[e] = round_to<T>(g);
        return g;
      });
      put_bias_grad<T>(gb, j, gb32.data());
    }
    at::mm_out(R, Wg, K[j].t());  // ly += G1 K_j^T
    at::Tensor gwj = gw[j];
    at::mm_out(gwj, X.t(), W);
    const T* s1 = S1.data_ptr<T>();
    T* wz = Wz.data_ptr<T>();
    float* zp = Reversible ? Z32.data_ptr<float>() : nullptr;
    ew(B * d, [&](int64_t e0, int64_t e1) {
#pragma omp simd
      for (int64_t e = e0; e < e1; ++e) {
        lyp[e] += static_cast<float>(rp[e]);
        if (Reversible) {  // Z_{j-1/2} = Z_{j+1/2} + h act(P1)
          const float zn = zp[e] + h * stored_act<A, float>(static_cast<float>(s1[e]));
          zp[e] = zn;
          wz[e] = round_to<T>(zn);
        }
      }
    });
  }
  gy.copy_(ly32);
  gz.copy_(lz32);
  if (Reversible) {  // the rebuilt inputs (Y_0, Z_{-1/2}), checked by the caller
    ry.copy_(Y32);
    rz.copy_(Z32);
  }
}

template <bool Reversible>
T6 backward(const at::Tensor& gy_in, const at::Tensor& gz_in, const at::Tensor& states_in,
            const at::Tensor& y_in, const at::Tensor& z_in, const at::Tensor& K_in,
            const at::Tensor& b_in, double step, Act act) {
  if (in_float32_below(gy_in, K_in)) {  // tile.h: float32 parameters
    return pair_backward_in_float32(
        [&](const auto&... t) { return backward<Reversible>(t..., K_in, b_in, step, act); },
        gy_in, gz_in, states_in, y_in, z_in);
  }
  // bfloat16 copies of float32 parameters for the wide bfloat16 GEMMs (tile.h)
  const bool wide16 = wide_bf16(gy_in);
  const at::Tensor gyc = gy_in.contiguous(), gzc = gz_in.contiguous(),
                   K = wide16 ? params_as(K_in, at::kBFloat16) : K_in.contiguous(),
                   b = wide16 ? params_as(b_in, at::kBFloat16) : b_in.contiguous();
  const at::ScalarType param_type = K_in.scalar_type();  // of the parameters' gradients
  const at::Tensor states = Reversible ? at::Tensor() : states_in.contiguous();
  const int64_t N = K.size(0), B = gyc.size(0), d = gyc.size(1);
  at::Tensor gy = at::empty({B, d}, gyc.options()), gz = at::empty({B, d}, gyc.options());
  at::Tensor gw, gb, ry, rz;
  if (Reversible) {
    ry = at::empty({B, d}, gyc.options());
    rz = at::empty({B, d}, gyc.options());
  }
  if (wide16) {
    gw = empty_cached({N, d, d}, gyc.options());
    gb = at::empty({N, d}, gyc.options().dtype(param_type));
    SN_DISPATCH_ACT(act, [&] {
      backward_wide_reduced<at::BFloat16, kAct, Reversible>(
          gyc, gzc, states, Reversible ? y_in.contiguous() : at::Tensor(),
          Reversible ? z_in.contiguous() : at::Tensor(), K, b, static_cast<float>(step), gy, gz,
          gw, gb, ry, rz);
    });
    return {gy, gz, params_as(gw, param_type), gb, ry, rz};
  }
  if (is_reduced(gyc.scalar_type()) && narrow(d)) {  // tile.h: reduced_native
    const std::vector<float> Kf = small_float(K), bf = small_float(b);
    const at::Tensor yo = Reversible ? y_in.contiguous() : at::Tensor();
    const at::Tensor zo = Reversible ? z_in.contiguous() : at::Tensor();
    const int64_t chunks = num_chunks(B, N * d * d);
    Partials<float> part(chunks, N, d, gyc.options().dtype(at::kFloat));
    AT_DISPATCH_REDUCED_FLOATING_TYPES(gyc.scalar_type(), "verlet_backward_reduced", [&] {
      SN_DISPATCH_ACT(act, [&] {
        backward_narrow<float, kAct, Reversible, scalar_t>(
            gyc.data_ptr<scalar_t>(), gzc.data_ptr<scalar_t>(),
            Reversible ? nullptr : states.data_ptr<scalar_t>(),
            Reversible ? yo.data_ptr<scalar_t>() : nullptr,
            Reversible ? zo.data_ptr<scalar_t>() : nullptr, Kf.data(),
            bf.data(), static_cast<float>(step), N, B, d, gy.data_ptr<scalar_t>(),
            gz.data_ptr<scalar_t>(), Reversible ? ry.data_ptr<scalar_t>() : nullptr,
            Reversible ? rz.data_ptr<scalar_t>() : nullptr, part);
      });
    });
    std::tie(gw, gb) = part.sum(chunks, param_type);
    return {gy, gz, gw, gb, ry, rz};
  }
  AT_DISPATCH_FLOATING_TYPES(gyc.scalar_type(), "verlet_backward", [&] {
    const scalar_t h = static_cast<scalar_t>(step);
    SN_DISPATCH_ACT(act, [&] {
      if (narrow(d)) {
        const at::Tensor yo = Reversible ? y_in.contiguous() : at::Tensor();
        const at::Tensor zo = Reversible ? z_in.contiguous() : at::Tensor();
        Partials<scalar_t> part(num_chunks(B, N * d * d), N, d, gyc.options());
        backward_narrow<scalar_t, kAct, Reversible>(
            gyc.data_ptr<scalar_t>(), gzc.data_ptr<scalar_t>(),
            Reversible ? nullptr : states.data_ptr<scalar_t>(),
            Reversible ? yo.data_ptr<scalar_t>() : nullptr,
            Reversible ? zo.data_ptr<scalar_t>() : nullptr, K.data_ptr<scalar_t>(),
            b.data_ptr<scalar_t>(), h, N, B, d, gy.data_ptr<scalar_t>(), gz.data_ptr<scalar_t>(),
            Reversible ? ry.data_ptr<scalar_t>() : nullptr,
            Reversible ? rz.data_ptr<scalar_t>() : nullptr, part);
        std::tie(gw, gb) = part.sum(num_chunks(B, N * d * d));
      } else {
        gw = empty_cached({N, d, d}, gyc.options());
        gb = at::empty({N, d}, gyc.options());
        gy.copy_(gyc);
        gz.copy_(gzc);
        at::Tensor Y, Z;
        if (Reversible) {
          Y = y_in.contiguous().clone();
          Z = z_in.contiguous().clone();
        }
        backward_wide<scalar_t, kAct, Reversible>(states, K, b, h, gy, gz, Y, Z, gw, gb);
        if (Reversible) {
          ry = Y;
          rz = Z;
        }
      }
    });
  });
  return {gy, gz, gw, gb, ry, rz};
}

}  // namespace
}  // namespace cpu_detail

namespace cpu {

T3 verlet_forward(const at::Tensor& y_in, const at::Tensor& z_in, const at::Tensor& weight,
                  const at::Tensor& bias, double step, c10::string_view activation, bool store) {
  using namespace cpu_detail;
  check_stack(y_in, weight, bias, /*float32_params=*/true);
  check_like(z_in, "z", y_in);
  check_step(step);
  if (in_float32_below(y_in, weight)) {  // tile.h: float32 parameters
    using rp_detail::down, rp_detail::up;
    return down(verlet_forward(up(y_in), up(z_in), weight, bias, step, activation, store),
                y_in.scalar_type());
  }
  const Act act = parse_activation(activation);
  const bool wide16 = wide_bf16(y_in);  // bfloat16 GEMMs: bfloat16 parameters
  const at::Tensor y = y_in.contiguous(), z = z_in.contiguous(),
                   K = wide16 ? params_as(weight, at::kBFloat16) : weight.contiguous(),
                   b = wide16 ? params_as(bias, at::kBFloat16) : bias.contiguous();
  const int64_t N = K.size(0), B = y.size(0), d = y.size(1);
  at::Tensor out_y = at::empty({B, d}, y.options()), out_z = at::empty({B, d}, y.options());
  at::Tensor states = empty_states(y, store ? N : 0, 4);
  if (wide16) {
    SN_DISPATCH_ACT(act, [&] {
      forward_wide_reduced<at::BFloat16, kAct>(y, z, K, b, static_cast<float>(step), out_y,
                                               out_z, states, store);
    });
    return {out_y, out_z, states};
  }
  if (is_reduced(y.scalar_type()) && narrow(d)) {  // tile.h: reduced_native
    const std::vector<float> Kf = small_float(K), bf = small_float(b);
    AT_DISPATCH_REDUCED_FLOATING_TYPES(y.scalar_type(), "verlet_forward_reduced", [&] {
      SN_DISPATCH_ACT(act, [&] {
        forward_narrow<float, kAct, scalar_t>(
            y.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), Kf.data(),
            bf.data(), static_cast<float>(step), N, B, d, out_y.data_ptr<scalar_t>(),
            out_z.data_ptr<scalar_t>(), store ? states.data_ptr<scalar_t>() : nullptr);
      });
    });
    return {out_y, out_z, states};
  }
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "verlet_forward", [&] {
    const scalar_t h = static_cast<scalar_t>(step);
    SN_DISPATCH_ACT(act, [&] {
      if (narrow(d)) {
        forward_narrow<scalar_t, kAct>(y.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(),
                                       K.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), h, N, B,
                                       d, out_y.data_ptr<scalar_t>(),
                                       out_z.data_ptr<scalar_t>(),
                                       store ? states.data_ptr<scalar_t>() : nullptr);
      } else {
        out_y.copy_(y);
        out_z.copy_(z);
        forward_wide<scalar_t, kAct>(K, b, h, out_y, out_z, states, store);
      }
    });
  });
  return {out_y, out_z, states};
}

T4 verlet_backward(const at::Tensor& grad_y, const at::Tensor& grad_z, const at::Tensor& states,
                   const at::Tensor& weight, const at::Tensor& bias, double step,
                   c10::string_view activation) {
  check_stack(grad_y, weight, bias, /*float32_params=*/true);
  check_like(grad_z, "grad_z", grad_y);
  check_states(states, 4, grad_y, weight);
  check_step(step);
  auto r = cpu_detail::backward<false>(grad_y, grad_z, states, {}, {}, weight, bias, step,
                                       parse_activation(activation));
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r)};
}

T6 verlet_backward_reversible(const at::Tensor& grad_y, const at::Tensor& grad_z,
                              const at::Tensor& y, const at::Tensor& z, const at::Tensor& weight,
                              const at::Tensor& bias, double step, c10::string_view activation) {
  check_stack(grad_y, weight, bias, /*float32_params=*/true);
  check_like(grad_z, "grad_z", grad_y);
  check_like(y, "y", grad_y);
  check_like(z, "z", grad_y);
  check_step(step);
  return cpu_detail::backward<true>(grad_y, grad_z, {}, y, z, weight, bias, step,
                                    parse_activation(activation));
}

}  // namespace cpu
}  // namespace stablenets

TORCH_LIBRARY_IMPL(stablenets, CPU, m) {
  using stablenets::cpu_detail::reduced_native;
  SN_IMPL_NATIVE(m, "verlet_forward", &stablenets::cpu::verlet_forward, &reduced_native);
  SN_IMPL_NATIVE(m, "verlet_backward", &stablenets::cpu::verlet_backward, &reduced_native);
  SN_IMPL_NATIVE(m, "verlet_backward_reversible", &stablenets::cpu::verlet_backward_reversible,
                 &reduced_native);
}
