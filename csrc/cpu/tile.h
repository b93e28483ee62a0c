// CPU building blocks shared by the four stacks.
//
// Narrow stacks (d <= kNarrowMax) run tile by tile: kTile rows at a time are
// transposed into feature-major buffers (d x kTile), so every operation is a
// loop over rows that the compiler vectorises, and a tile walks all N layers
// while it sits in L1. Wide stacks call ATen's GEMM per layer and fuse the rest
// into one elementwise pass (see the `ew_*` helpers).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <bit>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "block_cache.h"
#include "stablenets/activation.h"
#include "stablenets/checks.h"
#include "stablenets/kernels.h"
#include "stablenets/reduced_precision.h"

namespace stablenets {
namespace cpu_detail {

constexpr int64_t kTile = 64;      // rows per tile: 8 AVX2 float vectors
constexpr int64_t kNarrowMax = 32; // widest stack run by the tile kernels

inline bool narrow(int64_t d) { return d <= kNarrowMax; }

// x rounded to T. For float -> bfloat16, c10's conversion (the same round to
// nearest even) does not vectorise, for its NaN branch: it cost each elementwise
// pass of a wide bf16 stack 7x (0.8 ms against 0.11 ms at (256, 784)).
template <typename T, typename F>
inline T round_to(F x) {
  if constexpr (std::is_same_v<T, at::BFloat16> && std::is_same_v<F, float>) {
    uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return T(static_cast<uint16_t>(x != x ? 0x7fc0u : r), T::from_bits());
  } else {
    return static_cast<T>(x);
  }
}

// float -> bfloat16 over a run with AVX-512 BF16 (vcvtneps2bf16: 16 values per
// instruction, round to nearest even like round_to), for CPUs that have it. The
// instruction treats denormal inputs as zero and keeps a NaN's sign and payload,
// where round_to (c10's conversion) rounds denormals and writes 0x7fc0 for every
// NaN: a vector holding either (fpclass) takes round_to lane by lane, so the
// result is round_to's, bit for bit (csrc/tests: check_bf16_conversion).
// Compiled through a target attribute in every build, so the ctest can check it
// whatever its flags; the avx512 kernels call it (convert_run) only where
// cpu_has_avx512bf16() says so at run time, so the avx512 build still runs on
// AVX-512 CPUs without BF16.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define STABLENETS_HAVE_AVX512BF16_RUN 1
inline bool cpu_has_avx512bf16() {
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
}

__attribute__((target("avx512bf16,avx512f,avx512vl,avx512bw,avx512dq"))) inline void
round_run_avx512bf16(const float* src, c10::BFloat16* dst, int64_t n) {
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    const __m512 v = _mm512_loadu_ps(src + k);
    // 0x01 quiet NaN, 0x80 signalling NaN, 0x20 denormal
    if (_mm512_fpclass_ps_mask(v, 0xA1)) {
      for (int64_t l = k; l < k + 16; ++l) dst[l] = round_to<c10::BFloat16>(src[l]);
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k),
                          (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
  for (; k < n; ++k) dst[k] = round_to<c10::BFloat16>(src[k]);
}
#endif

// A stored value read as the tile type T: bfloat16 widened on its bits (vector
// code inside the loops that read stored states in place), else static_cast.
template <typename T, typename S>
inline T widen(S x) {
  if constexpr (std::is_same_v<S, c10::BFloat16> && std::is_same_v<T, float>) {
    return std::bit_cast<float>(static_cast<uint32_t>(x.x) << 16);
  } else {
    return static_cast<T>(x);
  }
}

// Whether a narrow backward reads a full tile's stored states in place, as S,
// converting them where they are used: the tile type itself, and bfloat16 (over
// float tiles, converting a layer's states into tile buffers first was an extra
// store and load of every value and cost the (1024, 4, 64) bf16 backward a
// fifth of its time). float16 states are converted into buffers (state_tile).
template <typename S, typename T>
constexpr bool kStatesInPlace =
    std::is_same_v<S, T> || (std::is_same_v<S, c10::BFloat16> && std::is_same_v<T, float>);

inline int64_t num_tiles(int64_t batch) { return (batch + kTile - 1) / kTile; }

// Least work (multiply-adds) worth a thread of its own: about 25-50 us. Below it an
// OpenMP region costs more than it saves, and on a busy machine much more (a
// thread descheduled at the barrier stalls the others: a small training job ran
// 0.9 s/epoch on 2 threads under load against 0.005 s on one).
constexpr int64_t kMinChunkMacs = int64_t{1} << 19;

// One chunk of whole tiles per thread: fewer when the batch is small or when a
// chunk would get less than kMinChunkMacs of work (row_macs: work per row).
inline int64_t num_chunks(int64_t batch, int64_t row_macs) {
  const int64_t by_work = std::max<int64_t>(1, batch * row_macs / kMinChunkMacs);
  return std::max<int64_t>(
      1, std::min<int64_t>({num_tiles(batch), int64_t{at::get_num_threads()}, by_work}));
}

// fn(chunk, row0, rows) for every tile; the tiles of a chunk run in order on one thread.
template <typename F>
inline void for_tiles(int64_t batch, int64_t row_macs, const F& fn) {
  const int64_t tiles = num_tiles(batch), chunks = num_chunks(batch, row_macs);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t tile = c * tiles / chunks; tile < (c + 1) * tiles / chunks; ++tile) {
        const int64_t row0 = tile * kTile;
        fn(c, row0, std::min<int64_t>(kTile, batch - row0));
      }
  });
}

