// The wide regime (d > kNarrowMax): per layer, cuBLAS GEMMs through ATen
// (so torch.backends.cuda.matmul.allow_tf32 and the other matmul settings
// apply), written straight into the slices of the states tensor, plus one
// fused elementwise pass from wide_ops.cuh; the layer loop runs here in C++.
// Stored backwards keep every layer's pre-activation gradients and get all
// weight gradients from batched GEMMs at the end; the reversible backwards keep
// O(B d) memory and use per-layer GEMMs.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <tuple>
#include <utility>

#include "stablenets/activation.h"
#include "wide_ops.cuh"

namespace stablenets {
namespace cuda_detail {
namespace wide {

using at::Tensor;

// Layer j's (B, d) slot s of a states tensor (N, S, B, d).
inline Tensor slot(const Tensor& states, int64_t j, int64_t s) {
  return states.select(0, j).select(0, s);
}

// Whether a forward keeps states (store=True).
inline bool stores(const Tensor& states) { return states.defined() && states.size(0) > 0; }

// ------------------------------------------------------------ wide forward

inline void resnet_forward(const Tensor& y, const Tensor& K, const Tensor& b, double h, Act act,
                           const Tensor& out, const Tensor& states) {
  const int64_t N = K.size(0), n = y.numel(), d = y.size(1);
  const bool store = stores(states);
  const Tensor pbuf = store ? Tensor() : at::empty_like(y);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "stablenets_resnet_forward_wide", [&] {
    using T = scalar_t;
    for (int64_t j = 0; j < N; ++j) {
      const Tensor yin = j == 0 ? y : (store ? slot(states, j, 0) : out);
      Tensor p = store ? slot(states, j, 1) : pbuf;
      at::mm_out(p, yin, K.select(0, j).t());
      const Tensor yout = (store && j + 1 < N) ? slot(states, j + 1, 0) : out;
      FwdStep<T> op{p.data_ptr<T>(),
                    store,
                    b.data_ptr<T>() + j * d,
                    yin.data_ptr<T>(),
                    yout.data_ptr<T>(),
                    nullptr,
                    (store && j == 0) ? slot(states, 0, 0).data_ptr<T>() : nullptr,
                    static_cast<T>(h),
                    act,
                    d};
      launch_elementwise<T>(op, n, d);
    }
  });
}

// Returns (Y_N, Y_{N-1}).
inline std::pair<Tensor, Tensor> leapfrog_forward(const Tensor& y, const Tensor& yprev,
                                                  const Tensor& K, const Tensor& b, double h,
                                                  Act act, const Tensor& states) {
  const int64_t N = K.size(0), n = y.numel(), d = y.size(1);
  const bool store = stores(states);
  const Tensor pbuf = store ? Tensor() : at::empty_like(y);
  const Tensor abuf = at::empty_like(y);
  Tensor out0, out1;
  Tensor X[2];
  if (store) {
    out0 = at::empty_like(y);
    out1 = at::empty_like(y);
  } else {
    X[0] = at::empty_like(y);
    X[1] = N > 1 ? at::empty_like(y) : Tensor();
  }
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "stablenets_leapfrog_forward_wide", [&] {
    using T = scalar_t;
    for (int64_t j = 0; j < N; ++j) {
      Tensor cur, prev, target, p;
      if (store) {
        cur = j == 0 ? y : slot(states, j, 0);
        prev = j == 0 ? yprev : (j == 1 ? y : slot(states, j - 1, 0));
        target = j + 1 < N ? slot(states, j + 1, 0) : out0;
        p = slot(states, j, 1);
      } else {
        // Two owned buffers; from j = 2 on, Y_{j+1} overwrites Y_{j-1} in place.
        cur = j == 0 ? y : X[(j - 1) % 2];
        prev = j == 0 ? yprev : (j == 1 ? y : X[j % 2]);
        target = X[j % 2];
        p = pbuf;
      }
      const Tensor Kj = K.select(0, j);
      at::mm_out(p, cur, Kj.t());
      FwdLeap<T> op{p.data_ptr<T>(),
                    store,
                    b.data_ptr<T>() + j * d,
                    cur.data_ptr<T>(),
                    prev.data_ptr<T>(),
                    abuf.data_ptr<T>(),
                    target.data_ptr<T>(),
                    (store && j == 0) ? slot(states, 0, 0).data_ptr<T>() : nullptr,
                    (store && j == N - 1) ? out1.data_ptr<T>() : nullptr,
                    act,
                    d};
      launch_elementwise<T>(op, n, d);
      target.addmm_(abuf, Kj, 1.0, -h * h);
    }
  });
  if (!store) {
    out0 = X[(N - 1) % 2];
    out1 = N > 1 ? X[N % 2] : y.clone();
  }
  return {out0, out1};
}

inline void verlet_forward(const Tensor& y, const Tensor& z, const Tensor& K, const Tensor& b,
                           double h, Act act, const Tensor& out0, const Tensor& out1,
                           const Tensor& states) {
  const int64_t N = K.size(0), n = y.numel(), d = y.size(1);
  const bool store = stores(states);
  const Tensor pbuf = store ? Tensor() : at::empty_like(y);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "stablenets_verlet_forward_wide", [&] {
    using T = scalar_t;
    const T hh = static_cast<T>(h);
    for (int64_t j = 0; j < N; ++j) {
      const Tensor Kj = K.select(0, j);
      T* const bj = b.data_ptr<T>() + j * d;
      Tensor ycur, zin, zout, p1, p2, yout;
      if (store) {
        ycur = j == 0 ? y : slot(states, j, 0);
        zin = j == 0 ? z : slot(states, j - 1, 2);
        zout = slot(states, j, 2);
        p1 = slot(states, j, 1);
        p2 = slot(states, j, 3);
        yout = j + 1 < N ? slot(states, j + 1, 0) : out0;
      } else {
        ycur = j == 0 ? y : out0;
        zin = j == 0 ? z : out1;
        zout = out1;
        p1 = p2 = pbuf;
        yout = out0;
      }
      at::mm_out(p1, ycur, Kj);  // P1 = Y K
      FwdStep<T> zop{p1.data_ptr<T>(),
                     store,
                     bj,
                     zin.data_ptr<T>(),
                     zout.data_ptr<T>(),
                     (store && j == N - 1) ? out1.data_ptr<T>() : nullptr,
                     nullptr,
                     -hh,
                     act,
                     d};
      launch_elementwise<T>(zop, n, d);
      at::mm_out(p2, zout, Kj.t());  // P2 = Z K^T
      FwdStep<T> yop{p2.data_ptr<T>(),
                     store,
                     bj,
                     ycur.data_ptr<T>(),
                     yout.data_ptr<T>(),
                     nullptr,
                     (store && j == 0) ? slot(states, 0, 0).data_ptr<T>() : nullptr,
                     hh,
                     act,
                     d};
      launch_elementwise<T>(yop, n, d);
    }
  });
}

