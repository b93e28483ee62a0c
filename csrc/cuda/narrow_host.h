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
//
// Reduced precision: a bfloat16/float16 call runs the float kernels over
// 16-bit memory (narrow_kernels.cuh: storage type S), with the weights and
// biases given in float32 (the caller converts them, entry.cuh), the partial
// weight gradients, the chunk scratch and their sum in float32, and dW / db
// rounded once to the storage type.
#pragma once

#include <ATen/ATen.h>

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
template <typename T, typename S>
void launch(KernelFn<T, S> kernel, int64_t grid, int threads, size_t smem,
            const Params<T, S>& p);
template <typename T, typename S>
void launch_reduce(const T* partial, int nblk, int N, int d, bool antisym, S* dW, S* db);

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

// The storage type the kernels see for ATen's element type A (the CUDA 16-bit
// types have the same layout as c10's).
template <typename A>
struct StorageOf {
  using type = A;
};
template <>
struct StorageOf<at::BFloat16> {
  using type = bf16_t;
};
template <>
struct StorageOf<at::Half> {
  using type = fp16_t;
};
static_assert(sizeof(bf16_t) == sizeof(at::BFloat16) && sizeof(fp16_t) == sizeof(at::Half),
              "16-bit storage types");

// Data of `t` as storage type S (t's element type has S's layout: checked).
template <typename S>
S* sptr(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.element_size() == static_cast<int64_t>(sizeof(S)),
                        "narrow kernels: storage type mismatch for ", t.scalar_type());
  return static_cast<S*>(t.data_ptr());
}

template <typename T, typename S>
Params<T, S> base_params(const at::Tensor& W, const at::Tensor& b, int64_t B, int d, double h,
                         Act act) {
  Params<T, S> p{};
  p.W = W.data_ptr<T>();
  p.bias = b.data_ptr<T>();
  p.B = B;
  p.d = d;
  p.N = static_cast<int>(W.size(0));
  p.h = static_cast<T>(h);
  p.act = act;
  return p;
}

template <typename S>
S* ptr_or_null(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? sptr<S>(t) : nullptr;
}

template <typename T, typename S, int D>
bool forward_impl(Arch arch, const at::Tensor& in0, const at::Tensor& in1, const at::Tensor& W,
                  const at::Tensor& b, double h, Act act, const at::Tensor& out0,
                  const at::Tensor& out1, const at::Tensor& states) {
  using C = Cfg<D>;
  const int64_t B = in0.size(0);
  const int d = static_cast<int>(in0.size(1));
  Params<T, S> p = base_params<T, S>(W, b, B, d, h, act);
  p.x0 = sptr<S>(in0);
  p.out0 = sptr<S>(out0);
  if (arch != Arch::ResNet) {
    p.x1 = sptr<S>(in1);
    p.out1 = sptr<S>(out1);
  }
  p.st_out = ptr_or_null<S>(states);
  p.ntiles = (B + C::R - 1) / C::R;
  const KernelTable<T, S> k = kernel_table<T, S, D>();
  KernelFn<T, S> kernel = arch == Arch::ResNet     ? k.fwd_resnet
                       : arch == Arch::Leapfrog ? k.fwd_leapfrog
                                                : k.fwd_verlet;
  const int tiles = arch == Arch::ResNet ? 1 : 2;
  const DeviceLimits lim = device_limits();
  size_t bytes;
  if (!plan_smem<T, D>(tiles, p.N, lim.smem_optin, &p.nst, &bytes)) return false;
  launch<T, S>(kernel, p.ntiles, C::NT, bytes, p);
  return true;
}