// Row-major (rows x d) block at src  ->  feature-major d x kTile at dst; tail zeroed.
// The tile (T) may be wider than the memory (S: bfloat16/float16 storage, float
// tiles); these and the state helpers below convert on the way.
template <typename S, typename T>
inline void load_tile(const S* src, int64_t rows, int64_t d, T* dst) {
  for (int64_t i = 0; i < d; ++i) {
    T* out = dst + i * kTile;
    for (int64_t t = 0; t < rows; ++t) out[t] = static_cast<T>(src[t * d + i]);
    for (int64_t t = rows; t < kTile; ++t) out[t] = T(0);
  }
}

template <typename T, typename S>
inline void store_tile(const T* src, int64_t rows, int64_t d, S* dst) {
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t i = 0; i < d; ++i) dst[t * d + i] = round_to<S>(src[i * kTile + t]);
}

// Contiguous runs between the tile type and the storage type: round_to (float ->
// bfloat16, vectorised), the bfloat16 -> float widening on the bits, else
// static_cast. Element by element through c10's conversion, a bfloat16 narrow
// stack cost 2-3x the instructions of the float32 one.
template <typename T, typename S>
inline void convert_run(const T* src, S* dst, int64_t n) {
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<S, float>) {
    const uint16_t* in = reinterpret_cast<const uint16_t*>(src);
    uint32_t* out = reinterpret_cast<uint32_t*>(dst);
    for (int64_t k = 0; k < n; ++k) out[k] = static_cast<uint32_t>(in[k]) << 16;
  } else {
#if defined(__AVX512F__) && defined(STABLENETS_HAVE_AVX512BF16_RUN)
    if constexpr (std::is_same_v<T, float> && std::is_same_v<S, c10::BFloat16>) {
      if (cpu_has_avx512bf16()) return round_run_avx512bf16(src, dst, n);
    }
#endif
    for (int64_t k = 0; k < n; ++k) dst[k] = round_to<S>(src[k]);
  }
}

// Stored states of narrow stacks keep the tile layout: the block of a tile
// starting at row0 holds its rows feature-major ([i * rows + t]), so saving and
// reloading a layer's state are contiguous copies, not transposes. Only the
// matching backward kernel reads them.
template <typename T, typename S>
inline void save_state(const T* tile, int64_t rows, int64_t d, S* dst) {
  if constexpr (std::is_same_v<S, T>) {
    for (int64_t i = 0; i < d; ++i) std::copy(tile + i * kTile, tile + i * kTile + rows, dst + i * rows);
  } else if (rows == kTile) {  // the same layout: one run
    convert_run(tile, dst, d * kTile);
  } else {
    for (int64_t i = 0; i < d; ++i) convert_run(tile + i * kTile, dst + i * rows, rows);
  }
}

template <typename S, typename T>
inline void load_state(const S* src, int64_t rows, int64_t d, T* tile) {
  for (int64_t i = 0; i < d; ++i) {
    if constexpr (std::is_same_v<S, T>) {
      std::copy(src + i * rows, src + (i + 1) * rows, tile + i * kTile);
    } else {
      convert_run(src + i * rows, tile + i * kTile, rows);
    }
    std::fill(tile + i * kTile + rows, tile + (i + 1) * kTile, T(0));
  }
}

