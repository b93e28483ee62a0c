// The wide regime (d > kNarrowMax): per layer, cuBLAS GEMMs (through ATen's
// blas entry point, so torch.backends.cuda.matmul.allow_tf32 applies) written
// straight into the slices of the states tensor, plus one fused elementwise
// pass from wide_ops.cuh; the layer loop runs here in C++ on raw pointers, to
// keep the host cost per layer small next to the GPU work.
//
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

// Row-major C (M x N, leading dimension ldc) = alpha op(A) op(B) + beta C, where
// op(A) is M x K and A is stored row-major as M x K (ta false) or K x M (ta
// true); likewise B. Row-major X is column-major X^T, so this is
// C^T = op(B)^T op(A)^T for BLAS.
template <typename T>
void gemm_rm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
             const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  blas_gemm<T>(tb ? 't' : 'n', ta ? 't' : 'n', N, M, K, alpha, B, ldb, A, lda, beta, C, ldc);
}

// Whether a forward keeps states (store=True).
inline bool stores(const Tensor& states) { return states.defined() && states.size(0) > 0; }

// Pointer to the (B, d) slot s of layer j in states (N, S, B, d).
template <typename T>
T* slot_ptr(T* states, int64_t j, int64_t s, int64_t S, int64_t n) {
  return states + (j * S + s) * n;
}

// ------------------------------------------------------------ forward