template <typename T, typename S, int D>
bool backward_impl(Arch arch, bool rev, bool antisym, const at::Tensor& g0, const at::Tensor& g1,
                   const at::Tensor& states, const at::Tensor& s0, const at::Tensor& s1,
                   const at::Tensor& W, const at::Tensor& b, double h, Act act,
                   const at::Tensor& grad0, const at::Tensor& grad1, const at::Tensor& dW,
                   const at::Tensor& db, const at::Tensor& r0, const at::Tensor& r1) {
  using C = Cfg<D>;
  const int64_t B = g0.size(0);
  const int d = static_cast<int>(g0.size(1));
  Params<T, S> p = base_params<T, S>(W, b, B, d, h, act);
  const bool pair = arch != Arch::ResNet;
  p.x0 = sptr<S>(g0);
  p.out0 = sptr<S>(grad0);
  if (pair) {
    p.x1 = sptr<S>(g1);
    p.out1 = sptr<S>(grad1);
  }
  if (rev) {
    p.s0 = sptr<S>(s0);
    p.s1 = sptr<S>(s1);
    p.rebuilt0 = sptr<S>(r0);
    p.rebuilt1 = sptr<S>(r1);
  } else {
    p.st = sptr<S>(states);
  }
  p.ntiles = (B + C::R - 1) / C::R;
  const KernelTable<T, S> k = kernel_table<T, S, D>();
  KernelFn<T, S> kernel;
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
  const at::TensorOptions topts = g0.options().dtype(c10::CppTypeToScalarType<T>::value);
  // Every element is written by the first tile of its block: no zeroing needed.
  at::Tensor partial = at::empty({plan.blocks, plan.chunk, d, d + 1}, topts);
  p.partial = partial.data_ptr<T>();
  // Chunked: the adjoints (2, B, d) between chunks, in T: in place in the
  // gradient outputs when they are T, else in scratch; reversible, the rebuilt
  // carried states (2, B, d) too.
  T* adj0 = nullptr;
  T* adj1 = nullptr;
  at::Tensor adj, carried;
  if (plan.chunk < N) {
    if constexpr (std::is_same_v<T, S>) {
      adj0 = p.out0;
      adj1 = p.out1;
    } else {
      adj = at::empty({2, B, d}, topts);
      adj0 = adj.data_ptr<T>();
      adj1 = pair ? adj0 + B * d : nullptr;
    }
    if (rev) carried = at::empty({2, B, d}, topts);
  }
  const T* const W0 = p.W;
  const T* const b0 = p.bias;
  const S* const st0 = p.st;
  S* const dW0 = sptr<S>(dW);
  S* const db0 = sptr<S>(db);
  for (int hi = N; hi > 0; hi -= plan.chunk) {
    const int lo = std::max(0, hi - plan.chunk);
    Params<T, S> q = p;
    q.N = hi - lo;
    q.W = W0 + static_cast<int64_t>(lo) * d * d;
    q.bias = b0 + static_cast<int64_t>(lo) * d;
    if (hi < N) {  // continue from the adjoints the chunk above left
      q.xf0 = adj0;
      q.xf1 = adj1;
    }
    if (lo > 0) {  // and leave them to the chunk below
      q.outf0 = adj0;
      q.outf1 = adj1;
    }
    if (rev) {
      if (hi < N) q.carry_in = carried.data_ptr<T>();
      q.carry_out = lo > 0 ? carried.data_ptr<T>() : nullptr;
    } else {
      q.st = st0 + static_cast<int64_t>(lo) * slots * B * d;
    }
    launch<T, S>(kernel, plan.blocks, C::NT, bytes, q);
    launch_reduce<T, S>(p.partial, static_cast<int>(plan.blocks), q.N, d, antisym,
                        dW0 + static_cast<int64_t>(lo) * d * d, db0 + static_cast<int64_t>(lo) * d);
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

// Every (dtype, padded width) pair: one narrow_<dtype>_d<D>.cu each; the float
// files also hold the bfloat16/float16 storage variants of their width.
#define SN_NARROW_FOR_EACH(X) \
  X(float, 4) X(float, 8) X(float, 16) X(float, 32) X(float, 64) \
  X(double, 4) X(double, 8) X(double, 16) X(double, 32) X(double, 64)
#define SN_NARROW_WIDTHS(X) X(4) X(8) X(16) X(32) X(64)

#if !defined(SN_CPU_EMULATION)
#define SN_NARROW_EXTERN(T, D) extern template KernelTable<T, T> kernel_table<T, T, D>();
#define SN_NARROW_EXTERN_REDUCED(D)                                              \
  extern template KernelTable<float, bf16_t> kernel_table<float, bf16_t, D>(); \
  extern template KernelTable<float, fp16_t> kernel_table<float, fp16_t, D>();
SN_NARROW_FOR_EACH(SN_NARROW_EXTERN)
SN_NARROW_WIDTHS(SN_NARROW_EXTERN_REDUCED)
#undef SN_NARROW_EXTERN
#undef SN_NARROW_EXTERN_REDUCED
#endif

// Calls fn(Tag{}) with Tag::compute the kernels' compute type and Tag::storage
// their storage type for the element type `t`: float32/float64 as themselves,
// bfloat16/float16 as float over 16-bit storage. Other types: false.
template <typename T, typename S>
struct Types {
  using compute = T;
  using storage = S;
};
template <typename F>
bool with_types(at::ScalarType t, F&& fn) {
  switch (t) {
    case at::kFloat:
      return fn(Types<float, float>{});
    case at::kDouble:
      return fn(Types<double, double>{});
    case at::kBFloat16:
      return fn(Types<float, StorageOf<at::BFloat16>::type>{});
    case at::kHalf:
      return fn(Types<float, StorageOf<at::Half>::type>{});
    default:
      return false;
  }
}

}  // namespace narrow

bool narrow_forward(Arch arch, const at::Tensor& in0, const at::Tensor& in1, const at::Tensor& W,
                    const at::Tensor& b, double h, Act act, const at::Tensor& out0,
                    const at::Tensor& out1, const at::Tensor& states) {
  return narrow::with_types(in0.scalar_type(), [&](auto types) {
    using Ty = decltype(types);
    return narrow::with_width(in0.size(1), [&](auto width) {
      return narrow::forward_impl<typename Ty::compute, typename Ty::storage,
                                  decltype(width)::value>(arch, in0, in1, W, b, h, act, out0,
                                                          out1, states);
    });
  });
}

bool narrow_backward(Arch arch, bool reversible, bool antisym, const at::Tensor& g0,
                     const at::Tensor& g1, const at::Tensor& states, const at::Tensor& s0,
                     const at::Tensor& s1, const at::Tensor& W, const at::Tensor& b, double h,
                     Act act, const at::Tensor& grad0, const at::Tensor& grad1,
                     const at::Tensor& dW, const at::Tensor& db, const at::Tensor& r0,
                     const at::Tensor& r1) {
  return narrow::with_types(g0.scalar_type(), [&](auto types) {
    using Ty = decltype(types);
    return narrow::with_width(g0.size(1), [&](auto width) {
      return narrow::backward_impl<typename Ty::compute, typename Ty::storage,
                                   decltype(width)::value>(arch, reversible, antisym, g0, g1,
                                                           states, s0, s1, W, b, h, act, grad0,
                                                           grad1, dW, db, r0, r1);
    });
  });
}

}  // namespace cuda_detail
}  // namespace stablenets