// A stored state block as a tile, for reading: the block itself when the tile
// is full (the layouts are the same, [i * kTile + t]), else a zero-padded copy
// in buf. The stored backwards read their states in place this way (copying
// them into tile buffers took a third of the narrow ResNet backward).
template <typename S, typename T>
inline const T* state_tile(const S* src, int64_t rows, int64_t d, T* buf) {
  if constexpr (std::is_same_v<S, T>) {
    if (rows == kTile) return src;
  }
  load_state(src, rows, d, buf);
  return buf;
}

// out[i][:] = (accumulate ? out[i][:] : 0) + (bias[i] + alpha * sum_k M(i,k) in[k][:])
// with M(i,k) = K[i][k], or K[k][i] when Trans. Row-major K (d x d).
// The product is summed on its own and added to out once: accumulating the d
// small terms straight into a large out (leapfrog's 2Y - Y_prev, a backward's
// running adjoint) rounds each of them at out's magnitude, which cost narrow
// leapfrog 2-5x plain PyTorch's float32 error (and 5x at depth 4096).
//
// Register blocks: kGemmRows outputs at once, over kGemmCols(T) tile columns at a
// time, so each input vector loaded feeds kGemmRows multiply-adds (one output
// row at a time was bound by the loads). The sum over k runs in the same order
// either way, so the blocks change no bit of the result.
#if defined(__AVX512F__)
constexpr int64_t kAccBytes = 1024;  // 16 of the 32 zmm registers
#elif defined(__AVX2__)
constexpr int64_t kAccBytes = 256;  // 8 of the 16 ymm registers
#else
constexpr int64_t kAccBytes = 128;  // 8 of the 16 xmm registers
#endif
constexpr int64_t kGemmRows = 4;
template <typename T>
constexpr int64_t kGemmCols = std::min<int64_t>(kTile, kAccBytes / int64_t(sizeof(T)) / kGemmRows);

template <typename T, bool Trans, int64_t IB>
inline void gemm_block(const T* K, int64_t d, int64_t i0, const T* bias, const T* in, T* out,
                       T alpha, bool accumulate) {
  constexpr int64_t TW = kGemmCols<T>;
  for (int64_t t0 = 0; t0 < kTile; t0 += TW) {
    T acc[IB][TW];
    for (int64_t ii = 0; ii < IB; ++ii) {
      const T b0 = bias ? bias[i0 + ii] : T(0);
#pragma omp simd
      for (int64_t t = 0; t < TW; ++t) acc[ii][t] = b0;
    }
    for (int64_t k = 0; k < d; ++k) {
      const T* x = in + k * kTile + t0;
      for (int64_t ii = 0; ii < IB; ++ii) {
        const T m = alpha * (Trans ? K[k * d + i0 + ii] : K[(i0 + ii) * d + k]);
#pragma omp simd
        for (int64_t t = 0; t < TW; ++t) acc[ii][t] += m * x[t];
      }
    }
    for (int64_t ii = 0; ii < IB; ++ii) {
      T* o = out + (i0 + ii) * kTile + t0;
      if (accumulate) {
#pragma omp simd
        for (int64_t t = 0; t < TW; ++t) o[t] += acc[ii][t];
      } else {
#pragma omp simd
        for (int64_t t = 0; t < TW; ++t) o[t] = acc[ii][t];
      }
    }
  }
}

template <typename T, bool Trans>
inline void tile_gemm(const T* K, int64_t d, const T* bias, const T* in, T* out, T alpha,
                      bool accumulate) {
  int64_t i0 = 0;
  for (; i0 + kGemmRows <= d; i0 += kGemmRows)
    gemm_block<T, Trans, kGemmRows>(K, d, i0, bias, in, out, alpha, accumulate);
  for (; i0 < d; ++i0) gemm_block<T, Trans, 1>(K, d, i0, bias, in, out, alpha, accumulate);
}

// Weight- and bias-gradient partial sums keep kLanes running sums per entry,
// added up once at the end (Partials::sum). Reducing every 64-row dot product to
// one number per tile (a horizontal add, then a scalar read-modify-write) took
// half the narrow backward's time (benchmarks/narrow_phases.cpp).
constexpr int64_t kLanes = 8;

// dst[l] += alpha * sum_{t < rows, t = l mod kLanes} x[t] y[t]
template <typename T>
inline void lane_dot(const T* x, const T* y, int64_t rows, T alpha, T* dst) {
  if (rows == kTile) {
    T acc[2 * kLanes] = {};
    for (int64_t t0 = 0; t0 < kTile; t0 += 2 * kLanes) {
#pragma omp simd
      for (int64_t l = 0; l < 2 * kLanes; ++l) acc[l] += x[t0 + l] * y[t0 + l];
    }
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) dst[l] += alpha * (acc[l] + acc[l + kLanes]);
  } else {  // a chunk's last, partial tile
    for (int64_t t = 0; t < rows; ++t) dst[t % kLanes] += alpha * x[t] * y[t];
  }
}

