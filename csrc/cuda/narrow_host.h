// Host side of the narrow regime: shared-memory planning, grid sizes and the
// definitions of narrow_forward / narrow_backward (narrow.h). The three launch
// hooks declared below are defined elsewhere (csrc/cuda/narrow.cu launches on
// the current CUDA stream; the CPU emulator in csrc/cuda/testing runs threads).
//
// Build split: the kernels of one (dtype, padded width) are reached through
// kernel_table<T, D>() (narrow_kernels.cuh). In the CUDA build each pair's
// table is explicitly instantiated in its own translation unit
// (csrc/cuda/narrow_<dtype>_d<D>.cu, SN_NARROW_INSTANTIATE in narrow_table.cuh),
// which includes no ATen header: parsing ATen is most of an nvcc compile, and
// nvcc parses a file once per target architecture plus once for the host. Every
// other includer sees the tables as extern templates (SN_NARROW_EXTERN below);
// forward_impl / backward_impl, host code, are instantiated where the
// dispatchers are defined (narrow.cu). The CPU emulator instantiates
// everything implicitly in its one translation unit.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "narrow.h"
#include "narrow_kernels.cuh"
#if defined(SN_CPU_EMULATION)
#include "narrow_table.cuh"
#endif

namespace stablenets {
namespace cuda_detail {
namespace narrow {

struct DeviceLimits {
  int smem_optin;          // bytes of shared memory a block may opt into
  int sms;                 // multiprocessors
  int64_t partial_budget;  // most bytes for the backward's per-block partial weight gradients
};

// Default partial_budget. Below it, a stack's partials may use as many bytes as
// its weight gradient, or kPartialFloor: a reversible backward, whose other
// memory is O(B d) plus that gradient, then needs about twice the gradient.
constexpr int64_t kPartialBudget = int64_t{64} << 20;
constexpr int64_t kPartialFloor = int64_t{16} << 20;

// Hooks, defined by the including translation unit.
DeviceLimits device_limits();
template <typename T>
void launch(KernelFn<T> kernel, int64_t grid, int threads, size_t smem, const Params<T>& p);
template <typename T>
void launch_reduce(const T* partial, int nblk, int N, int d, bool antisym, T* dW, T* db);

constexpr size_t kStageBudget = 48 * 1024;  // bytes of weight stages to aim for

// Weight stages and shared-memory bytes for `tiles` tile arrays; false when the
// device cannot hold even two stages.
template <typename T, int D>
bool plan_smem(int tiles, int N, int optin, int* nst, size_t* bytes) {
  using C = Cfg<D>;
  const size_t stage = C::STAGE * sizeof(T);
  const size_t tile_bytes = static_cast<size_t>(tiles) * C::TILE * sizeof(T);
  int n = static_cast<int>(std::max<size_t>(2, kStageBudget / stage));
  n = std::min(n, std::max(N, 2));
  while (n > 2 && tile_bytes + n * stage > static_cast<size_t>(optin)) --n;
  *nst = n;
  *bytes = tile_bytes + n * stage;
  return *bytes <= static_cast<size_t>(optin);
}

// Backward grid: `blocks` blocks (enough to fill the GPU: up to 4 per SM, never
// more than tiles), each summing its tiles' weight gradients into its own
// partial (blocks, chunk, d, d+1), reduced over blocks in block order by a
// second kernel (deterministic, no atomics). The layers are walked top down in
// chunks of `chunk` layers so those partials stay within `budget` bytes
// however deep the stack: each chunk is one launch plus one reduction, the
// adjoints (and, reversible, the rebuilt states) carried to the next chunk in
// global memory. Chunks shorter than 8 layers are avoided by giving up blocks
// beyond 2 per SM.
struct BackwardPlan {
  int64_t blocks;
  int chunk;
};

inline BackwardPlan backward_plan(int64_t ntiles, int64_t layer_bytes, int N, int sms,
                                  int64_t budget) {
  int64_t blocks = std::min<int64_t>(ntiles, int64_t{sms} * 4);
  const int64_t min_chunk = std::min<int64_t>(N, 8);
  const int64_t fit = budget / (min_chunk * layer_bytes);
  if (blocks > fit) blocks = std::max<int64_t>(fit, std::min<int64_t>(blocks, int64_t{sms} * 2));
  blocks = std::max<int64_t>(1, blocks);
  int64_t chunk = std::clamp<int64_t>(budget / (blocks * layer_bytes), 1, N);
  const int64_t nchunks = (N + chunk - 1) / chunk;
  chunk = (N + nchunks - 1) / nchunks;  // even chunks
  return {blocks, static_cast<int>(chunk)};
}

template <typename T>
Params<T> base_params(const at::Tensor& W, const at::Tensor& b, int64_t B, int d, double h,
                      Act act) {
  Params<T> p{};
  p.W = W.data_ptr<T>();
  p.bias = b.data_ptr<T>();
  p.B = B;
  p.d = d;
  p.N = static_cast<int>(W.size(0));
  p.h = static_cast<T>(h);
  p.act = act;
  return p;
}

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

template <typename T, int D>
bool forward_impl(Arch arch, const at::Tensor& in0, const at::Tensor& in1, const at::Tensor& W,
                  const at::Tensor& b, double h, Act act, const at::Tensor& out0,
                  const at::Tensor& out1, const at::Tensor& states) {
  using C = Cfg<D>;
  const int64_t B = in0.size(0);
  const int d = static_cast<int>(in0.size(1));
  Params<T> p = base_params<T>(W, b, B, d, h, act);
  p.x0 = in0.data_ptr<T>();
  p.out0 = out0.data_ptr<T>();
  if (arch != Arch::ResNet) {
    p.x1 = in1.data_ptr<T>();
    p.out1 = out1.data_ptr<T>();
  }
  p.st_out = ptr_or_null<T>(states);
  p.ntiles = (B + C::R - 1) / C::R;
  const KernelTable<T> k = kernel_table<T, D>();
  KernelFn<T> kernel = arch == Arch::ResNet     ? k.fwd_resnet
                       : arch == Arch::Leapfrog ? k.fwd_leapfrog
                                                : k.fwd_verlet;
  const int tiles = arch == Arch::ResNet ? 1 : 2;
  const DeviceLimits lim = device_limits();
  size_t bytes;
  if (!plan_smem<T, D>(tiles, p.N, lim.smem_optin, &p.nst, &bytes)) return false;
  launch<T>(kernel, p.ntiles, C::NT, bytes, p);
  return true;
}

template <typename T, int D>
bool backward_impl(Arch arch, bool rev, bool antisym, const at::Tensor& g0, const at::Tensor& g1,
                   const at::Tensor& states, const at::Tensor& s0, const at::Tensor& s1,
                   const at::Tensor& W, const at::Tensor& b, double h, Act act,
                   const at::Tensor& grad0, const at::Tensor& grad1, const at::Tensor& dW,
                   const at::Tensor& db, const at::Tensor& r0, const at::Tensor& r1) {
  using C = Cfg<D>;
  const int64_t B = g0.size(0);
  const int d = static_cast<int>(g0.size(1));
  Params<T> p = base_params<T>(W, b, B, d, h, act);
  p.x0 = g0.data_ptr<T>();
  p.out0 = grad0.data_ptr<T>();
  if (arch != Arch::ResNet) {
    p.x1 = g1.data_ptr<T>();
    p.out1 = grad1.data_ptr<T>();
  }
  if (rev) {
    p.s0 = s0.data_ptr<T>();
    p.s1 = s1.data_ptr<T>();
    p.rebuilt0 = r0.data_ptr<T>();
    p.rebuilt1 = r1.data_ptr<T>();
  } else {
    p.st = states.data_ptr<T>();
  }
  p.ntiles = (B + C::R - 1) / C::R;
  const KernelTable<T> k = kernel_table<T, D>();
  KernelFn<T> kernel;
  switch (arch) {
    case Arch::ResNet:
      kernel = k.bwd_resnet;
      break;
    case Arch::Leapfrog:
      kernel = rev ? k.bwd_leapfrog_rev : k.bwd_leapfrog;
      break;
    default:
      kernel = rev ? k.bwd_verlet_rev : k.bwd_verlet;
      break;
  }
  const int tiles = arch == Arch::ResNet ? 2 : 5;
  const int slots = arch == Arch::Verlet ? 4 : 2;  // states per layer (stored mode)
  const int N = p.N;
  const DeviceLimits lim = device_limits();
  const int64_t layer_bytes = static_cast<int64_t>(d) * (d + 1) * sizeof(T);
  const int64_t budget =
      std::min(lim.partial_budget, std::max(kPartialFloor, layer_bytes * N));
  const BackwardPlan plan = backward_plan(p.ntiles, layer_bytes, N, lim.sms, budget);
  size_t bytes;
  if (!plan_smem<T, D>(tiles, plan.chunk, lim.smem_optin, &p.nst, &bytes)) return false;
  // Every element is written by the first tile of its block: no zeroing needed.
  at::Tensor partial = at::empty({plan.blocks, plan.chunk, d, d + 1}, g0.options());
  p.partial = partial.data_ptr<T>();
  // Reversible and chunked: the rebuilt carried states (2, B, d) between chunks.
  at::Tensor carried;
  if (rev && plan.chunk < N) carried = at::empty({2, B, d}, g0.options());
  const T* const W0 = p.W;
  const T* const b0 = p.bias;
  const T* const st0 = p.st;
  for (int hi = N; hi > 0; hi -= plan.chunk) {
    const int lo = std::max(0, hi - plan.chunk);
    Params<T> q = p;
    q.N = hi - lo;
    q.W = W0 + static_cast<int64_t>(lo) * d * d;
    q.bias = b0 + static_cast<int64_t>(lo) * d;
    if (hi < N) {  // continue from the adjoints the chunk above wrote (in place)
      q.x0 = p.out0;
      q.x1 = p.out1;
    }
    if (rev) {
      if (hi < N) {
        q.s0 = carried.data_ptr<T>();
        q.s1 = q.s0 + B * d;
      }
      q.st_out = lo > 0 ? carried.data_ptr<T>() : nullptr;
    } else {
      q.st = st0 + static_cast<int64_t>(lo) * slots * B * d;
    }
    launch<T>(kernel, plan.blocks, C::NT, bytes, q);
    launch_reduce<T>(p.partial, static_cast<int>(plan.blocks), q.N, d, antisym,
                     dW.data_ptr<T>() + static_cast<int64_t>(lo) * d * d,
                     db.data_ptr<T>() + static_cast<int64_t>(lo) * d);
  }
  return true;
}

// Calls fn(std::integral_constant<int, D>) for the padded width of d.
template <typename F>
bool with_width(int64_t d, F&& fn) {
  if (d <= 4) return fn(std::integral_constant<int, 4>{});
  if (d <= 8) return fn(std::integral_constant<int, 8>{});
  if (d <= 16) return fn(std::integral_constant<int, 16>{});
  if (d <= 32) return fn(std::integral_constant<int, 32>{});
  if (d <= 64) return fn(std::integral_constant<int, 64>{});
  return false;
}

// Every (dtype, padded width) pair: one narrow_<dtype>_d<D>.cu each.
#define SN_NARROW_FOR_EACH(X) \
  X(float, 4) X(float, 8) X(float, 16) X(float, 32) X(float, 64) \
  X(double, 4) X(double, 8) X(double, 16) X(double, 32) X(double, 64)

#if !defined(SN_CPU_EMULATION)
#define SN_NARROW_EXTERN(T, D) extern template KernelTable<T> kernel_table<T, D>();
SN_NARROW_FOR_EACH(SN_NARROW_EXTERN)
#undef SN_NARROW_EXTERN
#endif

}  // namespace narrow

bool narrow_forward(Arch arch, const at::Tensor& in0, const at::Tensor& in1, const at::Tensor& W,
                    const at::Tensor& b, double h, Act act, const at::Tensor& out0,
                    const at::Tensor& out1, const at::Tensor& states) {
  bool done = false;
  AT_DISPATCH_FLOATING_TYPES(in0.scalar_type(), "stablenets_narrow_forward", [&] {
    done = narrow::with_width(in0.size(1), [&](auto width) {
      return narrow::forward_impl<scalar_t, decltype(width)::value>(arch, in0, in1, W, b, h, act,
                                                                    out0, out1, states);
    });
  });
  return done;
}

bool narrow_backward(Arch arch, bool reversible, bool antisym, const at::Tensor& g0,
                     const at::Tensor& g1, const at::Tensor& states, const at::Tensor& s0,
                     const at::Tensor& s1, const at::Tensor& W, const at::Tensor& b, double h,
                     Act act, const at::Tensor& grad0, const at::Tensor& grad1,
                     const at::Tensor& dW, const at::Tensor& db, const at::Tensor& r0,
                     const at::Tensor& r1) {
  bool done = false;
  AT_DISPATCH_FLOATING_TYPES(g0.scalar_type(), "stablenets_narrow_backward", [&] {
    done = narrow::with_width(g0.size(1), [&](auto width) {
      return narrow::backward_impl<scalar_t, decltype(width)::value>(
          arch, reversible, antisym, g0, g1, states, s0, s1, W, b, h, act, grad0, grad1, dW, db,
          r0, r1);
    });
  });
  return done;
}

}  // namespace cuda_detail
}  // namespace stablenets
