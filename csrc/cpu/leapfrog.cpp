// Leapfrog (second-order) stack on the CPU:
//   Y_{j+1} = 2 Y_j - Y_{j-1} - h^2 act(Y_j K_j^T + b_j) K_j,   outputs (Y_N, Y_{N-1}).
// States per layer: [Y_j, A_j = act(P_j)]. The reversible backward rebuilds
// them from the outputs with Y_{j-1} = 2 Y_j - Y_{j+1} - h^2 A_j K_j.
//
// Backward, with lam = dL/dY_{j+1} and the pair (a, c) = (dL/dY_{j+1}, dL/dY_j):
//   G = (-h^2 lam K_j^T) * act'(P_j)
//   dK_j = -h^2 act(P_j)^T lam + G^T Y_j,  db_j = sum_rows G
//   (a, c) <- (c + 2 lam + G K_j, -lam)
#include <torch/library.h>

#include "stablenets/kernels.h"
#include "tile.h"

namespace stablenets {
namespace cpu_detail {
namespace {

// S: the storage type of the inputs, outputs and states (T, or bfloat16/float16
// with T = float: float32 tiles, so the pair carried through the stack stays
// float32, as in resnet.cpp's narrow kernels).
template <typename T, Act A, typename S = T>
void forward_narrow(const S* y, const S* yprev, const T* K, const T* b, T h, int64_t N,
                    int64_t B, int64_t d, S* out, S* out_prev, S* states) {
  const T mh2 = -h * h;
  for_tiles(B, N * d * d, [&](int64_t, int64_t row0, int64_t rows) {
    std::vector<T> buf(3 * d * kTile);
    T* Y = buf.data();
    T* Yp = Y + d * kTile;
    T* P = Yp + d * kTile;
    load_tile(y + row0 * d, rows, d, Y);
    load_tile(yprev + row0 * d, rows, d, Yp);
    for (int64_t j = 0; j < N; ++j) {
      const T* Kj = K + j * d * d;
      tile_gemm<T, false>(Kj, d, b + j * d, Y, P, T(1), false);
      if (states) save_state(Y, rows, d, states + ((j * 2 + 0) * B + row0) * d);
      // The state keeps act(P), or P where act' needs it (kStoresPre).
      if (states && kStoresPre<A>) save_state(P, rows, d, states + ((j * 2 + 1) * B + row0) * d);
#pragma omp simd
      for (int64_t e = 0; e < d * kTile; ++e) {
        P[e] = act_f<A, T>(P[e]);
        Yp[e] = T(2) * Y[e] - Yp[e];
      }
      if (states && !kStoresPre<A>)
        save_state(P, rows, d, states + ((j * 2 + 1) * B + row0) * d);
      tile_gemm<T, true>(Kj, d, nullptr, P, Yp, mh2, true);  // Yp = 2Y - Yp - h^2 act(P) K
      std::swap(Y, Yp);
    }
    store_tile(Y, rows, d, out + row0 * d);
    store_tile(Yp, rows, d, out_prev + row0 * d);
  });
}

// Reversible: `states` is null and (y_hi, y_lo) = (Y_N, Y_{N-1}) seed the reconstruction
// (in T tiles: a reduced-precision call rebuilds the pair in float32).
template <typename T, Act A, bool Reversible, typename S = T>
void backward_narrow(const S* ga_in, const S* gc_in, const S* states, const S* y_hi,
                     const S* y_lo, const T* K, const T* b, T h, int64_t N, int64_t B, int64_t d,
                     S* gy, S* gyprev, S* ry, S* ryprev, Partials<T>& part) {
  const T mh2 = -h * h;
  for_tiles(B, N * d * d, [&](int64_t c, int64_t row0, int64_t rows) {
    std::vector<T> buf(7 * d * kTile);
    T* a = buf.data();
    T* cc = a + d * kTile;
    T* Y = cc + d * kTile;
    T* P = Y + d * kTile;
    T* Act_ = P + d * kTile;
    T* G = Act_ + d * kTile;
    T* Yn = G + d * kTile;  // Y_{j+1} (reversible only)
    load_tile(ga_in + row0 * d, rows, d, a);
    load_tile(gc_in + row0 * d, rows, d, cc);
    if (Reversible) {
      load_tile(y_hi + row0 * d, rows, d, Yn);
      load_tile(y_lo + row0 * d, rows, d, Y);
    }
    for (int64_t j = N - 1; j >= 0; --j) {
      const T* Kj = K + j * d * d;
      // Y_j, P_j (kStoresPre), act(P_j): tiles of T, or a full tile's stored
      // states read in place (kStatesInPlace)
      auto layer = [&](const auto* Ys, const auto* Ps, const auto* As) {
        tile_gemm<T, false>(Kj, d, nullptr, a, G, mh2, false);  // G = -h^2 lam K^T
#pragma omp simd
        for (int64_t e = 0; e < d * kTile; ++e) {
          if constexpr (kStoresPre<A>) {
            G[e] *= stored_grad<A, T>(widen<T>(Ps[e]));
          } else {
            G[e] *= stored_grad<A, T>(widen<T>(As[e]));
          }
          cc[e] += T(2) * a[e];
        }
        T* dw = part.dw(c, j, d);
        tile_outer(As, a, d, rows, mh2, dw);
        tile_outer(G, Ys, d, rows, T(1), dw);
        tile_rowsum(G, d, rows, part.db(c, j, d));
      };
      if (Reversible) {
        tile_gemm<T, false>(Kj, d, b + j * d, Y, P, T(1), false);
#pragma omp simd
        for (int64_t e = 0; e < d * kTile; ++e) Act_[e] = act_f<A, T>(P[e]);
        layer(static_cast<const T*>(Y), static_cast<const T*>(P), static_cast<const T*>(Act_));
      } else {
        const S* ys = states + ((j * 2 + 0) * B + row0) * d;
        const S* ps = states + ((j * 2 + 1) * B + row0) * d;  // P_j or act(P_j)
        bool done = false;
        if constexpr (kStatesInPlace<S, T>) {
          if (rows == kTile) {
            if constexpr (kStoresPre<A>) {
#pragma omp simd
              for (int64_t e = 0; e < d * kTile; ++e) Act_[e] = act_f<A, T>(widen<T>(ps[e]));
              layer(ys, ps, static_cast<const T*>(Act_));
            } else {
              layer(ys, ps, ps);
            }
            done = true;
          }
        }
        if (!done) {
          const T* Ys = state_tile(ys, rows, d, Y);
          if constexpr (kStoresPre<A>) {
            const T* Ps = state_tile(ps, rows, d, P);
#pragma omp simd
            for (int64_t e = 0; e < d * kTile; ++e) Act_[e] = act_f<A, T>(Ps[e]);
            layer(Ys, Ps, static_cast<const T*>(Act_));
          } else {
            const T* As = state_tile(ps, rows, d, Act_);
            layer(Ys, As, As);
          }
        }
      }
      tile_gemm<T, true>(Kj, d, nullptr, G, cc, T(1), true);  // cc = c + 2 lam + G K
#pragma omp simd
      for (int64_t e = 0; e < d * kTile; ++e) a[e] = -a[e];
      std::swap(a, cc);
      if (Reversible) {  // down to Y_{-1}: the rebuilt inputs are checked by the caller
#pragma omp simd
        for (int64_t e = 0; e < d * kTile; ++e) Yn[e] = T(2) * Y[e] - Yn[e];
        tile_gemm<T, true>(Kj, d, nullptr, Act_, Yn, mh2, true);  // Y_{j-1}
        std::swap(Y, Yn);
      }
    }
    store_tile(a, rows, d, gy + row0 * d);
    store_tile(cc, rows, d, gyprev + row0 * d);
    if (Reversible) {
      store_tile(Yn, rows, d, ry + row0 * d);  // Y_0
      store_tile(Y, rows, d, ryprev + row0 * d);  // Y_{-1}
    }
  });
}

template <typename T, Act A>
void forward_wide(const at::Tensor& y, const at::Tensor& yprev, const at::Tensor& K,
                  const at::Tensor& b, T h, at::Tensor& Y, at::Tensor& Yp, at::Tensor& states,
                  bool store) {
  const int64_t N = K.size(0);
  const double mh2 = -static_cast<double>(h) * h;
  store = store && N > 0;
  // Y_j and Y_{j-1}. Keeping states, Y_j lives in its slot and Y_{j+1} is written
  // straight into the next one; else two buffers take turns.
  at::Tensor cur = store ? slot(states, 0, 0) : Y, prev = store ? yprev : Yp;
  cur.copy_(y);
  if (!store) Yp.copy_(yprev);
  // A_j for the second product: the P_j slot itself, activated in place, unless
  // the state must keep P_j (kStoresPre).
  at::Tensor Abuf = store && !kStoresPre<A> ? at::Tensor() : at::empty_like(Y);
  for (int64_t j = 0; j < N; ++j) {
    at::Tensor P = store ? slot(states, j, 1) : Abuf;
    const at::Tensor Aj = store && !kStoresPre<A> ? P : Abuf;
    at::mm_out(P, cur, K[j].t());  // the bias is added below
    at::Tensor next = !store ? prev : (j + 1 < N ? slot(states, j + 1, 0) : Y);
    T* ap = Aj.data_ptr<T>();
    T* pp = P.data_ptr<T>();
    const T* bj = b[j].data_ptr<T>();
    const T* yc = cur.data_ptr<T>();
    const T* yo = prev.data_ptr<T>();
    T* yn = next.data_ptr<T>();
    const int64_t d = Y.size(1);
    ew_rows(Y.size(0), d, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t o = r * d;
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) {
          const T v = pp[o + c] + bj[c];
          if constexpr (kStoresPre<A>) pp[o + c] = v;  // the state keeps P_j
          ap[o + c] = act_f<A, T>(v);
          yn[o + c] = T(2) * yc[o + c] - yo[o + c];
        }
      }
    });
    next.addmm_(Aj, K[j], 1.0, mh2);  // Y_{j+1} = 2 Y_j - Y_{j-1} - h^2 A_j K_j
    prev = cur;
    cur = next;
  }
  // (Y_N, Y_{N-1}) into (Y, Yp)
  if (store) {
    Yp.copy_(prev);
  } else if (N % 2 == 1) {
    std::swap(Y, Yp);
  }
}