// An IB x KB block of tile_outer on full tiles: IB * KB running sums kept in
// registers while the t loop streams IB + KB feature rows, so each loaded
// vector feeds several multiply-adds.
template <typename T, int IB, int KB>
inline void outer_block(const T* a, const T* b, int64_t d, T alpha, T* dW) {
  constexpr int64_t W = 2 * kLanes;
  T acc[IB][KB][W] = {};
  for (int64_t t0 = 0; t0 < kTile; t0 += W)
    for (int ii = 0; ii < IB; ++ii)
      for (int kk = 0; kk < KB; ++kk) {
        const T* x = a + ii * kTile + t0;
        const T* y = b + kk * kTile + t0;
#pragma omp simd
        for (int64_t l = 0; l < W; ++l) acc[ii][kk][l] += x[l] * y[l];
      }
  for (int ii = 0; ii < IB; ++ii)
    for (int kk = 0; kk < KB; ++kk) {
      T* dst = dW + (ii * d + kk) * kLanes;
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) dst[l] += alpha * (acc[ii][kk][l] + acc[ii][kk][l + kLanes]);
    }
}

// Register blocks per instruction set: 8 accumulators of 2 * kLanes values.
#if defined(__AVX512F__)
constexpr int kOuterIB = 4, kOuterKB = 4;
#elif defined(__AVX2__)
constexpr int kOuterIB = 2, kOuterKB = 2;
#else
constexpr int kOuterIB = 1, kOuterKB = 2;
#endif

// dW[i][k][:] += alpha * lanes of sum_{t<rows} a[i][t] * b[k][t]   (a, b feature-major tiles)
template <typename T>
inline void tile_outer_t(const T* a, const T* b, int64_t d, int64_t rows, T alpha, T* dW) {
  int64_t i0 = 0;
  if (rows == kTile) {
    for (; i0 + kOuterIB <= d; i0 += kOuterIB) {
      int64_t k0 = 0;
      for (; k0 + kOuterKB <= d; k0 += kOuterKB)
        outer_block<T, kOuterIB, kOuterKB>(a + i0 * kTile, b + k0 * kTile, d, alpha,
                                           dW + (i0 * d + k0) * kLanes);
      for (; k0 < d; ++k0)
        outer_block<T, kOuterIB, 1>(a + i0 * kTile, b + k0 * kTile, d, alpha,
                                    dW + (i0 * d + k0) * kLanes);
    }
  }
  for (int64_t i = i0; i < d; ++i)
    for (int64_t k = 0; k < d; ++k)
      lane_dot(a + i * kTile, b + k * kTile, rows, alpha, dW + (i * d + k) * kLanes);
}

// The same where a or b may be a full tile of stored states read in place
// (kStatesInPlace): widened into a tile first (outer_block over values widened
// as they are loaded kept its sums in memory, not registers, and ran 2x slower).
template <typename T, typename TA, typename TB>
inline void tile_outer(const TA* a, const TB* b, int64_t d, int64_t rows, T alpha, T* dW) {
  if constexpr (std::is_same_v<TA, T> && std::is_same_v<TB, T>) {
    tile_outer_t(a, b, d, rows, alpha, dW);
  } else {
    alignas(64) T buf[kNarrowMax * kTile];
    if constexpr (!std::is_same_v<TA, T>) {
      convert_run(a, buf, d * kTile);
      tile_outer(static_cast<const T*>(buf), b, d, rows, alpha, dW);
    } else {
      convert_run(b, buf, d * kTile);
      tile_outer(a, static_cast<const T*>(buf), d, rows, alpha, dW);
    }
  }
}

// db[i][:] += lanes of sum_{t<rows} g[i][t]
template <typename T>
inline void tile_rowsum(const T* g, int64_t d, int64_t rows, T* db) {
  for (int64_t i = 0; i < d; ++i) {
    const T* gi = g + i * kTile;
    T* dst = db + i * kLanes;
    if (rows == kTile) {
      T acc[2 * kLanes] = {};
      for (int64_t t0 = 0; t0 < kTile; t0 += 2 * kLanes) {
#pragma omp simd
        for (int64_t l = 0; l < 2 * kLanes; ++l) acc[l] += gi[t0 + l];
      }
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) dst[l] += acc[l] + acc[l + kLanes];
    } else {
      for (int64_t t = 0; t < rows; ++t) dst[t % kLanes] += gi[t];
    }
  }
}