// ----------------------------------------------------------- wide backward

// Returns (grad_y, dW, db); `antisym` turns dW into (dW - dW^T) / 2.
inline std::tuple<Tensor, Tensor, Tensor> resnet_backward(const Tensor& gout, const Tensor& states,
                                                          const Tensor& K, double h, Act act,
                                                          bool antisym) {
  const int64_t N = K.size(0), B = gout.size(0), n = gout.numel(), d = gout.size(1);
  Tensor g = gout.clone();
  Tensor G = at::empty({N, B, d}, gout.options());
  AT_DISPATCH_FLOATING_TYPES(gout.scalar_type(), "stablenets_resnet_backward_wide", [&] {
    using T = scalar_t;
    for (int64_t j = N - 1; j >= 0; --j) {
      const Tensor Gj = G.select(0, j);
      GradScale<T> op{Gj.data_ptr<T>(),
                      g.data_ptr<T>(),
                      slot(states, j, 1).data_ptr<T>(),
                      nullptr,
                      static_cast<T>(h),
                      act,
                      d};
      launch_elementwise<T>(op, n, d);
      g.addmm_(Gj, K.select(0, j));  // g += G K
    }
  });
  Tensor dW = at::bmm(G.transpose(1, 2), states.select(1, 0));
  if (antisym) dW = (dW - dW.transpose(1, 2)).mul_(0.5);
  Tensor db = G.sum(1);
  return {g, dW, db};
}