template <typename T, Act A, bool Reversible>
void backward_wide(const at::Tensor& ga, const at::Tensor& gc, const at::Tensor& states,
                   const at::Tensor& y_hi, const at::Tensor& y_lo, const at::Tensor& K,
                   const at::Tensor& b, T h, at::Tensor& a, at::Tensor& c, at::Tensor& gw,
                   at::Tensor& gb, at::Tensor& ry, at::Tensor& ryprev) {
  const int64_t N = K.size(0);
  const double mh2 = -static_cast<double>(h) * h;
  a.copy_(ga);
  c.copy_(gc);
  at::Tensor G = at::empty_like(a);
  at::Tensor Y, Yn, Av, Pv;  // Y_j, Y_{j+1} (reversible), A_j, P_j (kStoresPre only)
  if (Reversible) {
    Y = y_lo.clone();
    Yn = y_hi.clone();
  }
  if (Reversible || kStoresPre<A>) Av = at::empty_like(a);
  bool c_negated = false;  // c holds -dL/dY_j (saves a negation pass per layer)
  for (int64_t j = N - 1; j >= 0; --j) {
    if (!Reversible) Y = slot(states, j, 0);
    if (Reversible || kStoresPre<A>) {
      if (Reversible && kStoresPre<A>) {
        Pv = at::addmm(b[j], Y, K[j].t());
      } else if (Reversible) {
        at::addmm_out(Av, b[j], Y, K[j].t());
        Pv = Av;  // activated in place
      } else {
        Pv = slot(states, j, 1);
      }
      const T* pp = Pv.data_ptr<T>();
      T* ap = Av.data_ptr<T>();
      ew(Av.numel(), [&](int64_t e0, int64_t e1) {
#pragma omp simd
        for (int64_t e = e0; e < e1; ++e) ap[e] = act_f<A, T>(pp[e]);
      });
    } else {
      Av = slot(states, j, 1);
    }
    at::mm_out(G, a, K[j].t());
    {
      T* gp = G.data_ptr<T>();
      T* cp = c.data_ptr<T>();
      const T* lp = a.data_ptr<T>();
      // act' from P_j itself where act(P) does not determine it (kStoresPre)
      const T* sp = kStoresPre<A> ? Pv.data_ptr<T>() : Av.data_ptr<T>();
      const T m = static_cast<T>(mh2), sc = c_negated ? T(-1) : T(1);
      // G *= -h^2 act'(P_j), c <- c + 2 lam, db_j = sum G: one pass
      colsum_pass<T>(G.size(0), G.size(1), gb[j].data_ptr<T>(), false, [&](int64_t e) {
        cp[e] = sc * cp[e] + T(2) * lp[e];
        return gp[e] *= m * stored_grad<A, T>(sp[e]);
      });
    }
    at::Tensor gwj = gw[j];
    at::mm_out(gwj, G.t(), Y);
    gwj.addmm_(Av.t(), a, 1.0, mh2);
    c.addmm_(G, K[j]);
    // (a, c) <- (c, -a): the buffer of a becomes c as it is, marked negated,
    // and the next pass over c (or the end) applies the sign.
    std::swap(a, c);
    c_negated = true;
    if (Reversible) {
      Yn.mul_(-1).add_(Y, 2).addmm_(Av, K[j], 1.0, mh2);
      std::swap(Y, Yn);
    }
  }
  if (c_negated) c.neg_();
  if (Reversible) {
    ry = Yn;      // Y_0
    ryprev = Y;   // Y_{-1}
  }
}