// A narrow stack's weights or biases (at most N x 32 x 32 values) as float32, by a
// plain loop into a vector: an ATen cast is a dispatched call with an allocation,
// a few microseconds each, and a (1024, 4, 64) bfloat16 training step made five
// of them (forward and backward) on top of autocast's own casts.
inline std::vector<float> small_float(const at::Tensor& t_in) {
  const at::Tensor t = t_in.contiguous();
  std::vector<float> out(t.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "small_float", [&] {
    const scalar_t* p = t.data_ptr<scalar_t>();
    for (size_t k = 0; k < out.size(); ++k) out[k] = static_cast<float>(p[k]);
  });
  return out;
}

// Per-chunk partial gradients of weight and bias, kLanes running sums per
// entry, summed at the end.
template <typename T>
struct Partials {
  at::Tensor w, b;  // (chunks, N, d, d, kLanes), (chunks, N, d, kLanes)
  Partials(int64_t chunks, int64_t n, int64_t d, const at::TensorOptions& opt)
      : w(empty_cached({chunks, n, d, d, kLanes}, opt).zero_()),
        b(empty_cached({chunks, n, d, kLanes}, opt).zero_()) {}
  T* dw(int64_t chunk, int64_t layer, int64_t d) {
    return w.data_ptr<T>() + (chunk * w.size(1) + layer) * d * d * kLanes;
  }
  T* db(int64_t chunk, int64_t layer, int64_t d) {
    return b.data_ptr<T>() + (chunk * b.size(1) + layer) * d * kLanes;
  }
  // One pass over the running sums (a strided ATen reduction over the chunk and
  // lane dimensions cost a (1024, 4, 64) backward a quarter of its time).
  // In dtype out (default T): a reduced-precision call's gradients rounded once,
  // here, rather than through a float32 tensor and an ATen cast.
  std::tuple<at::Tensor, at::Tensor> sum(int64_t chunks) { return sum(chunks, w.scalar_type()); }
  std::tuple<at::Tensor, at::Tensor> sum(int64_t chunks, at::ScalarType out) {
    const int64_t n = w.size(1), d = w.size(2);
    return {reduce(w, chunks, {n, d, d}, out), reduce(b, chunks, {n, d}, out)};
  }

 private:
  static at::Tensor reduce(const at::Tensor& part, int64_t chunks, at::IntArrayRef shape,
                           at::ScalarType out_type) {
    at::Tensor out = empty_cached(shape, part.options().dtype(out_type));
    const int64_t entries = out.numel(), stride = entries * kLanes;
    const T* src = part.data_ptr<T>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out_type, "partials_sum", [&] {
      scalar_t* dst = out.data_ptr<scalar_t>();
      at::parallel_for(0, entries, 4096, [&](int64_t e0, int64_t e1) {
        for (int64_t e = e0; e < e1; ++e) {
          T s = T(0);
          for (int64_t c = 0; c < chunks; ++c)
            for (int64_t l = 0; l < kLanes; ++l) s += src[c * stride + e * kLanes + l];
          dst[e] = round_to<scalar_t>(s);
        }
      });
    });
    return out;
  }
};

// out_j = (M_j - M_j^T - gamma I) / 2 for every layer, in cache-sized blocks: a
// plain ATen transpose-and-subtract reads M_j^T with a stride of d and cost a
// wide stack's forward twice its GEMM time. The backward maps dL/dA to dL/dK
// with the same function (gamma = 0). bfloat16/float16 compute in float (their
// operators round every step and do not vectorise: 3x slower).
template <typename T>
void antisymmetrize(const T* M, int64_t N, int64_t d, T gamma, T* out) {
  using C = at::opmath_type<T>;
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
            Oj[i * d + k] = round_to<T>(C(0.5) * (C(Mj[i * d + k]) - C(Mj[k * d + i])));
      }
      for (int64_t i = i0; i < i1; ++i)
        Oj[i * d + i] = round_to<T>(C(Oj[i * d + i]) - C(0.5) * C(gamma));
    }
  });
}

