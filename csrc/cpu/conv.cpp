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

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "block_cache.h"
#include "stablenets/conv_stack.h"

namespace stablenets {
namespace cpu_detail {

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