// Returns (grad_y, grad_y_prev, dW, db).
inline std::tuple<Tensor, Tensor, Tensor, Tensor> leapfrog_backward(
    const Tensor& ga, const Tensor& gc, const Tensor& states, const Tensor& K, double h, Act act) {
  const int64_t N = K.size(0), B = ga.size(0), n = ga.numel(), d = ga.size(1);
  // Per layer: lam_j = dL/dY_{j+1}, A_j = -h^2 act(P_j), G_j, for the batched
  // weight gradient dK_j = A_j^T lam_j + G_j^T Y_j at the end.
  Tensor L = at::empty({N, B, d}, ga.options());
  Tensor A = at::empty_like(L), G = at::empty_like(L);
  Tensor gy = at::empty_like(ga), c = at::empty_like(ga), m = at::empty_like(ga);
  L.select(0, N - 1).copy_(ga);
  AT_DISPATCH_FLOATING_TYPES(ga.scalar_type(), "stablenets_leapfrog_backward_wide", [&] {
    using T = scalar_t;
    const T* c_in = gc.data_ptr<T>();
    for (int64_t j = N - 1; j >= 0; --j) {
      const Tensor Kj = K.select(0, j), lam = L.select(0, j), Gj = G.select(0, j);
      at::mm_out(m, lam, Kj.t());
      const Tensor anext = j > 0 ? L.select(0, j - 1) : gy;
      BwdLeap<T> op{m.data_ptr<T>(),
                    slot(states, j, 1).data_ptr<T>(),
                    nullptr,
                    lam.data_ptr<T>(),
                    c_in,
                    Gj.data_ptr<T>(),
                    A.select(0, j).data_ptr<T>(),
                    anext.data_ptr<T>(),
                    c.data_ptr<T>(),
                    nullptr,
                    nullptr,
                    static_cast<T>(-h * h),
                    act,
                    d};
      launch_elementwise<T>(op, n, d);
      anext.addmm_(Gj, Kj);  // c + 2 lam + G K
      c_in = c.data_ptr<T>();
    }
  });
  Tensor dW = at::bmm(A.transpose(1, 2), L);
  dW.baddbmm_(G.transpose(1, 2), states.select(1, 0));
  Tensor db = G.sum(1);
  return {gy, c, dW, db};
}

inline std::tuple<Tensor, Tensor, Tensor, Tensor> leapfrog_backward_reversible(
    const Tensor& ga, const Tensor& gc, const Tensor& y, const Tensor& yprev, const Tensor& K,
    const Tensor& b, double h, Act act) {
  const int64_t N = K.size(0), n = ga.numel(), d = ga.size(1);
  Tensor a = ga.clone(), c = gc.clone(), an = at::empty_like(ga);
  Tensor yhi = y.clone(), ylo = yprev.clone();  // (Y_{j+1}, Y_j)
  Tensor p = at::empty_like(ga), m = at::empty_like(ga), g = at::empty_like(ga),
         act_buf = at::empty_like(ga);
  Tensor dW = at::empty({N, d, d}, ga.options()), db = at::empty({N, d}, ga.options());
  AT_DISPATCH_FLOATING_TYPES(ga.scalar_type(), "stablenets_leapfrog_backward_rev_wide", [&] {
    using T = scalar_t;
    for (int64_t j = N - 1; j >= 0; --j) {
      const Tensor Kj = K.select(0, j);
      at::mm_out(p, ylo, Kj.t());
      at::mm_out(m, a, Kj.t());
      BwdLeap<T> op{m.data_ptr<T>(),
                    p.data_ptr<T>(),
                    b.data_ptr<T>() + j * d,
                    a.data_ptr<T>(),
                    c.data_ptr<T>(),
                    g.data_ptr<T>(),
                    act_buf.data_ptr<T>(),
                    an.data_ptr<T>(),
                    c.data_ptr<T>(),
                    j > 0 ? yhi.data_ptr<T>() : nullptr,
                    ylo.data_ptr<T>(),
                    static_cast<T>(-h * h),
                    act,
                    d};
      launch_elementwise<T>(op, n, d);
      an.addmm_(g, Kj);
      Tensor dWj = dW.select(0, j), dbj = db.select(0, j);
      at::mm_out(dWj, act_buf.t(), a);  // -h^2 act(P)^T lam
      dWj.addmm_(g.t(), ylo);           // + G^T Y_j
      at::sum_out(dbj, g, {0});
      if (j > 0) {
        yhi.addmm_(act_buf, Kj);  // Y_{j-1} = 2 Y_j - Y_{j+1} - h^2 act(P) K
        std::swap(yhi, ylo);
      }
      std::swap(a, an);
    }
  });
  return {a, c, dW, db};
}