// The same transform of one d x d matrix, in place: each pair of blocks (I, K),
// (K, I) is read once and both rewritten from it. A wide stack copies K_j (not
// in cache: a streaming copy) into its buffer and transforms it there.
template <typename T>
void antisymmetrize_inplace(T* M, int64_t d, T gamma) {
  using C = at::opmath_type<T>;
  constexpr int64_t kBlock = 32;
  const int64_t nb = (d + kBlock - 1) / kBlock;
  at::parallel_for(0, nb * (nb + 1) / 2, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      int64_t ib = 0, rest = p;  // pair p -> block row ib, block column kb >= ib
      while (rest >= nb - ib) rest -= nb - ib++;
      const int64_t kb = ib + rest;
      const int64_t i0 = ib * kBlock, i1 = std::min(d, i0 + kBlock);
      const int64_t k0 = kb * kBlock, k1 = std::min(d, k0 + kBlock);
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t k = (ib == kb ? i + 1 : k0); k < k1; ++k) {
          const C v = C(0.5) * (C(M[i * d + k]) - C(M[k * d + i]));
          M[i * d + k] = round_to<T>(v);
          M[k * d + i] = round_to<T>(-v);
        }
      if (ib == kb)
        for (int64_t i = i0; i < i1; ++i) M[i * d + i] = round_to<T>(-C(0.5) * C(gamma));
    }
  });
}

// ----------------------------------------------------------------- wide path

// Parallel elementwise loop over n elements; fn(begin, end) gets a contiguous range.
template <typename F>
inline void ew(int64_t n, const F& fn) {
  at::parallel_for(0, n, 16384, fn);
}

// fn(r0, r1) over blocks of whole rows of a (rows, d) matrix, in parallel, each
// block big enough to be worth a thread (the grain of `ew`).
template <typename F>
inline void ew_rows(int64_t rows, int64_t d, const F& fn) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)), fn);
}

// dst = src + alpha * act(p + bias), and p <- what a state keeps of it:
// act(p + bias), or p + bias itself for kStoresPre activations. dst may be src;
// bias (one row of d) may be null. Wide forwards leave the bias out of the
// matrix product (a plain mm, not an addmm that first writes the broadcast
// bias into p) and write each layer's new state straight into its slot, rather
// than updating a running tensor in place and copying it there.
template <typename T, Act A>
void act_step(const at::Tensor& dst, const at::Tensor& src, const at::Tensor& p, T alpha,
              const T* bias) {
  const int64_t d = p.size(1);
  T* o = dst.data_ptr<T>();
  const T* x = src.data_ptr<T>();
  T* pp = p.data_ptr<T>();
  ew_rows(p.size(0), d, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* pr = pp + r * d;
      const T* xr = x + r * d;
      T* orow = o + r * d;
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) {
        const T v = bias ? pr[c] + bias[c] : pr[c];
        const T a = act_f<A, T>(v);
        pr[c] = kStoresPre<A> ? v : a;
        orow[c] = xr[c] + alpha * a;
      }
    }
  });
}

// ------------------------------------------- wide path, bfloat16 storage
//
// Wide stacks in bfloat16 run their GEMMs in bfloat16 (ATen -> oneDNN, float32
// accumulation, AVX-512 BF16 / AMX where the CPU has them) and everything else in
// float32: the state carried from layer to layer (and the adjoint carried back)
// stays float32 across the whole stack, and bfloat16 copies of it feed the GEMMs
// and the stored states. float16 is not served this way: this CPU has no float16
// GEMM (ATen's runs 3-20x slower than float32), so a float16 call takes
// reduced_precision.h's float32 copies instead.
//
// Small GEMMs are not served this way either: oneDNN's bfloat16 GEMM has a fixed cost
// of about 17 us a call, so below about 1-2 M multiply-adds (B d^2) per thread it is
// slower than float32's (1 thread: 64 x 64 x 64 18 us in bf16 against 8 us in float32,
// 128 x 128 x 128 34 against 45 us; 2 threads: par at 2 M, 1.3x at 4 M), and a bf16
// digits net (Verlet, 64 x 64, 8 layers, batch 64) trained 1.8x slower than in float32.
// Below bf16_gemm_min_work() a bfloat16 wide stack runs on float32 copies.
// STABLENETS_BF16_GEMM_MIN (multiply-adds, 0 or more) overrides the line; the tests set
// it to 0 to run the bf16 GEMM kernels at small sizes.
inline int64_t bf16_gemm_min_work() {
  if (const char* v = std::getenv("STABLENETS_BF16_GEMM_MIN")) {
    char* end = nullptr;
    const long long n = std::strtoll(v, &end, 10);
    TORCH_CHECK_VALUE(end != v && *end == '\0' && n >= 0,
                      "STABLENETS_BF16_GEMM_MIN: expected a whole number >= 0 of "
                      "multiply-adds, got '", v, "'");
    return static_cast<int64_t>(n);
  }
  return (int64_t{1} << 20) * (at::get_num_threads() + 1);
}

