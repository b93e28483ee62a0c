// Convolutional stacks on CUDA: cuDNN convolutions through ATen plus the fused
// elementwise passes of conv_elementwise.h as one grid-stride kernel each, on
// the current stream. The layer loops live in conv_stack.h (shared with the CPU).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "stablenets/conv_stack.h"

namespace stablenets {
namespace cuda_detail {
namespace {

template <class Op, typename T>
__global__ void conv_ew_kernel(Op op, int64_t n, int64_t hw, int64_t channels, const T* bias) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += stride) {
    op(e, bias ? bias[(e / hw) % channels] : T(0));
  }
}

struct ConvLauncher {
  // One instantiation per pass and dtype: the activation switch is uniform
  // across a launch, so a runtime Act costs no divergence.
  static constexpr bool kHoistAct = false;
  // bfloat16/float16: on float32 copies (reduced_precision.h) until the cuDNN
  // reduced-precision path is measured on a GPU.
  static bool native_reduced(const at::Tensor&) { return false; }
  // cuDNN's float32/float64 paths are most at home in NCHW: stay there.
  static bool channels_last() { return false; }
  static void fresh_buffer(const at::Tensor&) {}
  static at::Tensor empty(at::IntArrayRef shape, const at::TensorOptions& options) {
    return at::empty(shape, options);
  }

  template <class Op, typename T>
  static void launch(const Op& op, const at::Tensor& like, const T* bias) {
    const int64_t n = like.numel();
    if (n == 0) return;
    const c10::cuda::CUDAGuard guard(like.device());
    const int64_t channels = like.size(1), hw = n / (like.size(0) * channels);
    constexpr int kThreads = 256;
    const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, sms * 16));
    conv_ew_kernel<Op, T><<<static_cast<unsigned>(blocks), kThreads, 0,
                            at::cuda::getCurrentCUDAStream()>>>(op, n, hw, channels, bias);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace
}  // namespace cuda_detail
}  // namespace stablenets

TORCH_LIBRARY_IMPL(stablenets, CUDA, m) {
  SN_REGISTER_CONV_OPS(m, ::stablenets::cuda_detail::ConvLauncher);
}
