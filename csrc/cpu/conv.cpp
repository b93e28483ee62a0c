// Convolutional stacks on the CPU: ATen (oneDNN) convolutions plus the fused
// elementwise passes of conv_elementwise.h. A pass with a bias walks (b, c)
// planes (NCHW: one bias value per plane) or rows of C channels (channels-last:
// bias[c] is a contiguous vector load); one without walks the memory flat.
// The layer loops live in conv_stack.h.
//
// Layout: channels-last inside the ops (inputs converted once, outputs returned
// NCHW), kernels too; STABLENETS_CONV_CHANNELS_LAST=0 runs NCHW. Measured on
// one thread (2026-12-05, (64, C, H, W) at the mnist preset's stage shapes):
// oneDNN's forward convolution 1.2-2x, its backward-data up to 4x and its
// backward-weights 1.2-2.4x faster channels-last than in NCHW (the NCHW
// backward-data at 8 channels 7x slower than a forward convolution), which the
// NCHW <-> NHWC conversions at the ops' edges (one pass each) more than repay.
// K^T Y and every input gradient run as forward convolutions with the adjoint
// kernel (kAdjointAsForward): never slower, and much faster than oneDNN's
// deconvolution/backward-data primitives where those are weak.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "block_cache.h"
#include "stablenets/conv_stack.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace stablenets {
namespace cpu_detail {

// ------------------------------------------------ NCHW <-> channels-last

// One (R x Cc) -> (Cc x R) tile of at most 16 x 16: dst[c ld_d + r] = s (a + b)[r ld_s + c]
// (b may be null). Math in float32 for the 16-bit types (one rounding).
template <typename T>
void transpose_tile(const T* a, const T* b, int64_t ld_s, T* dst, int64_t ld_d, int64_t nr,
                    int64_t nc, float s) {
  using M = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const M ms = static_cast<M>(s);
  for (int64_t c = 0; c < nc; ++c)
    for (int64_t r = 0; r < nr; ++r) {
      M v = static_cast<M>(a[r * ld_s + c]);
      if (b != nullptr) v += static_cast<M>(b[r * ld_s + c]);
      dst[c * ld_d + r] = static_cast<T>(ms * v);
    }
}

#if defined(__AVX512F__)
// GCC 12's avx512fintrin.h trips its own -Wuninitialized (_mm512_undefined_* in the
// unpack/shuffle intrinsics, GCC bug 105593).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
// The same for float32 in AVX-512 registers: 16 rows loaded (masked where the tile is
// partial), transposed in four rounds of shuffles, 16 columns stored.
template <bool Full>
inline void transpose_tile16(const float* a, const float* b, int64_t ld_s, float* dst,
                             int64_t ld_d, int nr, int nc, float s) {
  __m512 r[16], t[16];
  const __mmask16 cm = static_cast<__mmask16>((1u << nc) - 1);
  const __mmask16 rm = static_cast<__mmask16>((1u << nr) - 1);
  for (int i = 0; i < 16; ++i) {
    if (Full) {
      r[i] = _mm512_loadu_ps(a + i * ld_s);
      if (b != nullptr) r[i] = _mm512_add_ps(r[i], _mm512_loadu_ps(b + i * ld_s));
    } else if (i < nr) {
      r[i] = _mm512_maskz_loadu_ps(cm, a + i * ld_s);
      if (b != nullptr) r[i] = _mm512_add_ps(r[i], _mm512_maskz_loadu_ps(cm, b + i * ld_s));
    } else {
      r[i] = _mm512_setzero_ps();
    }
    if (s != 1.0f) r[i] = _mm512_mul_ps(r[i], _mm512_set1_ps(s));
  }
  for (int i = 0; i < 16; i += 2) {  // 2x2 blocks of elements
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // 4x4
    const __m512d t0 = _mm512_castps_pd(t[i]), t1 = _mm512_castps_pd(t[i + 1]),
                  t2 = _mm512_castps_pd(t[i + 2]), t3 = _mm512_castps_pd(t[i + 3]);
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
  }
  for (int i = 0; i < 4; ++i) {  // 8x8: 128-bit lanes
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {  // 16x16
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
  if (Full) {
    for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * ld_d, r[i]);
  } else {
    for (int i = 0; i < nc; ++i) _mm512_mask_storeu_ps(dst + i * ld_d, rm, r[i]);
  }
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

// dst[n] = s (a + b)[n]^T for each of B (R x Cc) matrices, in 16 x 16 tiles.
template <typename T>
void transpose_batched(const T* a, const T* b, T* dst, int64_t B, int64_t R, int64_t Cc, float s) {
  constexpr int64_t kTile = 16;
  const int64_t row_tiles = (R + kTile - 1) / kTile;
  const int64_t grain = std::max<int64_t>(1, 16384 / (kTile * Cc));
  at::parallel_for(0, B * row_tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / row_tiles, r0 = (t % row_tiles) * kTile;
      const int64_t nr = std::min(kTile, R - r0), off = n * R * Cc;
      for (int64_t c0 = 0; c0 < Cc; c0 += kTile) {
        const int64_t nc = std::min(kTile, Cc - c0);
        const T* as = a + off + r0 * Cc + c0;
        const T* bs = b != nullptr ? b + off + r0 * Cc + c0 : nullptr;
        T* d = dst + off + c0 * R + r0;
#if defined(__AVX512F__)
        if constexpr (std::is_same_v<T, float>) {
          if (nr == kTile && nc == kTile)
            transpose_tile16<true>(as, bs, Cc, d, R, 16, 16, s);
          else
            transpose_tile16<false>(as, bs, Cc, d, R, static_cast<int>(nr), static_cast<int>(nc), s);
          continue;
        }
#endif
        transpose_tile(as, bs, Cc, d, R, nr, nc, s);
      }
    }
  });
}

// Per-channel sums of a channels-last bfloat16/float16 tensor (B, C, H, W) in float32:
// 16 fixed row ranges (the result does not depend on the thread count), each summed
// in blocks of 64 rows, the ranges' sums added in order.
template <typename T>
void channel_sums(const T* g, float* out, int64_t rows, int64_t C) {
  constexpr int64_t kRanges = 16, kBlock = 64;
  std::vector<float> partial(kRanges * C, 0.0f);
  at::parallel_for(0, kRanges, 1, [&](int64_t k0, int64_t k1) {
    std::vector<float> block(C);
    for (int64_t k = k0; k < k1; ++k) {
      float* acc = partial.data() + k * C;
      const int64_t r0 = rows * k / kRanges, r1 = rows * (k + 1) / kRanges;
      for (int64_t b0 = r0; b0 < r1; b0 += kBlock) {
        std::fill(block.begin(), block.end(), 0.0f);
        const int64_t b1 = std::min(b0 + kBlock, r1);
        for (int64_t r = b0; r < b1; ++r) {
          const T* row = g + r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) block[c] += static_cast<float>(row[c]);
        }
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) acc[c] += block[c];
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    float s = 0.0f;
    for (int64_t k = 0; k < kRanges; ++k) s += partial[k * C + c];
    out[c] = s;
  }
}

struct ConvLauncher {
  static constexpr bool kHoistAct = true;
  static constexpr bool kAdjointAsForward = true;
  // bfloat16/float16 stacks convolve in that dtype (oneDNN: AVX-512 BF16 where the
  // CPU has it), the elementwise passes compute in float32.
  static bool native_reduced(const at::Tensor&) { return true; }
  static bool channels_last() {
    static const bool cl = [] {
      const char* v = std::getenv("STABLENETS_CONV_CHANNELS_LAST");
      const std::string s = v ? v : "";
      TORCH_CHECK(s.empty() || s == "0" || s == "1",
                  "STABLENETS_CONV_CHANNELS_LAST: expected 1 (channels-last inside the conv "
                  "ops, the default) or 0 (NCHW), got '", s, "'");
      return s != "0";
    }();
    return cl;
  }

  // The stored states are one large fresh allocation per forward (hundreds of
  // MB for deep stacks), which glibc maps anew each time: first-touch page
  // faults on 4 KiB pages cost more than the elementwise passes that write it
  // (205 MB: 79 ms against 12 ms with transparent huge pages, measured here).
  // Ask for huge pages where the kernel only gives them on request.
  static void fresh_buffer(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    constexpr uintptr_t kHuge = uintptr_t(1) << 21;
    const size_t bytes = t.numel() * t.element_size();
    if (bytes < 4 * kHuge) return;
    const auto p = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t lo = (p + kHuge - 1) & ~(kHuge - 1), hi = (p + bytes) & ~(kHuge - 1);
    if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // advice only
#else
    (void)t;
#endif
  }

  // States and temporaries come from the block cache (block_cache.h): a
  // training step reuses the previous step's instead of page-faulting them in
  // again (the C library returns freed blocks of a few hundred kB to the kernel
  // too, so the cache takes blocks from 64 kB here).
  static at::Tensor empty(at::IntArrayRef shape, const at::TensorOptions& options) {
    return empty_cached(shape, options, size_t{64} << 10);
  }

  // ConvStack's layout conversion (conv_stack.h, HasRelayout): dst = s (a [+ b]) where
  // one of dst, a is NCHW and the other channels-last (b laid out as a); false where
  // the call is not of that kind (then ATen's copy_/add_out/neg_out run).
  static bool relayout(const at::Tensor& dst, const at::Tensor& a, const at::Tensor& b,
                       double s) {
    if (dst.dim() != 4 || !dst.is_cpu() || !a.is_cpu() || dst.sizes() != a.sizes() ||
        dst.scalar_type() != a.scalar_type() || dst.numel() == 0)
      return false;
    if (b.defined() && (b.sizes() != a.sizes() || b.strides() != a.strides() ||
                        b.scalar_type() != a.scalar_type() || !b.is_cpu()))
      return false;
    const auto cl = at::MemoryFormat::ChannelsLast;
    const int64_t B = a.size(0), C = a.size(1), HW = a.size(2) * a.size(3);
    if (C == 1 || HW == 1) return false;  // both layouts are one: a plain pass
    int64_t R, Cc;
    if (a.is_contiguous() && dst.is_contiguous(cl)) {
      R = C, Cc = HW;  // each image (C, HW) -> (HW, C)
    } else if (a.is_contiguous(cl) && dst.is_contiguous()) {
      R = HW, Cc = C;
    } else {
      return false;
    }
    bool done = false;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "conv_relayout", [&] {
      transpose_batched<scalar_t>(a.data_ptr<scalar_t>(), b.defined() ? b.data_ptr<scalar_t>() : nullptr,
                                  dst.data_ptr<scalar_t>(), B, R, Cc, static_cast<float>(s));
      done = true;
    });
    return done;
  }

  // ConvStack's float32 bias gradient of a bfloat16/float16 G (conv_stack.h,
  // HasChannelSum): G summed over (B, H, W) per channel, or undefined where G is not
  // channels-last. at::sum(G, {0, 2, 3}, false, at::kFloat) first copies G to float32:
  // 7 ms of a 117 ms autocast step at (64, 16, 28, 28), N = 32.
  static at::Tensor channel_sum32(const at::Tensor& G) {
    if (!G.is_cpu() || G.dim() != 4 || !G.is_contiguous(at::MemoryFormat::ChannelsLast) ||
        !(G.scalar_type() == at::kBFloat16 || G.scalar_type() == at::kHalf))
      return at::Tensor();
    const int64_t C = G.size(1);
    at::Tensor out = at::empty({C}, G.options().dtype(at::kFloat));
    if (G.numel() == 0) return out.zero_();
    AT_DISPATCH_REDUCED_FLOATING_TYPES(G.scalar_type(), "conv_channel_sum32", [&] {
      channel_sums(G.data_ptr<scalar_t>(), out.data_ptr<float>(), G.numel() / C, C);
    });
    return out;
  }

  template <class Op, typename T>
  static void launch(const Op& op, const at::Tensor& like, const T* bias) {
    const int64_t n = like.numel();
    if (n == 0) return;
    constexpr int64_t kGrain = 16384;
    if (bias == nullptr) {
      at::parallel_for(0, n, kGrain, [&](int64_t e0, int64_t e1) {
        const Op o = op;
#pragma omp simd
        for (int64_t e = e0; e < e1; ++e) o(e, T(0));
      });
      return;
    }
    const int64_t C = like.size(1);
    if (like.is_contiguous()) {  // NCHW (or a shape where both layouts agree)
      const int64_t planes = like.size(0) * C, hw = n / planes;
      at::parallel_for(0, planes, std::max<int64_t>(1, kGrain / std::max<int64_t>(hw, 1)),
                       [&](int64_t p0, int64_t p1) {
                         const Op o = op;
                         for (int64_t p = p0; p < p1; ++p) {
                           const T b = bias[p % C];
                           const int64_t e1 = (p + 1) * hw;
#pragma omp simd
                           for (int64_t e = p * hw; e < e1; ++e) o(e, b);
                         }
                       });
      return;
    }
    TORCH_INTERNAL_ASSERT(like.is_contiguous(at::MemoryFormat::ChannelsLast),
                          "conv elementwise pass: expected an NCHW or channels-last tensor");
    const int64_t rows = n / C;
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / C), [&](int64_t r0, int64_t r1) {
      const Op o = op;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t e0 = r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) o(e0 + c, bias[c]);
      }
    });
  }
};

}  // namespace cpu_detail
}  // namespace stablenets

TORCH_LIBRARY_IMPL(stablenets, CPU, m) {
  SN_REGISTER_CONV_OPS(m, ::stablenets::cpu_detail::ConvLauncher);
}