// ------------------------------------------------------------ bfloat16, wide
//
// As resnet.cpp's wide reduced path (tile.h: wide_reduced_native): the GEMMs in
// bfloat16, the rest in float32. The pair (Y_j, Y_{j-1}) of the forward, the
// adjoint pair of the backward and the pair a reversible backward rebuilds stay
// float32 through all layers; bf16 copies feed the GEMMs and the stored states.
// Leapfrog's two-step recurrence subtracts nearly equal states (2 Y_j - Y_{j-1}),
// so rounding them to bf16 at every layer (as plain PyTorch under autocast does)
// is where its error would come from.

template <typename T, Act A>
void forward_wide_reduced(const at::Tensor& y, const at::Tensor& yprev, const at::Tensor& K,
                          const at::Tensor& b, float h, at::Tensor& out, at::Tensor& out_prev,
                          at::Tensor& states, bool store) {
  const int64_t N = K.size(0), B = y.size(0), d = y.size(1);
  const float mh2 = -h * h;
  store = store && N > 0;
  at::Tensor Y32 = y.to(at::kFloat), Yp32 = yprev.to(at::kFloat);  // Y_j, Y_{j-1}
  float* yp = Y32.data_ptr<float>();
  float* ypp = Yp32.data_ptr<float>();
  // Y_j in T (the GEMM's input): its state slot when states are kept.
  at::Tensor cur = store ? slot(states, 0, 0) : at::empty({B, d}, y.options());
  cur.copy_(y);
  at::Tensor Abuf = store && !kStoresPre<A> ? at::Tensor() : at::empty({B, d}, y.options());
  at::Tensor Q = at::empty({B, d}, y.options());
  for (int64_t j = 0; j < N; ++j) {
    at::Tensor P = store ? slot(states, j, 1) : Abuf;  // P_j, then what the state keeps
    const at::Tensor Aj = store && !kStoresPre<A> ? P : Abuf;
    at::mm_out(P, cur, K[j].t());
    {  // A_j = act(P_j + b_j); a kept state holds A_j (in place) or P_j + b_j (kStoresPre)
      T* pp = P.data_ptr<T>();
      T* ap = Aj.data_ptr<T>();
      const T* bj = b.data_ptr<T>() + j * d;
      with_flags(kStoresPre<A> && store, false, false, [&](auto KeepP, auto, auto) {
        ew_rows(B, d, [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t o = r * d;
#pragma omp simd
            for (int64_t c = 0; c < d; ++c) {
              const float v = static_cast<float>(pp[o + c]) + static_cast<float>(bj[c]);
              if constexpr (KeepP()) pp[o + c] = round_to<T>(v);
              ap[o + c] = round_to<T>(act_f<A, float>(v));
            }
          }
        });
      });
    }
    at::mm_out(Q, Aj, K[j]);
    T* np = store && j + 1 < N ? slot(states, j + 1, 0).data_ptr<T>()
                               : (store ? nullptr : cur.data_ptr<T>());
    const T* qp = Q.data_ptr<T>();
    with_flags(np != nullptr, false, false, [&](auto Next, auto, auto) {
      ew(B * d, [&](int64_t e0, int64_t e1) {
#pragma omp simd
        for (int64_t e = e0; e < e1; ++e) {  // Y_{j+1} = 2 Y_j - Y_{j-1} - h^2 A_j K_j
          const float yo = yp[e];
          const float yn = 2.f * yo - ypp[e] + mh2 * static_cast<float>(qp[e]);
          ypp[e] = yo;
          yp[e] = yn;
          if constexpr (Next()) np[e] = round_to<T>(yn);
        }
      });
    });
    if (store && j + 1 < N) cur = slot(states, j + 1, 0);
  }
  out.copy_(Y32);
  out_prev.copy_(Yp32);
}