// A wide bfloat16 stack's call (the kernels below serve it whatever its size).
inline bool wide_bf16(const at::Tensor& first) {
  return first.scalar_type() == at::kBFloat16 && first.dim() == 2 && !narrow(first.size(1));
}
// ... and one large enough that they should (above).
inline bool wide_reduced_native(const at::Tensor& first) {
  return wide_bf16(first) &&
         first.size(0) * first.size(1) * first.size(1) >= bf16_gemm_min_work();
}

// Whether a stack's kernel serves a reduced-dtype call itself: narrow stacks
// always (float32 tiles over bf16/fp16 memory: the tile kernels' storage type
// S), wide ones in bfloat16 where their GEMMs are large enough (above). A malformed
// first argument goes straight to the kernel's checks.
inline bool reduced_native(const at::Tensor& first) {
  return first.dim() != 2 || narrow(first.size(1)) || wide_reduced_native(first);
}

// ------------------------------------------- float32 parameters of a reduced stack
//
// torch.autocast on the CPU hands a stack its float32 weight and bias uncast
// (csrc/autocast.cpp) with y in bfloat16/float16, and checks.h takes that mix on
// the CPU. The parameters' gradients are returned in float32:
// - narrow stacks read the parameters as float32 anyway (small_float), and their
//   gradients are summed in float32 (Partials) and rounded nowhere;
// - wide bfloat16 stacks take bfloat16 copies for their GEMMs (params_as) and widen
//   the layer gradients they produce;
// - wide calls no kernel serves (reduced_native: float16, and bfloat16 below
//   bf16_gemm_min_work) run in float32 throughout, and only their y-like outputs are
//   rounded to y's dtype (in_float32_below).
inline bool float32_params(const at::Tensor& y, const at::Tensor& weight) {
  return is_reduced(y.scalar_type()) && weight.scalar_type() == at::kFloat;
}

// p in dtype t: p itself, or a copy (from the block cache: a wide weight is MBs;
// float32 <-> bfloat16 through convert_run, AVX-512 BF16 where the CPU has it, where
// ATen's copy_ into a bf16 tensor took 2.3 ms for a (16, 784, 784) weight on 2 threads).
inline at::Tensor params_as(const at::Tensor& p_in, at::ScalarType t) {
  if (p_in.scalar_type() == t) return p_in.contiguous();
  const at::Tensor p = p_in.contiguous();
  at::Tensor o = empty_cached(p.sizes(), p.options().dtype(t));
  const at::ScalarType s = p.scalar_type();
  auto convert = [&](const auto* src, auto* dst) {
    at::parallel_for(0, p.numel(), int64_t{1} << 16, [&](int64_t b, int64_t e) {
      convert_run(src + b, dst + b, e - b);
    });
  };
  if (s == at::kFloat && t == at::kBFloat16)
    convert(p.data_ptr<float>(), o.data_ptr<c10::BFloat16>());
  else if (s == at::kBFloat16 && t == at::kFloat)
    convert(p.data_ptr<c10::BFloat16>(), o.data_ptr<float>());
  else
    o.copy_(p);
  return o;
}

// Row j of a wide stack's bias gradient from its float32 column sums, in gb's dtype:
// T, or float32 for float32 parameters (then unrounded).
template <typename T>
inline void put_bias_grad(const at::Tensor& gb, int64_t j, const float* sums) {
  const int64_t d = gb.size(1);
  if (gb.scalar_type() == at::kFloat) {
    std::copy(sums, sums + d, gb.data_ptr<float>() + j * d);
  } else {
    T* out = gb.data_ptr<T>() + j * d;
    for (int64_t c = 0; c < d; ++c) out[c] = round_to<T>(sums[c]);
  }
}

// Whether a call with float32 parameters runs on float32 copies of its reduced
// tensors (then the caller calls itself on rp_detail::up of them and rounds its y-like
// outputs back with rp_detail::down, reduced_precision.h's own conversions).
inline bool in_float32_below(const at::Tensor& first, const at::Tensor& weight) {
  return float32_params(first, weight) && !reduced_native(first);
}

