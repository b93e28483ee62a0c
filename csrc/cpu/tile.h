// CPU building blocks shared by the four stacks.
//
// Narrow stacks (d <= kNarrowMax) run tile by tile: kTile rows at a time are
// transposed into feature-major buffers (d x kTile), so every operation is a
// loop over rows that the compiler vectorises, and a tile walks all N layers
// while it sits in L1. Wide stacks call ATen's GEMM per layer and fuse the rest
// into one elementwise pass (see the `ew_*` helpers).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "stablenets/activation.h"
#include "stablenets/checks.h"

namespace stablenets {
namespace cpu_detail {

constexpr int64_t kTile = 64;      // rows per tile: 8 AVX2 float vectors
constexpr int64_t kNarrowMax = 32; // widest stack run by the tile kernels

inline bool narrow(int64_t d) { return d <= kNarrowMax; }

inline int64_t num_tiles(int64_t batch) { return (batch + kTile - 1) / kTile; }

// One chunk of whole tiles per thread (fewer when the batch is small).
inline int64_t num_chunks(int64_t batch) {
  return std::max<int64_t>(1, std::min<int64_t>(num_tiles(batch), at::get_num_threads()));
}

// fn(chunk, row0, rows) for every tile; the tiles of a chunk run in order on one thread.
template <typename F>
inline void for_tiles(int64_t batch, const F& fn) {
  const int64_t tiles = num_tiles(batch), chunks = num_chunks(batch);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t tile = c * tiles / chunks; tile < (c + 1) * tiles / chunks; ++tile) {
        const int64_t row0 = tile * kTile;
        fn(c, row0, std::min<int64_t>(kTile, batch - row0));
      }
  });
}

// Row-major (rows x d) block at src  ->  feature-major d x kTile at dst; tail zeroed.
template <typename T>
inline void load_tile(const T* src, int64_t rows, int64_t d, T* dst) {
  for (int64_t i = 0; i < d; ++i) {
    T* out = dst + i * kTile;
    for (int64_t t = 0; t < rows; ++t) out[t] = src[t * d + i];
    for (int64_t t = rows; t < kTile; ++t) out[t] = T(0);
  }
}

template <typename T>
inline void store_tile(const T* src, int64_t rows, int64_t d, T* dst) {
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t i = 0; i < d; ++i) dst[t * d + i] = src[i * kTile + t];
}

// Stored states of narrow stacks keep the tile layout: the block of a tile
// starting at row0 holds its rows feature-major ([i * rows + t]), so saving and
// reloading a layer's state are contiguous copies, not transposes. Only the
// matching backward kernel reads them.
template <typename T>
inline void save_state(const T* tile, int64_t rows, int64_t d, T* dst) {
  for (int64_t i = 0; i < d; ++i) std::copy(tile + i * kTile, tile + i * kTile + rows, dst + i * rows);
}

template <typename T>
inline void load_state(const T* src, int64_t rows, int64_t d, T* tile) {
  for (int64_t i = 0; i < d; ++i) {
    std::copy(src + i * rows, src + (i + 1) * rows, tile + i * kTile);
    std::fill(tile + i * kTile + rows, tile + (i + 1) * kTile, T(0));
  }
}

// out[i][:] = (accumulate ? out[i][:] : 0) + (bias[i] + alpha * sum_k M(i,k) in[k][:])
// with M(i,k) = K[i][k], or K[k][i] when Trans. Row-major K (d x d).
// The product is summed on its own and added to out once: accumulating the d
// small terms straight into a large out (leapfrog's 2Y - Y_prev, a backward's
// running adjoint) rounds each of them at out's magnitude, which cost narrow
// leapfrog 2-5x plain PyTorch's float32 error (and 5x at depth 4096).
template <typename T, bool Trans>
inline void tile_gemm(const T* K, int64_t d, const T* bias, const T* in, T* out, T alpha,
                      bool accumulate) {
  for (int64_t i = 0; i < d; ++i) {
    T acc[kTile];
    T* o = out + i * kTile;
    const T b0 = bias ? bias[i] : T(0);
#pragma omp simd
    for (int64_t t = 0; t < kTile; ++t) acc[t] = b0;
    for (int64_t k = 0; k < d; ++k) {
      const T m = alpha * (Trans ? K[k * d + i] : K[i * d + k]);
      const T* x = in + k * kTile;
#pragma omp simd
      for (int64_t t = 0; t < kTile; ++t) acc[t] += m * x[t];
    }
    if (accumulate) {
#pragma omp simd
      for (int64_t t = 0; t < kTile; ++t) o[t] += acc[t];
    } else {
#pragma omp simd
      for (int64_t t = 0; t < kTile; ++t) o[t] = acc[t];
    }
  }
}