template <typename T, Act A, bool Reversible>
void backward_wide_reduced(const at::Tensor& ga, const at::Tensor& gc, const at::Tensor& states,
                           const at::Tensor& y_hi, const at::Tensor& y_lo, const at::Tensor& K,
                           const at::Tensor& b, float h, at::Tensor& gy, at::Tensor& gyp,
                           at::Tensor& gw, at::Tensor& gb, at::Tensor& ry, at::Tensor& ryp) {
  const int64_t N = K.size(0), B = ga.size(0), d = ga.size(1);
  const float mh2 = -h * h;
  const at::TensorOptions opt = ga.options();
  at::Tensor a32 = ga.to(at::kFloat), c32 = gc.to(at::kFloat);  // (dL/dY_{j+1}, dL/dY_j)
  at::Tensor Y32, Yn32;                                         // Y_j, Y_{j+1} (reversible)
  if (Reversible) {
    Y32 = y_lo.to(at::kFloat);
    Yn32 = y_hi.to(at::kFloat);
  }
  float* ap32 = a32.data_ptr<float>();
  float* cp32 = c32.data_ptr<float>();
  float* yp = Reversible ? Y32.data_ptr<float>() : nullptr;
  float* ynp = Reversible ? Yn32.data_ptr<float>() : nullptr;
  // One GEMM of 2B rows for dK_j = G^T Y_j - h^2 A_j^T lam = X^T W, and (reversible)
  // one for [G K_j; A_j K_j] = X K_j: X = [G; A_j], W = [Y_j; -h^2 lam].
  at::Tensor X = at::empty({2 * B, d}, opt), W = at::empty({2 * B, d}, opt);
  at::Tensor R = at::empty({Reversible ? 2 * B : B, d}, opt), Gp = at::empty({B, d}, opt);
  at::Tensor Xg = X.narrow(0, 0, B), Xa = X.narrow(0, B, B);
  at::Tensor Wy = W.narrow(0, 0, B), Wl = W.narrow(0, B, B);
  at::Tensor Pv = Reversible ? at::empty({B, d}, opt) : at::Tensor();  // P_j (+ b_j)
  T* wl = Wl.data_ptr<T>();
  T* wy = Wy.data_ptr<T>();
  ew(B * d, [&](int64_t e0, int64_t e1) {
#pragma omp simd
    for (int64_t e = e0; e < e1; ++e) {
      wl[e] = round_to<T>(mh2 * ap32[e]);
      if (Reversible) wy[e] = round_to<T>(yp[e]);
    }
  });
  std::vector<float> gb32(d);
  for (int64_t j = N - 1; j >= 0; --j) {
    const T* bj = b.data_ptr<T>() + j * d;
    // Xa = A_j; sp: what act' reads (P_j + b_j for kStoresPre, else A_j).
    const T* sp = Xa.data_ptr<T>();
    if (Reversible) {
      at::mm_out(Pv, Wy, K[j].t());
      act_step_reduced<T, A>(B, d, nullptr, nullptr, Pv.data_ptr<T>(),
                             kStoresPre<A> ? Pv.data_ptr<T>() : Xa.data_ptr<T>(), 0.f, bj);
    } else {
      Wy.copy_(slot(states, j, 0));
      if constexpr (kStoresPre<A>) {
        Pv = slot(states, j, 1);
      } else {
        Xa.copy_(slot(states, j, 1));
      }
    }
    if constexpr (kStoresPre<A>) {  // A_j from P_j + b_j, which act' reads
      const T* pp = Pv.data_ptr<T>();
      T* xa = Xa.data_ptr<T>();
      ew(B * d, [&](int64_t e0, int64_t e1) {
#pragma omp simd
        for (int64_t e = e0; e < e1; ++e)
          xa[e] = round_to<T>(act_f<A, float>(static_cast<float>(pp[e])));
      });
      sp = pp;
    }
    at::mm_out(Gp, Wl, K[j].t());  // -h^2 lam K_j^T
    {  // G = -h^2 (lam K_j^T) act'(P_j), db_j = sum G
      const T* gpp = Gp.data_ptr<T>();
      T* xg = Xg.data_ptr<T>();
      colsum_pass<float>(B, d, gb32.data(), false, [&](int64_t e) {
        const float g =
            static_cast<float>(gpp[e]) * stored_grad<A, float>(static_cast<float>(sp[e]));
        xg[e] = round_to<T>(g);
        return g;
      });
      put_bias_grad<T>(gb, j, gb32.data());
    }
    at::mm_out(R, Reversible ? X : Xg, K[j]);
    at::Tensor gwj = gw[j];
    at::mm_out(gwj, X.t(), W);
    const T* rp = R.data_ptr<T>();
    ew(B * d, [&](int64_t e0, int64_t e1) {
#pragma omp simd
      for (int64_t e = e0; e < e1; ++e) {
        // (a, c) <- (c + 2 lam + G K_j, -lam)
        const float lam = ap32[e];
        const float na = cp32[e] + 2.f * lam + static_cast<float>(rp[e]);
        cp32[e] = -lam;
        ap32[e] = na;
        wl[e] = round_to<T>(mh2 * na);
        if (Reversible) {  // Y_{j-1} = 2 Y_j - Y_{j+1} - h^2 A_j K_j
          const float yo = yp[e];
          const float yb = 2.f * yo - ynp[e] + mh2 * static_cast<float>(rp[B * d + e]);
          ynp[e] = yo;
          yp[e] = yb;
          wy[e] = round_to<T>(yb);
        }
      }
    });
  }
  gy.copy_(a32);
  gyp.copy_(c32);
  if (Reversible) {
    ry.copy_(Yn32);  // Y_0
    ryp.copy_(Y32);  // Y_{-1}
  }
}

