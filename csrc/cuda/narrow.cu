// The launch hooks that narrow_host.h calls, for the GPU: every launch goes to
// the current CUDA stream and is checked; no host synchronisation, no
// allocation outside ATen's caching allocator, so the ops can be captured in
// CUDA graphs. The kernels themselves are compiled in narrow_<dtype>_d<D>.cu,
// one translation unit per (dtype, padded width) and without ATen, so the
// build runs them in parallel; this file only plans and dispatches
// (narrow_forward / narrow_backward, and the host-side forward_impl /
// backward_impl they instantiate), reaching the kernels through kernel_table.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>

#include <mutex>
#include <set>
#include <utility>

#include "narrow_host.h"
#include "narrow_kernels.cuh"

namespace stablenets {
namespace cuda_detail {
namespace narrow {
namespace {

// Lets `kernel` use the device's full opt-in shared memory (once per kernel and device).
template <typename T, typename S>
void allow_large_smem(KernelFn<T, S> kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return;
  static std::mutex mu;
  static std::set<std::pair<const void*, int>> done;
  const int dev = c10::cuda::current_device();
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), dev);
  if (done.count(key)) return;
  const int optin =
      static_cast<int>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
  done.insert(key);
}

}  // namespace

DeviceLimits device_limits() {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  return {static_cast<int>(prop->sharedMemPerBlockOptin), prop->multiProcessorCount,
          kPartialBudget};
}

template <typename T, typename S>
void launch(KernelFn<T, S> kernel, int64_t grid, int threads, size_t smem,
            const Params<T, S>& p) {
  allow_large_smem<T, S>(kernel, smem);
  kernel<<<static_cast<unsigned>(grid), threads, smem, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename S>
void launch_reduce(const T* partial, int nblk, int N, int d, bool antisym, S* dW, S* db) {
  const int64_t E = static_cast<int64_t>(N) * d * (d + 1);
  const int threads = 256;
  const int64_t blocks = std::max<int64_t>(
      1, std::min<int64_t>((E + threads - 1) / threads, int64_t{device_limits().sms} * 8));
  k_reduce_partials<T, S>
      <<<static_cast<unsigned>(blocks), threads, 0, at::cuda::getCurrentCUDAStream()>>>(
          partial, nblk, N, d, antisym, dW, db);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace narrow
}  // namespace cuda_detail
}  // namespace stablenets