// A pair stack's (leapfrog, Verlet) backward on float32 copies of its five activation-
// sized arguments (undefined ones stay so): fn(a, c, states, y, y_other) is the backward
// on them; its gradients of y, y_other and rebuilt pair are rounded to a's dtype, the
// parameters' gradients stay float32.
template <typename F>
T6 pair_backward_in_float32(const F& fn, const at::Tensor& a, const at::Tensor& c,
                            const at::Tensor& states, const at::Tensor& y,
                            const at::Tensor& y_other) {
  using rp_detail::down, rp_detail::up;
  const T6 r = fn(up(a), up(c), up(states), up(y), up(y_other));
  const at::ScalarType t = a.scalar_type();
  return {down(std::get<0>(r), t), down(std::get<1>(r), t), std::get<2>(r),
          std::get<3>(r), down(std::get<4>(r), t), down(std::get<5>(r), t)};
}

// fn(std::bool_constant<a>{}, ...) for run-time flags a, b, c: one instantiation
// per combination, so the flags are compile-time constants inside fn's loops.
template <typename F>
void with_flags(bool a, bool b, bool c, const F& fn) {
  auto with_c = [&](auto A, auto B) {
    if (c) fn(A, B, std::true_type{});
    else fn(A, B, std::false_type{});
  };
  auto with_b = [&](auto A) {
    if (b) with_c(A, std::true_type{});
    else with_c(A, std::false_type{});
  };
  if (a) with_b(std::true_type{});
  else with_b(std::false_type{});
}

// The reduced-precision twin of act_step, over a (rows, d) matrix: with
// v = p + bias (float32), x32 += alpha * act(v) when x32 is given (the carried
// float32 state), then xt = x32 rounded to T (when given: the next GEMM's input or
// a stored state), and s = what a state keeps of v, act(v) or v (kStoresPre), when
// given (s may be p itself). bias: one row of d.
template <typename T, Act A>
void act_step_reduced(int64_t rows, int64_t d, float* x32, T* xt, const T* p, T* s, float alpha,
                      const T* bias) {
  // The optional outputs as compile-time flags: a run-time test inside the loop
  // keeps it from vectorising (the pass ran 9x slower).
  with_flags(s != nullptr, x32 != nullptr, xt != nullptr, [&](auto S, auto X, auto XT) {
    ew_rows(rows, d, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t o = r * d;
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) {
          const float v = static_cast<float>(p[o + c]) + static_cast<float>(bias[c]);
          const float a = act_f<A, float>(v);
          if constexpr (S()) s[o + c] = round_to<T>(kStoresPre<A> ? v : a);
          if constexpr (X()) {
            const float x = x32[o + c] + alpha * a;
            x32[o + c] = x;
            if constexpr (XT()) xt[o + c] = round_to<T>(x);
          }
        }
      }
    });
  });
}

// g = elem(e) for every element e of a (rows, d) matrix (elem writes g where it
// belongs and returns it), and gb = (accumulate ? gb : 0) + the column sums of
// g, in one pass. The sums run over fixed blocks of rows, then over the blocks
// in order, so they do not depend on the number of threads.
template <typename T, typename F>
void colsum_pass(int64_t rows, int64_t d, T* gb, bool accumulate, const F& elem) {
  constexpr int64_t kRows = 32;
  const int64_t nb = (rows + kRows - 1) / kRows;
  std::vector<T> part(nb * d, T(0));
  at::parallel_for(0, nb, std::max<int64_t>(1, 16384 / (kRows * std::max<int64_t>(d, 1))),
                   [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      T* ps = part.data() + blk * d;
      for (int64_t r = blk * kRows; r < std::min(rows, (blk + 1) * kRows); ++r) {
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) ps[c] += elem(r * d + c);
      }
    }
  });
  for (int64_t c = 0; c < d; ++c) {
    T s = accumulate ? gb[c] : T(0);
    for (int64_t blk = 0; blk < nb; ++blk) s += part[blk * d + c];
    gb[c] = s;
  }
}

// Layer j's (B, d) slot s of a states tensor (N, S, B, d).
inline at::Tensor slot(const at::Tensor& states, int64_t j, int64_t s) {
  return states.select(0, j).select(0, s);
}

inline at::Tensor empty_states(const at::Tensor& y, int64_t layers, int64_t slots) {
  return empty_cached({layers, slots, y.size(0), y.size(1)}, y.options());
}

}  // namespace cpu_detail
}  // namespace stablenets