template <bool Reversible>
T6 backward(const at::Tensor& ga_in, const at::Tensor& gc_in, const at::Tensor& states_in,
            const at::Tensor& yhi_in, const at::Tensor& ylo_in, const at::Tensor& K_in,
            const at::Tensor& b_in, double step, Act act) {
  if (in_float32_below(ga_in, K_in)) {  // tile.h: float32 parameters
    return pair_backward_in_float32(
        [&](const auto&... t) { return backward<Reversible>(t..., K_in, b_in, step, act); },
        ga_in, gc_in, states_in, yhi_in, ylo_in);
  }
  // bfloat16 copies of float32 parameters for the wide bfloat16 GEMMs (tile.h)
  const bool wide16 = wide_bf16(ga_in);
  const at::Tensor ga = ga_in.contiguous(), gc = gc_in.contiguous(),
                   K = wide16 ? params_as(K_in, at::kBFloat16) : K_in.contiguous(),
                   b = wide16 ? params_as(b_in, at::kBFloat16) : b_in.contiguous();
  const at::ScalarType param_type = K_in.scalar_type();  // of the parameters' gradients
  const at::Tensor states = Reversible ? at::Tensor() : states_in.contiguous();
  const at::Tensor yhi = Reversible ? yhi_in.contiguous() : at::Tensor();
  const at::Tensor ylo = Reversible ? ylo_in.contiguous() : at::Tensor();
  const int64_t N = K.size(0), B = ga.size(0), d = ga.size(1);
  at::Tensor gy = at::empty({B, d}, ga.options()), gyp = at::empty({B, d}, ga.options());
  at::Tensor gw, gb, ry, ryp;
  if (Reversible) {
    ry = at::empty({B, d}, ga.options());
    ryp = at::empty({B, d}, ga.options());
  }
  if (wide16) {
    gw = empty_cached({N, d, d}, ga.options());
    gb = at::empty({N, d}, ga.options().dtype(param_type));
    SN_DISPATCH_ACT(act, [&] {
      backward_wide_reduced<at::BFloat16, kAct, Reversible>(ga, gc, states, yhi, ylo, K, b,
                                                            static_cast<float>(step), gy, gyp,
                                                            gw, gb, ry, ryp);
    });
    return {gy, gyp, params_as(gw, param_type), gb, ry, ryp};
  }
  if (is_reduced(ga.scalar_type()) && narrow(d)) {  // tile.h: reduced_native
    const std::vector<float> Kf = small_float(K), bf = small_float(b);
    const int64_t chunks = num_chunks(B, N * d * d);
    Partials<float> part(chunks, N, d, ga.options().dtype(at::kFloat));
    AT_DISPATCH_REDUCED_FLOATING_TYPES(ga.scalar_type(), "leapfrog_backward_reduced", [&] {
      SN_DISPATCH_ACT(act, [&] {
        backward_narrow<float, kAct, Reversible, scalar_t>(
            ga.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(),
            Reversible ? nullptr : states.data_ptr<scalar_t>(),
            Reversible ? yhi.data_ptr<scalar_t>() : nullptr,
            Reversible ? ylo.data_ptr<scalar_t>() : nullptr, Kf.data(),
            bf.data(), static_cast<float>(step), N, B, d, gy.data_ptr<scalar_t>(),
            gyp.data_ptr<scalar_t>(), Reversible ? ry.data_ptr<scalar_t>() : nullptr,
            Reversible ? ryp.data_ptr<scalar_t>() : nullptr, part);
      });
    });
    std::tie(gw, gb) = part.sum(chunks, param_type);
    return {gy, gyp, gw, gb, ry, ryp};
  }
  AT_DISPATCH_FLOATING_TYPES(ga.scalar_type(), "leapfrog_backward", [&] {
    const scalar_t h = static_cast<scalar_t>(step);
    SN_DISPATCH_ACT(act, [&] {
      if (narrow(d)) {
        Partials<scalar_t> part(num_chunks(B, N * d * d), N, d, ga.options());
        backward_narrow<scalar_t, kAct, Reversible>(
            ga.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(),
            Reversible ? nullptr : states.data_ptr<scalar_t>(),
            Reversible ? yhi.data_ptr<scalar_t>() : nullptr,
            Reversible ? ylo.data_ptr<scalar_t>() : nullptr, K.data_ptr<scalar_t>(),
            b.data_ptr<scalar_t>(), h, N, B, d, gy.data_ptr<scalar_t>(),
            gyp.data_ptr<scalar_t>(), Reversible ? ry.data_ptr<scalar_t>() : nullptr,
            Reversible ? ryp.data_ptr<scalar_t>() : nullptr, part);
        std::tie(gw, gb) = part.sum(num_chunks(B, N * d * d));
      } else {
        gw = empty_cached({N, d, d}, ga.options());
        gb = at::empty({N, d}, ga.options());
        at::Tensor a = at::empty({B, d}, ga.options()), c = at::empty({B, d}, ga.options());
        backward_wide<scalar_t, kAct, Reversible>(ga, gc, states, yhi, ylo, K, b, h, a, c, gw,
                                                  gb, ry, ryp);
        gy = a;
        gyp = c;
      }
    });
  });
  return {gy, gyp, gw, gb, ry, ryp};
}

}  // namespace
}  // namespace cpu_detail

