// The fused elementwise passes of the wide regime: everything between two
// cuBLAS GEMMs of a layer (bias, activation, residual / leapfrog / Verlet
// combination, activation gradients) in one memory pass.
//
// Each op is a small struct of pointers whose apply<V>(i) handles elements
// i..i+V-1 of a (B, d) tensor (one row, since d % V == 0 whenever V > 1).
// Ops read everything they need before writing, so an output may be the same
// tensor as an input (in-place updates of the carried state). The launcher
// (launch_elementwise) is CUDA-only; host builds of these ops supply their own.
#pragma once

#include <ATen/ATen.h>
#if defined(__CUDACC__)
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cublas_v2.h>

#include <climits>
#endif

#include <algorithm>
#include <cstdint>

#include "stablenets/activation.h"

namespace stablenets {
namespace cuda_detail {

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <int V, typename T>
__device__ __forceinline__ void vload(const T* p, T (&x)[V]) {
  const Pack<T, V> q = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int u = 0; u < V; ++u) x[u] = q.v[u];
}

template <int V, typename T>
__device__ __forceinline__ void vstore(T* p, const T (&x)[V]) {
  Pack<T, V> q;
#pragma unroll
  for (int u = 0; u < V; ++u) q.v[u] = x[u];
  *reinterpret_cast<Pack<T, V>*>(p) = q;
}

inline bool aligned16(const void* p) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// p <- p + b (kept when store_p);  yout = yin + alpha act(p);  optional copies:
// ysave <- yin (the layer input), yout2 <- yout.
template <typename T>
struct FwdStep {
  T* p;
  bool store_p;
  const T* bias;
  const T* yin;
  T* yout;
  T* yout2;
  T* ysave;
  T alpha;
  Act act;
  int64_t d;

  bool aligned() const {
    return aligned16(p) && aligned16(bias) && aligned16(yin) && aligned16(yout) &&
           aligned16(yout2) && aligned16(ysave);
  }
  template <int V>
  __device__ __forceinline__ void apply(int64_t i) const {
    T pv[V], yv[V], bv[V], out[V];
    vload<V>(p + i, pv);
    vload<V>(yin + i, yv);
    vload<V>(bias + i % d, bv);
#pragma unroll
    for (int u = 0; u < V; ++u) {
      pv[u] += bv[u];
      out[u] = yv[u] + alpha * act_fwd(act, pv[u]);
    }
    if (ysave) vstore<V>(ysave + i, yv);
    if (store_p) vstore<V>(p + i, pv);
    vstore<V>(yout + i, out);
    if (yout2) vstore<V>(yout2 + i, out);
  }
};

// Leapfrog, before the second GEMM: p <- p + b (kept when store_p),
// a = act(p), t = 2y - yprev (then t += -h^2 a K by cuBLAS); ysave1/2 <- y.
template <typename T>
struct FwdLeap {
  T* p;
  bool store_p;
  const T* bias;
  const T* y;
  const T* yprev;
  T* a;
  T* t;
  T* ysave1;
  T* ysave2;
  Act act;
  int64_t d;

  bool aligned() const {
    return aligned16(p) && aligned16(bias) && aligned16(y) && aligned16(yprev) && aligned16(a) &&
           aligned16(t) && aligned16(ysave1) && aligned16(ysave2);
  }
  template <int V>
  __device__ __forceinline__ void apply(int64_t i) const {
    T pv[V], yv[V], ypv[V], bv[V], av[V], tv[V];
    vload<V>(p + i, pv);
    vload<V>(y + i, yv);
    vload<V>(yprev + i, ypv);
    vload<V>(bias + i % d, bv);
#pragma unroll
    for (int u = 0; u < V; ++u) {
      pv[u] += bv[u];
      av[u] = act_fwd(act, pv[u]);
      tv[u] = T(2) * yv[u] - ypv[u];
    }
    if (store_p) vstore<V>(p + i, pv);
    if (ysave1) vstore<V>(ysave1 + i, yv);
    if (ysave2) vstore<V>(ysave2 + i, yv);
    vstore<V>(a + i, av);
    vstore<V>(t + i, tv);
  }
};

// g = alpha * l * act'(p [+ b])
template <typename T>
struct GradScale {
  T* g;
  const T* l;
  const T* p;
  const T* bias;  // null: p already holds the pre-activation
  T alpha;
  Act act;
  int64_t d;