// dW[i][k] += alpha * sum_{t<rows} a[i][t] * b[k][t]   (a, b feature-major tiles)
template <typename T>
inline void tile_outer(const T* a, const T* b, int64_t d, int64_t rows, T alpha, T* dW) {
  for (int64_t i = 0; i < d; ++i) {
    const T* ai = a + i * kTile;
    for (int64_t k = 0; k < d; ++k) {
      const T* bk = b + k * kTile;
      T s = T(0);
#pragma omp simd reduction(+ : s)
      for (int64_t t = 0; t < rows; ++t) s += ai[t] * bk[t];
      dW[i * d + k] += alpha * s;
    }
  }
}

// db[i] += sum_{t<rows} g[i][t]
template <typename T>
inline void tile_rowsum(const T* g, int64_t d, int64_t rows, T* db) {
  for (int64_t i = 0; i < d; ++i) {
    const T* gi = g + i * kTile;
    T s = T(0);
#pragma omp simd reduction(+ : s)
    for (int64_t t = 0; t < rows; ++t) s += gi[t];
    db[i] += s;
  }
}

// Per-chunk partial gradients of weight and bias, summed at the end.
template <typename T>
struct Partials {
  at::Tensor w, b;  // (chunks, N, d, d), (chunks, N, d)
  Partials(int64_t chunks, int64_t n, int64_t d, const at::TensorOptions& opt)
      : w(at::zeros({chunks, n, d, d}, opt)), b(at::zeros({chunks, n, d}, opt)) {}
  T* dw(int64_t chunk, int64_t layer, int64_t d) {
    return w.data_ptr<T>() + (chunk * w.size(1) + layer) * d * d;
  }
  T* db(int64_t chunk, int64_t layer, int64_t d) {
    return b.data_ptr<T>() + (chunk * b.size(1) + layer) * d;
  }
  std::tuple<at::Tensor, at::Tensor> sum(int64_t chunks) {
    return {w.narrow(0, 0, chunks).sum(0), b.narrow(0, 0, chunks).sum(0)};
  }
};

// out_j = (M_j - M_j^T - gamma I) / 2 for every layer, in cache-sized blocks: a
// plain ATen transpose-and-subtract reads M_j^T with a stride of d and cost a
// wide stack's forward twice its GEMM time. The backward maps dL/dA to dL/dK
// with the same function (gamma = 0).
template <typename T>
void antisymmetrize(const T* M, int64_t N, int64_t d, T gamma, T* out) {
  constexpr int64_t kBlock = 32;
  const int64_t nb = (d + kBlock - 1) / kBlock;
  at::parallel_for(0, N * nb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t j = task / nb, i0 = (task % nb) * kBlock, i1 = std::min(d, i0 + kBlock);
      const T* Mj = M + j * d * d;
      T* Oj = out + j * d * d;
      for (int64_t k0 = 0; k0 < d; k0 += kBlock) {
        const int64_t k1 = std::min(d, k0 + kBlock);
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t k = k0; k < k1; ++k)
            Oj[i * d + k] = T(0.5) * (Mj[i * d + k] - Mj[k * d + i]);
      }
      for (int64_t i = i0; i < i1; ++i) Oj[i * d + i] -= T(0.5) * gamma;
    }
  });
}

// ----------------------------------------------------------------- wide path

// Parallel elementwise loop over n elements; fn(begin, end) gets a contiguous range.
template <typename F>
inline void ew(int64_t n, const F& fn) {
  at::parallel_for(0, n, 16384, fn);
}

// Layer j's (B, d) slot s of a states tensor (N, S, B, d).
inline at::Tensor slot(const at::Tensor& states, int64_t j, int64_t s) {
  return states.select(0, j).select(0, s);
}

inline at::Tensor empty_states(const at::Tensor& y, int64_t layers, int64_t slots) {
  return at::empty({layers, slots, y.size(0), y.size(1)}, y.options());
}

}  // namespace cpu_detail
}  // namespace stablenets