namespace cpu {

T3 leapfrog_forward(const at::Tensor& y_in, const at::Tensor& yprev_in, const at::Tensor& weight,
                    const at::Tensor& bias, double step, c10::string_view activation,
                    bool store) {
  using namespace cpu_detail;
  check_stack(y_in, weight, bias, /*float32_params=*/true);
  check_like(yprev_in, "y_prev", y_in);
  check_step(step);
  if (in_float32_below(y_in, weight)) {  // tile.h: float32 parameters
    using rp_detail::down, rp_detail::up;
    return down(leapfrog_forward(up(y_in), up(yprev_in), weight, bias, step, activation, store),
                y_in.scalar_type());
  }
  const Act act = parse_activation(activation);
  const bool wide16 = wide_bf16(y_in);  // bfloat16 GEMMs: bfloat16 parameters
  const at::Tensor y = y_in.contiguous(), yprev = yprev_in.contiguous(),
                   K = wide16 ? params_as(weight, at::kBFloat16) : weight.contiguous(),
                   b = wide16 ? params_as(bias, at::kBFloat16) : bias.contiguous();
  const int64_t N = K.size(0), B = y.size(0), d = y.size(1);
  at::Tensor out = at::empty({B, d}, y.options()), out_prev = at::empty({B, d}, y.options());
  at::Tensor states = empty_states(y, store ? N : 0, 2);
  if (wide16) {
    SN_DISPATCH_ACT(act, [&] {
      forward_wide_reduced<at::BFloat16, kAct>(y, yprev, K, b, static_cast<float>(step), out,
                                               out_prev, states, store);
    });
    return {out, out_prev, states};
  }
  if (is_reduced(y.scalar_type()) && narrow(d)) {  // tile.h: reduced_native
    const std::vector<float> Kf = small_float(K), bf = small_float(b);
    AT_DISPATCH_REDUCED_FLOATING_TYPES(y.scalar_type(), "leapfrog_forward_reduced", [&] {
      SN_DISPATCH_ACT(act, [&] {
        forward_narrow<float, kAct, scalar_t>(
            y.data_ptr<scalar_t>(), yprev.data_ptr<scalar_t>(), Kf.data(),
            bf.data(), static_cast<float>(step), N, B, d, out.data_ptr<scalar_t>(),
            out_prev.data_ptr<scalar_t>(), store ? states.data_ptr<scalar_t>() : nullptr);
      });
    });
    return {out, out_prev, states};
  }
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "leapfrog_forward", [&] {
    const scalar_t h = static_cast<scalar_t>(step);
    SN_DISPATCH_ACT(act, [&] {
      if (narrow(d)) {
        forward_narrow<scalar_t, kAct>(
            y.data_ptr<scalar_t>(), yprev.data_ptr<scalar_t>(), K.data_ptr<scalar_t>(),
            b.data_ptr<scalar_t>(), h, N, B, d, out.data_ptr<scalar_t>(),
            out_prev.data_ptr<scalar_t>(), store ? states.data_ptr<scalar_t>() : nullptr);
      } else {
        at::Tensor Y = at::empty({B, d}, y.options()), Yp = at::empty({B, d}, y.options());
        forward_wide<scalar_t, kAct>(y, yprev, K, b, h, Y, Yp, states, store);
        out = Y;
        out_prev = Yp;
      }
    });
  });
  return {out, out_prev, states};
}