  bool aligned() const { return aligned16(g) && aligned16(l) && aligned16(p) && aligned16(bias); }
  template <int V>
  __device__ __forceinline__ void apply(int64_t i) const {
    T pv[V], lv[V], gv[V];
    vload<V>(p + i, pv);
    vload<V>(l + i, lv);
    if (bias) {
      T bv[V];
      vload<V>(bias + i % d, bv);
#pragma unroll
      for (int u = 0; u < V; ++u) pv[u] += bv[u];
    }
#pragma unroll
    for (int u = 0; u < V; ++u) gv[u] = alpha * lv[u] * act_grad(act, pv[u]);
    vstore<V>(g + i, gv);
  }
};

// Leapfrog backward step, given m = lam K^T and the pre-activation p [- b]:
//   g = -h^2 m act'(p),  a = -h^2 act(p),  anext = c_in + 2 lam,  c_out = -lam,
// and when rebuilding states, yrec <- 2 ylo - yrec (then += a K by cuBLAS).
template <typename T>
struct BwdLeap {
  const T* m;
  const T* p;
  const T* bias;  // null when p already includes it
  const T* lam;
  const T* c_in;
  T* g;
  T* a;
  T* anext;
  T* c_out;
  T* yrec;
  const T* ylo;
  T mh2;
  Act act;
  int64_t d;

  bool aligned() const {
    return aligned16(m) && aligned16(p) && aligned16(bias) && aligned16(lam) && aligned16(c_in) &&
           aligned16(g) && aligned16(a) && aligned16(anext) && aligned16(c_out) &&
           aligned16(yrec) && aligned16(ylo);
  }
  template <int V>
  __device__ __forceinline__ void apply(int64_t i) const {
    T mv[V], pv[V], lv[V], cv[V];
    vload<V>(m + i, mv);
    vload<V>(p + i, pv);
    vload<V>(lam + i, lv);
    vload<V>(c_in + i, cv);
    if (bias) {
      T bv[V];
      vload<V>(bias + i % d, bv);
#pragma unroll
      for (int u = 0; u < V; ++u) pv[u] += bv[u];
    }
    T gv[V], av[V], nv[V], ncv[V];
#pragma unroll
    for (int u = 0; u < V; ++u) {
      const T a = act_fwd(act, pv[u]);
      gv[u] = mh2 * mv[u] * act_grad_pa(act, pv[u], a);
      av[u] = mh2 * a;
      nv[u] = cv[u] + T(2) * lv[u];
      ncv[u] = -lv[u];
    }
    if (yrec) {
      T hv[V], lov[V];
      vload<V>(yrec + i, hv);
      vload<V>(ylo + i, lov);
#pragma unroll
      for (int u = 0; u < V; ++u) hv[u] = T(2) * lov[u] - hv[u];
      vstore<V>(yrec + i, hv);
    }
    vstore<V>(g + i, gv);
    vstore<V>(a + i, av);
    vstore<V>(anext + i, nv);
    if (c_out) vstore<V>(c_out + i, ncv);
  }
};

// Reversible Verlet, first half: p2 = p + b;  y <- y - h act(p2);  g = h ly act'(p2).
template <typename T>
struct VerletBackY {
  const T* p;
  const T* bias;
  T* y;
  const T* ly;
  T* g;
  T h;
  Act act;
  int64_t d;

  bool aligned() const {
    return aligned16(p) && aligned16(bias) && aligned16(y) && aligned16(ly) && aligned16(g);
  }
  template <int V>
  __device__ __forceinline__ void apply(int64_t i) const {
    T pv[V], bv[V], yv[V], lv[V], gv[V];
    vload<V>(p + i, pv);
    vload<V>(bias + i % d, bv);
    vload<V>(y + i, yv);
    vload<V>(ly + i, lv);
#pragma unroll
    for (int u = 0; u < V; ++u) {
      const T pre = pv[u] + bv[u];
      const T a = act_fwd(act, pre);
      yv[u] -= h * a;
      gv[u] = h * lv[u] * act_grad_pa(act, pre, a);
    }
    vstore<V>(y + i, yv);
    vstore<V>(g + i, gv);
  }
};

// Reversible Verlet, second half: p1 = p + b;  zout = zin + h act(p1);  g = -h lz act'(p1).
template <typename T>
struct VerletBackZ {
  const T* p;
  const T* bias;
  const T* zin;
  T* zout;
  const T* lz;
  T* g;
  T h;
  Act act;
  int64_t d;