inline void resnet_forward(const Tensor& y, const Tensor& K, const Tensor& b, double h, Act act,
                           const Tensor& out, const Tensor& states) {
  const int64_t N = K.size(0), B = y.size(0), d = y.size(1), n = B * d;
  const bool store = stores(states);
  const Tensor pbuf = store ? Tensor() : at::empty_like(y);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "stablenets_resnet_forward_wide", [&] {
    using T = scalar_t;
    T* const st = store ? states.data_ptr<T>() : nullptr;
    const T* const W = K.data_ptr<T>();
    const T* const bias = b.data_ptr<T>();
    T* const o = out.data_ptr<T>();
    for (int64_t j = 0; j < N; ++j) {
      const T* yin = j == 0 ? y.data_ptr<T>() : (store ? slot_ptr(st, j, 0, 2, n) : o);
      T* p = store ? slot_ptr(st, j, 1, 2, n) : pbuf.data_ptr<T>();
      gemm_rm<T>(false, true, B, d, d, T(1), yin, d, W + j * d * d, d, T(0), p, d);  // Y K^T
      FwdStep<T> op{p,
                    store,
                    bias + j * d,
                    yin,
                    (store && j + 1 < N) ? slot_ptr(st, j + 1, 0, 2, n) : o,
                    nullptr,
                    (store && j == 0) ? st : nullptr,
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
  const int64_t N = K.size(0), B = y.size(0), d = y.size(1), n = B * d;
  const bool store = stores(states);
  const Tensor pbuf = store ? Tensor() : at::empty_like(y);
  const Tensor abuf = at::empty_like(y);
  // store: Y_j lives in the states; else two owned buffers, and from j = 2 on
  // Y_{j+1} overwrites Y_{j-1} in place.
  const Tensor X0 = at::empty_like(y), X1 = (store || N > 1) ? at::empty_like(y) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "stablenets_leapfrog_forward_wide", [&] {
    using T = scalar_t;
    T* const st = store ? states.data_ptr<T>() : nullptr;
    const T* const W = K.data_ptr<T>();
    const T* const bias = b.data_ptr<T>();
    T* const X[2] = {X0.data_ptr<T>(), X1.defined() ? X1.data_ptr<T>() : nullptr};
    const T* const y0 = y.data_ptr<T>();
    const T* const ym1 = yprev.data_ptr<T>();
    for (int64_t j = 0; j < N; ++j) {
      const T *cur, *prev;
      T *target, *p;
      if (store) {
        cur = j == 0 ? y0 : slot_ptr(st, j, 0, 2, n);
        prev = j == 0 ? ym1 : (j == 1 ? y0 : slot_ptr(st, j - 1, 0, 2, n));
        target = j + 1 < N ? slot_ptr(st, j + 1, 0, 2, n) : X[0];  // X0 = Y_N, X1 = Y_{N-1}
        p = slot_ptr(st, j, 1, 2, n);
      } else {
        cur = j == 0 ? y0 : X[(j - 1) % 2];
        prev = j == 0 ? ym1 : (j == 1 ? y0 : X[j % 2]);
        target = X[j % 2];
        p = pbuf.data_ptr<T>();
      }
      const T* Wj = W + j * d * d;
      gemm_rm<T>(false, true, B, d, d, T(1), cur, d, Wj, d, T(0), p, d);  // Y_j K^T
      FwdLeap<T> op{p,
                    store,
                    bias + j * d,
                    cur,
                    prev,
                    abuf.data_ptr<T>(),
                    target,
                    (store && j == 0) ? st : nullptr,
                    (store && j == N - 1) ? X[1] : nullptr,
                    act,
                    d};
      launch_elementwise<T>(op, n, d);
      // target = 2 Y_j - Y_{j-1} - h^2 act(P_j) K_j
      gemm_rm<T>(false, false, B, d, d, static_cast<T>(-h * h), abuf.data_ptr<T>(), d, Wj, d, T(1),
                 target, d);
    }
  });
  if (store) return {X0, X1};
  return {N % 2 == 1 ? X0 : X1, N == 1 ? y.clone() : (N % 2 == 1 ? X1 : X0)};
}

inline void verlet_forward(const Tensor& y, const Tensor& z, const Tensor& K, const Tensor& b,
                           double h, Act act, const Tensor& out0, const Tensor& out1,
                           const Tensor& states) {
  const int64_t N = K.size(0), B = y.size(0), d = y.size(1), n = B * d;
  const bool store = stores(states);
  const Tensor pbuf = store ? Tensor() : at::empty_like(y);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "stablenets_verlet_forward_wide", [&] {
    using T = scalar_t;
    const T hh = static_cast<T>(h);
    T* const st = store ? states.data_ptr<T>() : nullptr;
    const T* const W = K.data_ptr<T>();
    const T* const bias = b.data_ptr<T>();
    T* const o0 = out0.data_ptr<T>();
    T* const o1 = out1.data_ptr<T>();
    for (int64_t j = 0; j < N; ++j) {
      const T* Wj = W + j * d * d;
      const T *ycur, *zin;
      T *zout, *p1, *p2, *yout;
      if (store) {
        ycur = j == 0 ? y.data_ptr<T>() : slot_ptr(st, j, 0, 4, n);
        zin = j == 0 ? z.data_ptr<T>() : slot_ptr(st, j - 1, 2, 4, n);
        zout = slot_ptr(st, j, 2, 4, n);
        p1 = slot_ptr(st, j, 1, 4, n);
        p2 = slot_ptr(st, j, 3, 4, n);
        yout = j + 1 < N ? slot_ptr(st, j + 1, 0, 4, n) : o0;
      } else {
        ycur = j == 0 ? y.data_ptr<T>() : o0;
        zin = j == 0 ? z.data_ptr<T>() : o1;
        zout = o1;
        p1 = p2 = pbuf.data_ptr<T>();
        yout = o0;
      }
      gemm_rm<T>(false, false, B, d, d, T(1), ycur, d, Wj, d, T(0), p1, d);  // Y K
      FwdStep<T> zop{p1,      store, bias + j * d, zin, zout, (store && j == N - 1) ? o1 : nullptr,
                     nullptr, -hh,   act,          d};
      launch_elementwise<T>(zop, n, d);
      gemm_rm<T>(false, true, B, d, d, T(1), zout, d, Wj, d, T(0), p2, d);  // Z K^T
      FwdStep<T> yop{
          p2,  store, bias + j * d, ycur, yout, nullptr, (store && j == 0) ? st : nullptr, hh,
          act, d};
      launch_elementwise<T>(yop, n, d);
    }
  });
}

// ----------------------------------------------------------- backward

// Returns (grad_y, dW, db); `antisym` turns dW into (dW - dW^T) / 2.
inline std::tuple<Tensor, Tensor, Tensor> resnet_backward(const Tensor& gout, const Tensor& states,
                                                          const Tensor& K, double h, Act act,
                                                          bool antisym) {
  const int64_t N = K.size(0), B = gout.size(0), d = gout.size(1), n = B * d;
  Tensor g = gout.clone();
  Tensor G = at::empty({N, B, d}, gout.options());
  AT_DISPATCH_FLOATING_TYPES(gout.scalar_type(), "stablenets_resnet_backward_wide", [&] {
    using T = scalar_t;
    const T* const st = states.data_ptr<T>();
    const T* const W = K.data_ptr<T>();
    T* const gp = g.data_ptr<T>();
    for (int64_t j = N - 1; j >= 0; --j) {
      T* Gj = G.data_ptr<T>() + j * n;
      GradScale<T> op{Gj, gp, st + (j * 2 + 1) * n, nullptr, static_cast<T>(h), act, d};
      launch_elementwise<T>(op, n, d);
      gemm_rm<T>(false, false, B, d, d, T(1), Gj, d, W + j * d * d, d, T(1), gp, d);  // g += G K
    }
  });
  Tensor dW = at::bmm(G.transpose(1, 2), states.select(1, 0));  // G_j^T Y_j
  if (antisym) dW = (dW - dW.transpose(1, 2)).mul_(0.5);
  Tensor db = G.sum(1);
  return {g, dW, db};
}

// Returns (grad_y, grad_y_prev, dW, db).
inline std::tuple<Tensor, Tensor, Tensor, Tensor> leapfrog_backward(
    const Tensor& ga, const Tensor& gc, const Tensor& states, const Tensor& K, double h, Act act) {
  const int64_t N = K.size(0), B = ga.size(0), d = ga.size(1), n = B * d;
  // Per layer: lam_j = dL/dY_{j+1}, A_j = -h^2 act(P_j) and G_j, for the batched
  // weight gradients dK_j = A_j^T lam_j + G_j^T Y_j at the end.
  Tensor L = at::empty({N, B, d}, ga.options());
  Tensor A = at::empty_like(L), G = at::empty_like(L);
  Tensor gy = at::empty_like(ga), c = at::empty_like(ga), m = at::empty_like(ga);
  L.select(0, N - 1).copy_(ga);
  AT_DISPATCH_FLOATING_TYPES(ga.scalar_type(), "stablenets_leapfrog_backward_wide", [&] {
    using T = scalar_t;
    const T* const st = states.data_ptr<T>();
    const T* const W = K.data_ptr<T>();
    T* const Lp = L.data_ptr<T>();
    T* const cp = c.data_ptr<T>();
    const T* c_in = gc.data_ptr<T>();
    for (int64_t j = N - 1; j >= 0; --j) {
      const T* Wj = W + j * d * d;
      T* lam = Lp + j * n;
      T* Gj = G.data_ptr<T>() + j * n;
      gemm_rm<T>(false, true, B, d, d, T(1), lam, d, Wj, d, T(0), m.data_ptr<T>(), d);  // lam K^T
      T* anext = j > 0 ? Lp + (j - 1) * n : gy.data_ptr<T>();
      BwdLeap<T> op{m.data_ptr<T>(),
                    st + (j * 2 + 1) * n,
                    nullptr,
                    lam,
                    c_in,
                    Gj,
                    A.data_ptr<T>() + j * n,
                    anext,
                    cp,
                    nullptr,
                    nullptr,
                    static_cast<T>(-h * h),
                    act,
                    d};
      launch_elementwise<T>(op, n, d);
      gemm_rm<T>(false, false, B, d, d, T(1), Gj, d, Wj, d, T(1), anext, d);  // + G K
      c_in = cp;
    }
  });
  Tensor dW = at::bmm(A.transpose(1, 2), L);
  dW.baddbmm_(G.transpose(1, 2), states.select(1, 0));
  Tensor db = G.sum(1);
  return {gy, c, dW, db};
}

inline std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> leapfrog_backward_reversible(
    const Tensor& ga, const Tensor& gc, const Tensor& y, const Tensor& yprev, const Tensor& K,
    const Tensor& b, double h, Act act) {
  const int64_t N = K.size(0), B = ga.size(0), d = ga.size(1), n = B * d;
  Tensor a = ga.clone(), c = gc.clone(), an = at::empty_like(ga);
  Tensor yhi = y.clone(), ylo = yprev.clone();  // (Y_{j+1}, Y_j)
  Tensor p = at::empty_like(ga), m = at::empty_like(ga), g = at::empty_like(ga),
         act_buf = at::empty_like(ga);
  Tensor dW = at::empty({N, d, d}, ga.options()), db = at::empty({N, d}, ga.options());
  AT_DISPATCH_FLOATING_TYPES(ga.scalar_type(), "stablenets_leapfrog_backward_rev_wide", [&] {
    using T = scalar_t;
    const T* const W = K.data_ptr<T>();
    const T mh2 = static_cast<T>(-h * h);
    T* const pp = p.data_ptr<T>();
    T* const mp = m.data_ptr<T>();
    T* const gp = g.data_ptr<T>();
    T* const ap = act_buf.data_ptr<T>();
    T* const cp = c.data_ptr<T>();
    for (int64_t j = N - 1; j >= 0; --j) {
      const T* Wj = W + j * d * d;
      T* const lam = a.data_ptr<T>();
      T* const lo = ylo.data_ptr<T>();
      gemm_rm<T>(false, true, B, d, d, T(1), lo, d, Wj, d, T(0), pp, d);   // Y_j K^T
      gemm_rm<T>(false, true, B, d, d, T(1), lam, d, Wj, d, T(0), mp, d);  // lam K^T
      BwdLeap<T> op{mp,
                    pp,
                    b.data_ptr<T>() + j * d,
                    lam,
                    cp,
                    gp,
                    ap,
                    an.data_ptr<T>(),
                    cp,
                    yhi.data_ptr<T>(),  // down to Y_{-1}: the rebuilt inputs are returned
                    lo,
                    mh2,
                    act,
                    d};
      launch_elementwise<T>(op, n, d);
      gemm_rm<T>(false, false, B, d, d, T(1), gp, d, Wj, d, T(1), an.data_ptr<T>(), d);  // + G K
      T* dWj = dW.data_ptr<T>() + j * d * d;
      gemm_rm<T>(true, false, d, d, B, T(1), ap, d, lam, d, T(0), dWj, d);  // -h^2 act(P)^T lam
      gemm_rm<T>(true, false, d, d, B, T(1), gp, d, lo, d, T(1), dWj, d);   // + G^T Y_j
      Tensor dbj = db.select(0, j);
      at::sum_out(dbj, g, {0});
      // Y_{j-1} = 2 Y_j - Y_{j+1} - h^2 act(P_j) K_j, over the Y_{j+1} buffer
      gemm_rm<T>(false, false, B, d, d, T(1), ap, d, Wj, d, T(1), yhi.data_ptr<T>(), d);
      std::swap(yhi, ylo);
      std::swap(a, an);
    }
  });
  return {a, c, dW, db, yhi, ylo};  // ..., Y_0, Y_{-1}
}

inline std::tuple<Tensor, Tensor, Tensor, Tensor> verlet_backward(
    const Tensor& gy, const Tensor& gz, const Tensor& states, const Tensor& K, double h, Act act) {
  const int64_t N = K.size(0), B = gy.size(0), d = gy.size(1), n = B * d;
  Tensor ly = gy.clone(), lz = gz.clone();
  Tensor G = at::empty({N, 2, B, d}, gy.options());  // [G2_j, G1_j]
  AT_DISPATCH_FLOATING_TYPES(gy.scalar_type(), "stablenets_verlet_backward_wide", [&] {
    using T = scalar_t;
    const T hh = static_cast<T>(h);
    const T* const st = states.data_ptr<T>();
    const T* const W = K.data_ptr<T>();
    T* const lyp = ly.data_ptr<T>();
    T* const lzp = lz.data_ptr<T>();
    for (int64_t j = N - 1; j >= 0; --j) {
      const T* Wj = W + j * d * d;
      T* G2 = G.data_ptr<T>() + (j * 2) * n;
      T* G1 = G2 + n;
      GradScale<T> op2{G2, lyp, st + (j * 4 + 3) * n, nullptr, hh, act, d};
      launch_elementwise<T>(op2, n, d);
      gemm_rm<T>(false, false, B, d, d, T(1), G2, d, Wj, d, T(1), lzp, d);  // lz += G2 K
      GradScale<T> op1{G1, lzp, st + (j * 4 + 1) * n, nullptr, -hh, act, d};
      launch_elementwise<T>(op1, n, d);
      gemm_rm<T>(false, true, B, d, d, T(1), G1, d, Wj, d, T(1), lyp, d);  // ly += G1 K^T
    }
  });
  Tensor dW = at::bmm(G.select(1, 0).transpose(1, 2), states.select(1, 2));  // G2^T Z
  dW.baddbmm_(states.select(1, 0).transpose(1, 2), G.select(1, 1));          // Y^T G1
  Tensor db = G.sum({1, 2});
  return {ly, lz, dW, db};
}

inline std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> verlet_backward_reversible(
    const Tensor& gy, const Tensor& gz, const Tensor& y, const Tensor& z, const Tensor& K,
    const Tensor& b, double h, Act act) {
  const int64_t N = K.size(0), B = gy.size(0), d = gy.size(1), n = B * d;
  Tensor ly = gy.clone(), lz = gz.clone();
  Tensor Y = y.clone(), Z = z.clone(), Zp = at::empty_like(z);
  Tensor p = at::empty_like(gy);
  Tensor G = at::empty({2, B, d}, gy.options());  // [G2, G1]
  Tensor dW = at::empty({N, d, d}, gy.options()), db = at::empty({N, d}, gy.options());
  AT_DISPATCH_FLOATING_TYPES(gy.scalar_type(), "stablenets_verlet_backward_rev_wide", [&] {
    using T = scalar_t;
    const T hh = static_cast<T>(h);
    const T* const W = K.data_ptr<T>();
    T* const pp = p.data_ptr<T>();
    T* const yp = Y.data_ptr<T>();
    T* const lyp = ly.data_ptr<T>();
    T* const lzp = lz.data_ptr<T>();
    T* const G2 = G.data_ptr<T>();
    T* const G1 = G2 + n;
    for (int64_t j = N - 1; j >= 0; --j) {
      const T* Wj = W + j * d * d;
      const T* bj = b.data_ptr<T>() + j * d;
      T* const zc = Z.data_ptr<T>();                                      // Z_{j+1/2}
      gemm_rm<T>(false, true, B, d, d, T(1), zc, d, Wj, d, T(0), pp, d);  // Z K^T (+ b)
      VerletBackY<T> opy{pp, bj, yp, lyp, G2, hh, act, d};
      launch_elementwise<T>(opy, n, d);                                     // Y <- Y_j, G2
      gemm_rm<T>(false, false, B, d, d, T(1), yp, d, Wj, d, T(0), pp, d);   // Y_j K (+ b)
      gemm_rm<T>(false, false, B, d, d, T(1), G2, d, Wj, d, T(1), lzp, d);  // lz += G2 K
      VerletBackZ<T> opz{pp, bj, zc, Zp.data_ptr<T>(), lzp, G1, hh, act, d};
      launch_elementwise<T>(opz, n, d);                                    // Z_{j-1/2}, G1
      gemm_rm<T>(false, true, B, d, d, T(1), G1, d, Wj, d, T(1), lyp, d);  // ly += G1 K^T
      T* dWj = dW.data_ptr<T>() + j * d * d;
      gemm_rm<T>(true, false, d, d, B, T(1), G2, d, zc, d, T(0), dWj, d);  // G2^T Z
      gemm_rm<T>(true, false, d, d, B, T(1), yp, d, G1, d, T(1), dWj, d);  // + Y^T G1
      Tensor dbj = db.select(0, j);
      at::sum_out(dbj, G, {0, 1});
      std::swap(Z, Zp);
    }
  });
  return {ly, lz, dW, db, Y, Z};  // ..., Y_0, Z_{-1/2}
}

}  // namespace wide
}  // namespace cuda_detail
}  // namespace stablenets