T4 leapfrog_backward(const at::Tensor& grad_y, const at::Tensor& grad_y_prev,
                     const at::Tensor& states, const at::Tensor& weight, const at::Tensor& bias,
                     double step, c10::string_view activation) {
  check_stack(grad_y, weight, bias, /*float32_params=*/true);
  check_like(grad_y_prev, "grad_y_prev", grad_y);
  check_states(states, 2, grad_y, weight);
  check_step(step);
  auto r = cpu_detail::backward<false>(grad_y, grad_y_prev, states, {}, {}, weight, bias, step,
                                       parse_activation(activation));
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r)};
}

T6 leapfrog_backward_reversible(const at::Tensor& grad_y, const at::Tensor& grad_y_prev,
                                const at::Tensor& y, const at::Tensor& y_prev,
                                const at::Tensor& weight, const at::Tensor& bias, double step,
                                c10::string_view activation) {
  check_stack(grad_y, weight, bias, /*float32_params=*/true);
  check_like(grad_y_prev, "grad_y_prev", grad_y);
  check_like(y, "y", grad_y);
  check_like(y_prev, "y_prev", grad_y);
  check_step(step);
  return cpu_detail::backward<true>(grad_y, grad_y_prev, {}, y, y_prev, weight, bias, step,
                                    parse_activation(activation));
}

}  // namespace cpu
}  // namespace stablenets

TORCH_LIBRARY_IMPL(stablenets, CPU, m) {
  using stablenets::cpu_detail::reduced_native;
  SN_IMPL_NATIVE(m, "leapfrog_forward", &stablenets::cpu::leapfrog_forward, &reduced_native);
  SN_IMPL_NATIVE(m, "leapfrog_backward", &stablenets::cpu::leapfrog_backward, &reduced_native);
  SN_IMPL_NATIVE(m, "leapfrog_backward_reversible",
                 &stablenets::cpu::leapfrog_backward_reversible, &reduced_native);
}
