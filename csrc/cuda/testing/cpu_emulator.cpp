// CPU emulation of the stablenets CUDA kernels: a development tool for machines
// without a GPU, never part of the package (setup.py builds csrc/cuda/*.cu only).
//
// The same kernel sources (narrow_kernels.cuh, wide_ops.cuh, wide.cuh,
// entry.cuh) compiled as host C++: one std::thread per CUDA thread,
// std::barrier for __syncthreads, a per-warp exchange for __shfl_xor_sync,
// cp.async copies deferred until __pipeline_wait_prior, shared memory filled
// with NaN before every block (reads of unwritten shared memory show up), and
// the column-major GEMM hook mapped to ATen on the CPU. The ops register for
// the CPU dispatch key, so the CUDA tests can run against them:
//     python csrc/cuda/testing/run_emulated.py [pytest args]
// sn_emu::set_limits(optin_bytes, sms) shrinks the modelled device to force
// the two-stage weight pipeline and several row tiles per block;
// sn_emu::set_partial_budget(bytes) forces the backward's layer chunks.
#define SN_CPU_EMULATION 1
#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <barrier>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct EmuDim { unsigned x = 0, y = 0, z = 0; };
thread_local EmuDim threadIdx, blockIdx;
EmuDim gridDim, blockDim;

thread_local std::barrier<>* emu_bar = nullptr;
inline void __syncthreads() { emu_bar->arrive_and_wait(); }

struct EmuWarp {
  std::barrier<> bar{32};
  double v[32];
};
thread_local EmuWarp* emu_warp = nullptr;
template <typename T>
T __shfl_xor_sync(unsigned, T x, int off) {
  const int lane = threadIdx.x % 32;
  emu_warp->v[lane] = static_cast<double>(x);
  emu_warp->bar.arrive_and_wait();
  const T r = static_cast<T>(emu_warp->v[lane ^ off]);
  emu_warp->bar.arrive_and_wait();
  return r;
}

struct EmuCopy { void* dst; const void* src; size_t n; };
thread_local std::vector<EmuCopy> emu_cur;
thread_local std::deque<std::vector<EmuCopy>> emu_groups;
inline void __pipeline_memcpy_async(void* dst, const void* src, size_t n, size_t = 0) {
  if (n != 4 && n != 8 && n != 16) std::abort();
  if (reinterpret_cast<uintptr_t>(dst) % n || reinterpret_cast<uintptr_t>(src) % n) std::abort();
  emu_cur.push_back({dst, src, n});
}
inline void __pipeline_commit() {
  emu_groups.push_back(std::move(emu_cur));
  emu_cur.clear();
}
inline void __pipeline_wait_prior(size_t n) {
  n = std::min<size_t>(n, 8);
  while (emu_groups.size() > n) {
    for (auto& c : emu_groups.front()) std::memcpy(c.dst, c.src, c.n);
    emu_groups.pop_front();
  }
}

thread_local unsigned char* emu_smem = nullptr;
#define SN_SMEM_BASE T* const sm = reinterpret_cast<T*>(emu_smem)

#include "narrow_kernels.cuh"
#include "narrow_host.h"
#include "wide_ops.cuh"

static int g_optin = 227 * 1024;
static int g_sms = 132;
static int64_t g_budget = stablenets::cuda_detail::narrow::kPartialBudget;
static int64_t g_launches = 0, g_narrow = 0, g_narrow_reduced = 0;

namespace stablenets {
namespace cuda_detail {

template <typename T, class Op>
void launch_elementwise(const Op& op, int64_t n, int64_t d) {
  constexpr int V = 16 / sizeof(T);
  if (n == 0) return;
  ++g_launches;
  if (d % V == 0 && op.aligned()) {
    for (int64_t v = 0; v < n / V; ++v) op.template apply<V>(v * V);
  } else {
    for (int64_t i = 0; i < n; ++i) op.template apply<1>(i);
  }
}

template <typename T>
void blas_gemm(char transa, char transb, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
               int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  ++g_launches;
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  // column-major (rows x cols) with leading dimension ld
  auto cm = [&](const T* p, int64_t rows, int64_t cols, int64_t ld) {
    return at::from_blob(const_cast<T*>(p), {rows, cols}, {1, ld}, opts);
  };
  at::Tensor A = transa == 'n' ? cm(a, m, k, lda) : cm(a, k, m, lda).t();
  at::Tensor Bm = transb == 'n' ? cm(b, k, n, ldb) : cm(b, n, k, ldb).t();
  at::Tensor C = cm(c, m, n, ldc);
  at::Tensor prod = at::mm(A, Bm).mul_(alpha);
  if (beta == T(0)) C.copy_(prod); else C.mul_(beta).add_(prod);
}

namespace narrow {

DeviceLimits device_limits() { return {g_optin, g_sms, g_budget}; }

template <typename T, typename S>
void launch(KernelFn<T, S> kernel, int64_t grid, int threads, size_t smem,
            const Params<T, S>& p) {
  ++g_launches;
  ++g_narrow;
  if (!std::is_same_v<T, S>) ++g_narrow_reduced;  // bf16/fp16 storage over float kernels
  if (smem > static_cast<size_t>(g_optin)) std::abort();
  gridDim = {static_cast<unsigned>(grid), 1, 1};
  blockDim = {static_cast<unsigned>(threads), 1, 1};
  const size_t bytes = (smem + 63) / 64 * 64 + 64;
  unsigned char* shared = static_cast<unsigned char*>(std::aligned_alloc(64, bytes));
  for (int64_t b = 0; b < grid; ++b) {
    std::memset(shared, 0xFF, bytes);  // NaN garbage: catches reads of unwritten shared memory
    std::barrier<> bar(threads);
    std::unique_ptr<EmuWarp[]> warps(new EmuWarp[threads / 32]);
    std::vector<std::thread> ts;
    ts.reserve(threads);
    for (int t = 0; t < threads; ++t) {
      ts.emplace_back([&, t] {
        threadIdx = {static_cast<unsigned>(t), 0, 0};
        blockIdx = {static_cast<unsigned>(b), 0, 0};
        emu_bar = &bar;
        emu_warp = &warps[t / 32];
        emu_smem = shared;
        emu_cur.clear();
        emu_groups.clear();
        kernel(p);
        emu_cur.clear();
        emu_groups.clear();
      });
    }
    for (auto& th : ts) th.join();
  }
  std::free(shared);
}

template <typename T, typename S>
void launch_reduce(const T* partial, int nblk, int N, int d, bool antisym, S* dW, S* db) {
  ++g_launches;
  gridDim = {1, 1, 1};
  blockDim = {1, 1, 1};
  threadIdx = {0, 0, 0};
  blockIdx = {0, 0, 0};
  k_reduce_partials<T, S>(partial, nblk, N, d, antisym, dW, db);
}

}  // namespace narrow
}  // namespace cuda_detail
}  // namespace stablenets

#include "entry.cuh"

TORCH_LIBRARY_IMPL(stablenets, CPU, m) { SN_REGISTER_DENSE_OPS(m); }

TORCH_LIBRARY(sn_emu, m) {
  m.def("set_limits(int optin, int sms) -> ()", [](int64_t optin, int64_t sms) {
    g_optin = static_cast<int>(optin);
    g_sms = static_cast<int>(sms);
  });
  m.def("set_partial_budget(int bytes) -> ()", [](int64_t bytes) { g_budget = bytes; });
  // [launches, narrow kernel launches, those of them over bf16/fp16 storage]
  m.def("counters() -> int[]", []() {
    return std::vector<int64_t>{g_launches, g_narrow, g_narrow_reduced};
  });
}