  bool aligned() const {
    return aligned16(p) && aligned16(bias) && aligned16(zin) && aligned16(zout) && aligned16(lz) &&
           aligned16(g);
  }
  template <int V>
  __device__ __forceinline__ void apply(int64_t i) const {
    T pv[V], bv[V], zv[V], lv[V], gv[V];
    vload<V>(p + i, pv);
    vload<V>(bias + i % d, bv);
    vload<V>(zin + i, zv);
    vload<V>(lz + i, lv);
#pragma unroll
    for (int u = 0; u < V; ++u) {
      const T pre = pv[u] + bv[u];
      const T a = act_fwd(act, pre);
      zv[u] += h * a;
      gv[u] = -h * lv[u] * act_grad_pa(act, pre, a);
    }
    vstore<V>(zout + i, zv);
    vstore<V>(g + i, gv);
  }
};

// Column-major GEMM, BLAS conventions: C = alpha op(A) op(B) + beta C.
template <typename T>
void blas_gemm(char transa, char transb, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
               int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc);

#if defined(__CUDACC__)
#if defined(STABLENETS_WITH_CUBLAS)
// cuBLAS's (s|d)gemm, linked against the very libcublas that libtorch_cuda
// loaded (setup.py finds it in the process and links it by path): the symbol
// binds to that library's version, never to another cuBLAS major version that
// a different package (CuPy, JAX) may have put in the global symbol scope.
inline cublasStatus_t cublas_gemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb,
                                  int m, int n, int k, const float* alpha, const float* a, int lda,
                                  const float* b, int ldb, const float* beta, float* c, int ldc) {
  return cublasSgemm_v2(h, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
inline cublasStatus_t cublas_gemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb,
                                  int m, int n, int k, const double* alpha, const double* a,
                                  int lda, const double* b, int ldb, const double* beta, double* c,
                                  int ldc) {
  return cublasDgemm_v2(h, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
#endif

// Column-major GEMM on the current stream. ATen's handle carries the stream,
// the cuBLAS workspace (CUDA graph capture) and the math mode that
// torch.backends.cuda.matmul.allow_tf32 selects, exactly as at::mm uses them;
// calling cuBLAS directly skips the dispatcher and tensor bookkeeping of a
// per-layer at::mm_out. (ATen's own at::cuda::blas::gemm is not exported from
// libtorch_cuda.so, so it cannot be linked.) Built without cuBLAS, or for
// sizes past int range, at::mm_out / addmm_ on column-major views do the same work.
template <typename T>
void blas_gemm(char transa, char transb, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
               int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
#if defined(STABLENETS_WITH_CUBLAS)
  if (std::max({m, n, k, lda, ldb, ldc}) <= INT_MAX) {
    const auto op = [](char t) { return t == 't' ? CUBLAS_OP_T : CUBLAS_OP_N; };
    const cublasStatus_t status =
        cublas_gemm(at::cuda::getCurrentCUDABlasHandle(), op(transa), op(transb),
                    static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), &alpha, a,
                    static_cast<int>(lda), b, static_cast<int>(ldb), &beta, c,
                    static_cast<int>(ldc));
    TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, "stablenets: cuBLAS gemm failed with status ",
                static_cast<int>(status));
    return;
  }
#endif
  const auto opts = at::TensorOptions()
                        .dtype(c10::CppTypeToScalarType<T>::value)
                        .device(at::kCUDA, c10::cuda::current_device());
  auto cm = [&](const T* p, int64_t rows, int64_t cols, int64_t ld) {
    return at::from_blob(const_cast<T*>(p), {rows, cols}, {1, ld}, opts);
  };
  const at::Tensor A = transa == 't' ? cm(a, k, m, lda).t() : cm(a, m, k, lda);
  const at::Tensor B = transb == 't' ? cm(b, n, k, ldb).t() : cm(b, k, n, ldb);
  at::Tensor C = cm(c, m, n, ldc);
  if (beta == T(0)) {
    at::mm_out(C, A, B);
    if (alpha != T(1)) C.mul_(alpha);
  } else {
    C.addmm_(A, B, beta, alpha);
  }
}

template <int V, class Op>
__global__ void __launch_bounds__(256) k_elementwise(const Op op, int64_t nvec) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v < nvec;
       v += stride)
    op.template apply<V>(v * V);
}

// One pass over n = B * d elements: 16-byte accesses when every pointer and the
// row length allow them.
template <typename T, class Op>
void launch_elementwise(const Op& op, int64_t n, int64_t d) {
  if (n == 0) return;
  constexpr int V = 16 / sizeof(T);
  constexpr int threads = 256;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t max_blocks =
      int64_t{at::cuda::getCurrentDeviceProperties()->multiProcessorCount} * 16;
  if (d % V == 0 && op.aligned()) {
    const int64_t nvec = n / V;
    const int64_t blocks = std::min<int64_t>((nvec + threads - 1) / threads, max_blocks);
    k_elementwise<V, Op><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(op, nvec);
  } else {
    const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, max_blocks);
    k_elementwise<1, Op><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(op, n);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif  // __CUDACC__

}  // namespace cuda_detail
}  // namespace stablenets
