// Host side of the narrow regime: shared-memory planning, grid sizes and the
// definitions of narrow_forward / narrow_backward (narrow.h). The translation
// unit that includes this defines the three launch hooks declared below
// (csrc/cuda/narrow.cu launches on the current CUDA stream).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "narrow.h"
#include "narrow_kernels.cuh"

namespace stablenets {
namespace cuda_detail {
namespace narrow {

template <typename T>
using KernelFn = void (*)(Params<T>);

struct DeviceLimits {
  int smem_optin;  // bytes of shared memory a block may opt into
  int sms;         // multiprocessors
};

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

// Backward blocks: enough to fill the GPU, while the per-block partial weight
// gradients stay under ~64 MB. Never more blocks than tiles.
inline int64_t backward_blocks(int64_t ntiles, int64_t per_block_bytes, int sms) {
  const int64_t cap_mem = std::max<int64_t>(1, (int64_t{64} << 20) / per_block_bytes);
  return std::max<int64_t>(1, std::min<int64_t>({ntiles, int64_t{sms} * 4, cap_mem}));
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
  KernelFn<T> kernel = arch == Arch::ResNet     ? k_fwd_resnet<T, D>
                       : arch == Arch::Leapfrog ? k_fwd_leapfrog<T, D>
                                                : k_fwd_verlet<T, D>;
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
  KernelFn<T> kernel;
  switch (arch) {
    case Arch::ResNet:
      kernel = k_bwd_resnet<T, D>;
      break;
    case Arch::Leapfrog:
      kernel = rev ? k_bwd_leapfrog<T, D, true> : k_bwd_leapfrog<T, D, false>;
      break;
    default:
      kernel = rev ? k_bwd_verlet<T, D, true> : k_bwd_verlet<T, D, false>;
      break;
  }
  const int tiles = arch == Arch::ResNet ? 2 : 5;
  const DeviceLimits lim = device_limits();
  size_t bytes;
  if (!plan_smem<T, D>(tiles, p.N, lim.smem_optin, &p.nst, &bytes)) return false;
  const int64_t per_block = static_cast<int64_t>(p.N) * d * (d + 1);
  const int64_t nblk = backward_blocks(p.ntiles, per_block * sizeof(T), lim.sms);
  // Every element is written by the first tile of its block: no zeroing needed.
  at::Tensor partial = at::empty({nblk, p.N, d, d + 1}, g0.options());
  p.partial = partial.data_ptr<T>();
  launch<T>(kernel, nblk, C::NT, bytes, p);
  launch_reduce<T>(p.partial, static_cast<int>(nblk), p.N, d, antisym, dW.data_ptr<T>(),
                   db.data_ptr<T>());
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