inline std::tuple<Tensor, Tensor, Tensor, Tensor> verlet_backward(
    const Tensor& gy, const Tensor& gz, const Tensor& states, const Tensor& K, double h, Act act) {
  const int64_t N = K.size(0), B = gy.size(0), n = gy.numel(), d = gy.size(1);
  Tensor ly = gy.clone(), lz = gz.clone();
  Tensor G = at::empty({N, 2, B, d}, gy.options());  // [G2_j, G1_j]
  AT_DISPATCH_FLOATING_TYPES(gy.scalar_type(), "stablenets_verlet_backward_wide", [&] {
    using T = scalar_t;
    const T hh = static_cast<T>(h);
    for (int64_t j = N - 1; j >= 0; --j) {
      const Tensor Kj = K.select(0, j), G2 = slot(G, j, 0), G1 = slot(G, j, 1);
      GradScale<T> op2{G2.data_ptr<T>(),
                       ly.data_ptr<T>(),
                       slot(states, j, 3).data_ptr<T>(),
                       nullptr,
                       hh,
                       act,
                       d};
      launch_elementwise<T>(op2, n, d);
      lz.addmm_(G2, Kj);
      GradScale<T> op1{G1.data_ptr<T>(),
                       lz.data_ptr<T>(),
                       slot(states, j, 1).data_ptr<T>(),
                       nullptr,
                       -hh,
                       act,
                       d};
      launch_elementwise<T>(op1, n, d);
      ly.addmm_(G1, Kj.t());
    }
  });
  Tensor dW = at::bmm(G.select(1, 0).transpose(1, 2), states.select(1, 2));  // G2^T Z
  dW.baddbmm_(states.select(1, 0).transpose(1, 2), G.select(1, 1));          // Y^T G1
  Tensor db = G.sum({1, 2});
  return {ly, lz, dW, db};
}

inline std::tuple<Tensor, Tensor, Tensor, Tensor> verlet_backward_reversible(
    const Tensor& gy, const Tensor& gz, const Tensor& y, const Tensor& z, const Tensor& K,
    const Tensor& b, double h, Act act) {
  const int64_t N = K.size(0), B = gy.size(0), n = gy.numel(), d = gy.size(1);
  Tensor ly = gy.clone(), lz = gz.clone();
  Tensor Y = y.clone(), Z = z.clone(), Zp = at::empty_like(z);
  Tensor p = at::empty_like(gy);
  Tensor G = at::empty({2, B, d}, gy.options());  // [G2, G1]
  const Tensor G2 = G.select(0, 0), G1 = G.select(0, 1);
  Tensor dW = at::empty({N, d, d}, gy.options()), db = at::empty({N, d}, gy.options());
  AT_DISPATCH_FLOATING_TYPES(gy.scalar_type(), "stablenets_verlet_backward_rev_wide", [&] {
    using T = scalar_t;
    const T hh = static_cast<T>(h);
    for (int64_t j = N - 1; j >= 0; --j) {
      const Tensor Kj = K.select(0, j);
      T* const bj = b.data_ptr<T>() + j * d;
      at::mm_out(p, Z, Kj.t());  // P2 = Z_{j+1/2} K^T (+ b)
      VerletBackY<T> opy{
          p.data_ptr<T>(), bj, Y.data_ptr<T>(), ly.data_ptr<T>(), G2.data_ptr<T>(), hh, act, d};
      launch_elementwise<T>(opy, n, d);  // Y <- Y_j, G2
      at::mm_out(p, Y, Kj);              // P1 = Y_j K (+ b)
      lz.addmm_(G2, Kj);
      VerletBackZ<T> opz{p.data_ptr<T>(),
                         bj,
                         Z.data_ptr<T>(),
                         Zp.data_ptr<T>(),
                         lz.data_ptr<T>(),
                         G1.data_ptr<T>(),
                         hh,
                         act,
                         d};
      launch_elementwise<T>(opz, n, d);  // Zp <- Z_{j-1/2}, G1
      ly.addmm_(G1, Kj.t());
      Tensor dWj = dW.select(0, j), dbj = db.select(0, j);
      at::mm_out(dWj, G2.t(), Z);
      dWj.addmm_(Y.t(), G1);
      at::sum_out(dbj, G, {0, 1});
      std::swap(Z, Zp);
    }
  });
  return {ly, lz, dW, db};
}

}  // namespace wide
}  // namespace cuda_detail
}  // namespace stablenets
