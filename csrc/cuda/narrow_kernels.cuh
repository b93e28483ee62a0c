// Device code of the narrow regime (d <= kNarrowMax): the whole stack in one
// launch. Host-side planning and launching live in narrow_host.h.
//
// Each block owns a tile of R rows and walks all N layers over it, so the
// state never leaves the chip between layers. Layer weights (K_j, b_j) stream
// through a ring of shared-memory stages filled with cp.async ahead of use;
// when the whole weight stack fits (small d) every layer is requested up front.
//
// Inside a block, d is padded to a compile-time width D (4, 8, 16, 32, 64).
// Thread (tr, tc) owns rows r = tr + k*RG (k < RPT) and features
// f = tc + m*TPR (m < OPT) of the tile: it keeps its share of every carried
// state in registers and publishes what other threads need (the layer input,
// activations, gradients of pre-activations) in shared-memory tiles with an
// odd row stride D+1, which keeps the access patterns below free of bank
// conflicts. Padded features and rows past the batch are held at exactly 0.
//
// Backward: the adjoint recursion runs the same way, layers in reverse. Weight
// and bias gradients are reduced over the tile in registers (split over C row
// chunks, then a warp shuffle), accumulated per block into a partial buffer
// (gridDim.x, N, d, d+1) in a fixed order, and summed over blocks by a second
// small kernel: deterministic for both dtypes, no atomics.
//
// Compute type T (float, double) and storage type S: what the kernels read
// and write in global memory (inputs, outputs, stored states, gradients).
// S = T, or S = bfloat16/float16 with T = float: reduced-precision storage,
// converted to float on load and rounded (to nearest even) on store, while
// every product, the carried state, the adjoint and the weight-gradient
// partials stay in float, and the weights arrive in float (converted once by
// the host). Between the chunks of a deep backward the adjoints and rebuilt
// states travel in float scratch (Params::xf*, outf*, carry_*), never in S.
#pragma once

#if defined(__CUDACC__)
#include <cuda_pipeline.h>
#endif
#if defined(SN_CPU_EMULATION)
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include <cstdint>
#include <type_traits>

#include "stablenets/activation.h"

namespace stablenets {
namespace cuda_detail {
namespace narrow {

// The reduced storage types the kernels see: the CUDA types on the device,
// c10's (same layout: 16 bits) in the CPU emulator.
#if defined(SN_CPU_EMULATION)
using bf16_t = c10::BFloat16;
using fp16_t = c10::Half;
#else
using bf16_t = __nv_bfloat16;
using fp16_t = __half;
#endif

// Global memory of type M <-> compute type T. The generic case converts with
// a cast (M = T, and the emulator's c10 types, which round to nearest even);
// the CUDA 16-bit types through their intrinsics (torch builds with the
// implicit conversions of cuda_bf16.h / cuda_fp16.h switched off).
template <typename M>
struct Mem {
  template <typename T>
  static __device__ __forceinline__ T get(M x) {
    return static_cast<T>(x);
  }
  template <typename T>
  static __device__ __forceinline__ M put(T x) {
    return static_cast<M>(x);
  }
};
#if !defined(SN_CPU_EMULATION)
template <>
struct Mem<__nv_bfloat16> {
  template <typename T>
  static __device__ __forceinline__ T get(__nv_bfloat16 x) {
    return static_cast<T>(__bfloat162float(x));
  }
  template <typename T>
  static __device__ __forceinline__ __nv_bfloat16 put(T x) {
    return __float2bfloat16_rn(static_cast<float>(x));
  }
};
template <>
struct Mem<__half> {
  template <typename T>
  static __device__ __forceinline__ T get(__half x) {
    return static_cast<T>(__half2float(x));
  }
  template <typename T>
  static __device__ __forceinline__ __half put(T x) {
    return __float2half_rn(static_cast<float>(x));
  }
};
#endif

// Compile-time tiling for padded width D.
template <int D>
struct Cfg {
  static constexpr int NT = D >= 64 ? 256 : 128;           // threads per block
  static constexpr int OPT = 4;                            // features per thread
  static constexpr int TPR = D / OPT;                      // threads sharing a row
  static constexpr int RPT = (D <= 8 || D >= 64) ? 1 : 2;  // rows per thread
  static constexpr int RG = NT / TPR;                      // row groups
  static constexpr int R = RG * RPT;                       // rows per tile
  static constexpr int LD = D + 1;                         // shared row stride (odd)
  static constexpr int TILE = R * LD;                      // elements of one tile array
  static constexpr int STAGE = D * LD + D;                 // one layer: K_j then b_j
  // Weight-gradient tiling: entry tiles of OT x IT (interleaved) entries,
  // each summed over C row chunks by C adjacent lanes.
  static constexpr int OT = D >= 16 ? 4 : (D == 8 ? 2 : 1);
  static constexpr int IT = 4;
  static constexpr int ET = (D / OT) * (D / IT);
  static constexpr int C = ET >= NT ? 1 : NT / ET;
  static constexpr int ETPT = ET >= NT ? ET / NT : 1;  // entry tiles per thread
  static constexpr int RPC = R / C;                    // rows per chunk
  static_assert(D % OPT == 0 && NT % TPR == 0, "bad feature split");
  static_assert(C <= 32 && (C & (C - 1)) == 0 && R % C == 0, "bad chunking");
  static_assert(ET % NT == 0 || NT % ET == 0, "bad entry split");
};

template <typename T, int D>
using Regs = T[Cfg<D>::RPT][Cfg<D>::OPT];

// S: the storage type (see the top of this file); W, bias, partial, h and the
// chunk scratch are in the compute type T.
template <typename T, typename S = T>
struct Params {
  const S* x0;  // forward: carried inputs; backward: incoming gradients
  const S* x1;
  const T* xf0;  // chunked backward, below the top chunk: the adjoints the chunk above
  const T* xf1;  // left (2 x (B, d)), read instead of x0/x1
  const S* s0;   // reversible backward: the forward's outputs
  const S* s1;
  const T* carry_in;  // reversible, chunked, below the top chunk: (2, B, d) rebuilt carried
                      // states of the chunk above, read instead of s0/s1
  const S* st;  // stored backward: states (N, S, B, d)
  S* st_out;    // forward: states to fill, or null
  T* carry_out;  // reversible chunked backward: (2, B, d) for the rebuilt carried states
                 // after the chunk's last layer, or null
  const T* W;
  const T* bias;
  S* out0;
  S* out1;
  T* outf0;  // chunked backward, above the bottom chunk: the adjoints for the chunk
  T* outf1;  // below, written instead of out0/out1
  T* partial;  // backward: (gridDim.x, N, d, d + 1), column d holds the bias part
  S* rebuilt0;  // reversible backward: the rebuilt forward inputs (Y_0, Y_{-1} / Z_{-1/2})
  S* rebuilt1;
  int64_t B;
  int64_t ntiles;
  int d;
  int N;
  int nst;  // weight stages in shared memory (>= 2)
  T h;
  Act act;
};

// (B, d) slice `slot` of layer j in a states tensor (N, S, B, d).
template <typename T>
__device__ __forceinline__ T* state_slot(T* st, int j, int slot, int S, int64_t B, int d) {
  return st + (static_cast<int64_t>(j) * S + slot) * B * d;
}
template <typename T>
__device__ __forceinline__ const T* state_slot(const T* st, int j, int slot, int S, int64_t B,
                                               int d) {
  return st + (static_cast<int64_t>(j) * S + slot) * B * d;
}

// A thread's share of a (rows x features) tile.
template <typename T, int D>
struct Frag {
  using C = Cfg<D>;
  int tr, tc, d;
  int64_t row0;
  bool ok[C::RPT][C::OPT];

  __device__ __forceinline__ void init(int64_t tile, int64_t B, int d_) {
    d = d_;
    tr = threadIdx.x / C::TPR;
    tc = threadIdx.x % C::TPR;
    row0 = tile * C::R;
#pragma unroll
    for (int k = 0; k < C::RPT; ++k)
#pragma unroll
      for (int m = 0; m < C::OPT; ++m) ok[k][m] = (row0 + r(k) < B) && (f(m) < d);
  }
  __device__ __forceinline__ int r(int k) const { return tr + k * C::RG; }
  __device__ __forceinline__ int f(int m) const { return tc + m * C::TPR; }
  __device__ __forceinline__ int64_t g(int k, int m) const { return (row0 + r(k)) * d + f(m); }
  // From / to global memory of type M (the storage type, or T for scratch).
  template <typename M>
  __device__ __forceinline__ void load(const M* src, Regs<T, D>& x) const {
#pragma unroll
    for (int k = 0; k < C::RPT; ++k)
#pragma unroll
      for (int m = 0; m < C::OPT; ++m)
        x[k][m] = ok[k][m] ? Mem<M>::template get<T>(src[g(k, m)]) : T(0);
  }
  template <typename M>
  __device__ __forceinline__ void store(M* dst, const Regs<T, D>& x) const {
#pragma unroll
    for (int k = 0; k < C::RPT; ++k)
#pragma unroll
      for (int m = 0; m < C::OPT; ++m)
        if (ok[k][m]) dst[g(k, m)] = Mem<M>::template put<T>(x[k][m]);
  }
  // The scratch `f` (type T) when given, else the storage `s`: one pointer
  // select when they have the same type, so those kernels load and store once.
  template <typename M>
  __device__ __forceinline__ void load(const T* f, const M* s, Regs<T, D>& x) const {
    if constexpr (std::is_same_v<M, T>) {
      load(f ? f : s, x);
    } else if (f) {
      load(f, x);
    } else {
      load(s, x);
    }
  }
  template <typename M>
  __device__ __forceinline__ void store(T* f, M* s, const Regs<T, D>& x) const {
    if constexpr (std::is_same_v<M, T>) {
      store(f ? f : s, x);
    } else if (f) {
      store(f, x);
    } else {
      store(s, x);
    }
  }
  static __device__ __forceinline__ void copy(Regs<T, D>& dst, const Regs<T, D>& src) {
#pragma unroll
    for (int k = 0; k < C::RPT; ++k)
#pragma unroll
      for (int m = 0; m < C::OPT; ++m) dst[k][m] = src[k][m];
  }
  // Publish into a shared tile; entries outside the stack are written as 0.
  __device__ __forceinline__ void put(T* tile, const Regs<T, D>& x) const {
#pragma unroll
    for (int k = 0; k < C::RPT; ++k)
#pragma unroll
      for (int m = 0; m < C::OPT; ++m) tile[r(k) * C::LD + f(m)] = ok[k][m] ? x[k][m] : T(0);
  }
};

// acc[r][f] = sum_i S[r][i] K[f][i]     (S K^T)
template <typename T, int D>
__device__ __forceinline__ void prod_kt(const Frag<T, D>& fr, const T* S, const T* K,
                                        Regs<T, D>& acc) {
  using C = Cfg<D>;
#pragma unroll
  for (int k = 0; k < C::RPT; ++k)
#pragma unroll
    for (int m = 0; m < C::OPT; ++m) acc[k][m] = T(0);
#pragma unroll 8
  for (int i = 0; i < D; ++i) {
    T s[C::RPT], w[C::OPT];
#pragma unroll
    for (int k = 0; k < C::RPT; ++k) s[k] = S[fr.r(k) * C::LD + i];
#pragma unroll
    for (int m = 0; m < C::OPT; ++m) w[m] = K[fr.f(m) * C::LD + i];
#pragma unroll
    for (int k = 0; k < C::RPT; ++k)
#pragma unroll
      for (int m = 0; m < C::OPT; ++m) acc[k][m] += s[k] * w[m];
  }
}

// acc[r][f] = sum_o S[r][o] K[o][f]     (S K)
template <typename T, int D>
__device__ __forceinline__ void prod_k(const Frag<T, D>& fr, const T* S, const T* K,
                                       Regs<T, D>& acc) {
  using C = Cfg<D>;
#pragma unroll
  for (int k = 0; k < C::RPT; ++k)
#pragma unroll
    for (int m = 0; m < C::OPT; ++m) acc[k][m] = T(0);
#pragma unroll 8
  for (int o = 0; o < D; ++o) {
    T s[C::RPT], w[C::OPT];
#pragma unroll
    for (int k = 0; k < C::RPT; ++k) s[k] = S[fr.r(k) * C::LD + o];
#pragma unroll
    for (int m = 0; m < C::OPT; ++m) w[m] = K[o * C::LD + fr.f(m)];
#pragma unroll
    for (int k = 0; k < C::RPT; ++k)
#pragma unroll
      for (int m = 0; m < C::OPT; ++m) acc[k][m] += s[k] * w[m];
  }
}

// Per-layer weight/bias gradient of one tile, held in registers.
template <typename T, int D>
struct DK {
  using C = Cfg<D>;
  T w[C::ETPT][C::OT][C::IT];
  T b[C::ETPT][C::OT];
  int c, et0;

  __device__ __forceinline__ void init() {
    c = threadIdx.x % C::C;
    et0 = threadIdx.x / C::C;
    clear();
  }
  __device__ __forceinline__ void clear() {
#pragma unroll
    for (int t = 0; t < C::ETPT; ++t)
#pragma unroll
      for (int a = 0; a < C::OT; ++a) {
        b[t][a] = T(0);
#pragma unroll
        for (int q = 0; q < C::IT; ++q) w[t][a][q] = T(0);
      }
  }
  __device__ __forceinline__ int et(int t) const { return et0 + t * (C::NT / C::C); }
  __device__ __forceinline__ int o(int t, int a) const {
    return et(t) / (D / C::IT) + a * (D / C::OT);
  }
  __device__ __forceinline__ int i(int t, int q) const {
    return et(t) % (D / C::IT) + q * (D / C::IT);
  }
  // w[o][i] += sum_r A[r][o] Bm[r][i]
  __device__ __forceinline__ void add(const T* A, const T* Bm) {
#pragma unroll 4
    for (int p = 0; p < C::RPC; ++p) {
      const int r = c + p * C::C;
#pragma unroll
      for (int t = 0; t < C::ETPT; ++t) {
        T av[C::OT], bv[C::IT];
#pragma unroll
        for (int a = 0; a < C::OT; ++a) av[a] = A[r * C::LD + o(t, a)];
#pragma unroll
        for (int q = 0; q < C::IT; ++q) bv[q] = Bm[r * C::LD + i(t, q)];
#pragma unroll
        for (int a = 0; a < C::OT; ++a)
#pragma unroll
          for (int q = 0; q < C::IT; ++q) w[t][a][q] += av[a] * bv[q];
      }
    }
  }
  // b[o] += sum_r G[r][o]
  __device__ __forceinline__ void add_sum(const T* G) {
#pragma unroll 4
    for (int p = 0; p < C::RPC; ++p) {
      const int r = c + p * C::C;
#pragma unroll
      for (int t = 0; t < C::ETPT; ++t)
#pragma unroll
        for (int a = 0; a < C::OT; ++a) b[t][a] += G[r * C::LD + o(t, a)];
    }
  }
  // Sum over the C chunk lanes, then fold into this block's partial of one
  // layer (dst: d x (d+1)); `first` overwrites instead of adding.
  __device__ __forceinline__ void flush(T* dst, int d, bool first) {
    if (C::C > 1) {
#pragma unroll
      for (int off = C::C / 2; off > 0; off >>= 1) {
#pragma unroll
        for (int t = 0; t < C::ETPT; ++t)
#pragma unroll
          for (int a = 0; a < C::OT; ++a) {
            b[t][a] += __shfl_xor_sync(0xffffffffu, b[t][a], off);
#pragma unroll
            for (int q = 0; q < C::IT; ++q)
              w[t][a][q] += __shfl_xor_sync(0xffffffffu, w[t][a][q], off);
          }
      }
    }
    if (c == 0) {
#pragma unroll
      for (int t = 0; t < C::ETPT; ++t)
#pragma unroll
        for (int a = 0; a < C::OT; ++a) {
          const int oo = o(t, a);
          if (oo < d) {
            T* row = dst + oo * (d + 1);
#pragma unroll
            for (int q = 0; q < C::IT; ++q) {
              const int ii = i(t, q);
              if (ii < d) row[ii] = first ? w[t][a][q] : row[ii] + w[t][a][q];
            }
            if (et(t) % (D / C::IT) == 0) row[d] = first ? b[t][a] : row[d] + b[t][a];
          }
        }
    }
    clear();
  }
};

// Ring of shared-memory stages holding (K_j, b_j), filled by cp.async.
// Step s uses layer s (forward) or N-1-s (reverse). Every step starts with
// begin(s), whose barrier also separates consecutive steps.
template <typename T, int D>
struct WPipe {
  using C = Cfg<D>;
  T* base;
  const T* W;
  const T* bias;
  int d, N, nst;
  bool rev;

  __device__ __forceinline__ T* slot(int s) const { return base + (s % nst) * C::STAGE; }

  // Padded entries are never copied into, so zero them once per launch.
  __device__ void zero_padding() const {
    if (d == D) return;
    for (int e = threadIdx.x; e < nst * C::STAGE; e += C::NT) {
      const int q = e % C::STAGE;
      bool pad;
      if (q < D * C::LD) {
        const int o = q / C::LD, i = q - o * C::LD;
        pad = i < D && (o >= d || i >= d);
      } else {
        pad = q - D * C::LD >= d;
      }
      if (pad) base[e] = T(0);
    }
  }
  __device__ __forceinline__ void issue(int s) const {
    if (s < N) {
      const int j = rev ? N - 1 - s : s;
      T* dst = slot(s);
      const T* src = W + static_cast<int64_t>(j) * d * d;
      const int dd = d * d;
      for (int e = threadIdx.x; e < dd; e += C::NT) {
        const int o = e / d, i = e - o * d;
        __pipeline_memcpy_async(dst + o * C::LD + i, src + e, sizeof(T));
      }
      const T* bs = bias + static_cast<int64_t>(j) * d;
      for (int e = threadIdx.x; e < d; e += C::NT)
        __pipeline_memcpy_async(dst + D * C::LD + e, bs + e, sizeof(T));
    }
    __pipeline_commit();
  }
  __device__ __forceinline__ void prologue() const {
    for (int s = 0; s < nst - 1; ++s) issue(s);
  }
  // Waits for step s's weights; after the barrier every thread has finished
  // step s-1, so the stage it used can be refilled.
  __device__ __forceinline__ const T* begin(int s) const {
    __pipeline_wait_prior(nst - 2);
    __syncthreads();
    issue(s + nst - 1);
    return slot(s);
  }
};

// Dynamic shared memory as T* sm (the CPU emulator used in development
// defines its own).
#ifndef SN_SMEM_BASE
#define SN_SMEM_BASE                                           \
  extern __shared__ __align__(16) unsigned char sn_smem_raw[]; \
  T* const sm = reinterpret_cast<T*>(sn_smem_raw)
#endif

// ------------------------------------------------------------------ forward

template <typename T, typename S, int D>
__global__ void __launch_bounds__(Cfg<D>::NT) k_fwd_resnet(const Params<T, S> p) {
  using C = Cfg<D>;
  SN_SMEM_BASE;
  const WPipe<T, D> pipe{sm, p.W, p.bias, p.d, p.N, p.nst, false};
  T* const Ys = sm + p.nst * C::STAGE;
  pipe.zero_padding();
  Frag<T, D> fr;
  fr.init(blockIdx.x, p.B, p.d);
  Regs<T, D> y, acc;
  fr.load(p.x0, y);
  fr.put(Ys, y);
  pipe.prologue();
  for (int j = 0; j < p.N; ++j) {
    const T* K = pipe.begin(j);
    const T* bj = K + D * C::LD;
    prod_kt(fr, Ys, K, acc);
#pragma unroll
    for (int k = 0; k < C::RPT; ++k)
#pragma unroll
      for (int m = 0; m < C::OPT; ++m) acc[k][m] += bj[fr.f(m)];
    if (p.st_out) {
      fr.store(state_slot(p.st_out, j, 0, 2, p.B, p.d), y);
      fr.store(state_slot(p.st_out, j, 1, 2, p.B, p.d), acc);
    }
#pragma unroll
    for (int k = 0; k < C::RPT; ++k)
#pragma unroll
      for (int m = 0; m < C::OPT; ++m)
        y[k][m] = fr.ok[k][m] ? y[k][m] + p.h * act_fwd(p.act, acc[k][m]) : T(0);
    __syncthreads();  // everyone has read Ys
    fr.put(Ys, y);
  }
  fr.store(p.out0, y);
}

template <typename T, typename S, int D>
__global__ void __launch_bounds__(Cfg<D>::NT) k_fwd_leapfrog(const Params<T, S> p) {
  using C = Cfg<D>;
  SN_SMEM_BASE;
  const WPipe<T, D> pipe{sm, p.W, p.bias, p.d, p.N, p.nst, false};
  T* const Ys = sm + p.nst * C::STAGE;
  T* const As = Ys + C::TILE;
  pipe.zero_padding();
  Frag<T, D> fr;
  fr.init(blockIdx.x, p.B, p.d);
  Regs<T, D> y, yp, acc;
  fr.load(p.x0, y);
  fr.load(p.x1, yp);
  fr.put(Ys, y);
  pipe.prologue();
  const T mh2 = -p.h * p.h;
  for (int j = 0; j < p.N; ++j) {
    const T* K = pipe.begin(j);
    const T* bj = K + D * C::LD;
    prod_kt(fr, Ys, K, acc);
#pragma unroll
    for (int k = 0; k < C::RPT; ++k)
#pragma unroll
      for (int m = 0; m < C::OPT; ++m) acc[k][m] += bj[fr.f(m)];
    if (p.st_out) {
      fr.store(state_slot(p.st_out, j, 0, 2, p.B, p.d), y);
      fr.store(state_slot(p.st_out, j, 1, 2, p.B, p.d), acc);
    }
#pragma unroll
    for (int k = 0; k < C::RPT; ++k)
#pragma unroll
      for (int m = 0; m < C::OPT; ++m) acc[k][m] = act_fwd(p.act, acc[k][m]);
    fr.put(As, acc);
    __syncthreads();  // As complete; everyone has read Ys
    prod_k(fr, As, K, acc);
#pragma unroll
    for (int k = 0; k < C::RPT; ++k)
#pragma unroll
      for (int m = 0; m < C::OPT; ++m) {
        const T yn = T(2) * y[k][m] - yp[k][m] + mh2 * acc[k][m];
        yp[k][m] = y[k][m];
        y[k][m] = fr.ok[k][m] ? yn : T(0);
      }
    fr.put(Ys, y);
  }
  fr.store(p.out0, y);
  fr.store(p.out1, yp);
}

template <typename T, typename S, int D>
__global__ void __launch_bounds__(Cfg<D>::NT) k_fwd_verlet(const Params<T, S> p) {
  using C = Cfg<D>;
  SN_SMEM_BASE;
  const WPipe<T, D> pipe{sm, p.W, p.bias, p.d, p.N, p.nst, false};
  T* const Ys = sm + p.nst * C::STAGE;
  T* const Zs = Ys + C::TILE;
  pipe.zero_padding();
  Frag<T, D> fr;
  fr.init(blockIdx.x, p.B, p.d);
  Regs<T, D> y, z, p1, acc;
  fr.load(p.x0, y);
  fr.load(p.x1, z);
  fr.put(Ys, y);
  pipe.prologue();
  for (int j = 0; j < p.N; ++j) {
    const T* K = pipe.begin(j);
    const T* bj = K + D * C::LD;
    prod_k(fr, Ys, K, p1);  // P1 = Y K + b
#pragma unroll
    for (int k = 0; k < C::RPT; ++k)
#pragma unroll
      for (int m = 0; m < C::OPT; ++m) {
        p1[k][m] += bj[fr.f(m)];
        z[k][m] = fr.ok[k][m] ? z[k][m] - p.h * act_fwd(p.act, p1[k][m]) : T(0);
      }
    fr.put(Zs, z);
    __syncthreads();          // Zs complete; everyone has read Ys
    prod_kt(fr, Zs, K, acc);  // P2 = Z K^T + b
#pragma unroll
    for (int k = 0; k < C::RPT; ++k)
#pragma unroll
      for (int m = 0; m < C::OPT; ++m) acc[k][m] += bj[fr.f(m)];
    if (p.st_out) {
      fr.store(state_slot(p.st_out, j, 0, 4, p.B, p.d), y);
      fr.store(state_slot(p.st_out, j, 1, 4, p.B, p.d), p1);
      fr.store(state_slot(p.st_out, j, 2, 4, p.B, p.d), z);
      fr.store(state_slot(p.st_out, j, 3, 4, p.B, p.d), acc);
    }
#pragma unroll
    for (int k = 0; k < C::RPT; ++k)
#pragma unroll
      for (int m = 0; m < C::OPT; ++m)
        y[k][m] = fr.ok[k][m] ? y[k][m] + p.h * act_fwd(p.act, acc[k][m]) : T(0);
    fr.put(Ys, y);
  }
  fr.store(p.out0, y);
  fr.store(p.out1, z);
}

// ----------------------------------------------------------------- backward

template <typename T, typename S>
__device__ __forceinline__ T* layer_partial(const Params<T, S>& p, int j) {
  return p.partial + (static_cast<int64_t>(blockIdx.x) * p.N + j) * p.d * (p.d + 1);
}

template <typename T, typename S, int D>
__global__ void __launch_bounds__(Cfg<D>::NT) k_bwd_resnet(const Params<T, S> p) {
  using C = Cfg<D>;
  SN_SMEM_BASE;
  const WPipe<T, D> pipe{sm, p.W, p.bias, p.d, p.N, p.nst, true};
  T* const Ys = sm + p.nst * C::STAGE;
  T* const Gs = Ys + C::TILE;
  pipe.zero_padding();
  DK<T, D> dk;
  dk.init();
  for (int64_t tile = blockIdx.x; tile < p.ntiles; tile += gridDim.x) {
    const bool first = tile == blockIdx.x;
    __syncthreads();  // the previous tile is done with shared memory
    Frag<T, D> fr;
    fr.init(tile, p.B, p.d);
    Regs<T, D> g, y, pv, acc, y_next, pv_next;
    fr.load(p.xf0, p.x0, g);
    // Stored states are fetched one layer ahead, so their latency hides behind a layer.
    fr.load(state_slot(p.st, p.N - 1, 0, 2, p.B, p.d), y_next);
    fr.load(state_slot(p.st, p.N - 1, 1, 2, p.B, p.d), pv_next);
    pipe.prologue();
    for (int s = 0; s < p.N; ++s) {
      const int j = p.N - 1 - s;
      fr.copy(y, y_next);
      fr.copy(pv, pv_next);
      if (j > 0) {
        fr.load(state_slot(p.st, j - 1, 0, 2, p.B, p.d), y_next);
        fr.load(state_slot(p.st, j - 1, 1, 2, p.B, p.d), pv_next);
      }
      const T* K = pipe.begin(s);
#pragma unroll
      for (int k = 0; k < C::RPT; ++k)
#pragma unroll
        for (int m = 0; m < C::OPT; ++m) acc[k][m] = p.h * g[k][m] * act_grad(p.act, pv[k][m]);
      fr.put(Gs, acc);
      fr.put(Ys, y);
      __syncthreads();
      prod_k(fr, Gs, K, acc);  // g += G K
#pragma unroll
      for (int k = 0; k < C::RPT; ++k)
#pragma unroll
        for (int m = 0; m < C::OPT; ++m) g[k][m] = fr.ok[k][m] ? g[k][m] + acc[k][m] : T(0);
      dk.add(Gs, Ys);
      dk.add_sum(Gs);
      dk.flush(layer_partial(p, j), p.d, first);
    }
    fr.store(p.outf0, p.out0, g);
  }
}

// (a, c) = (dL/dY_{j+1}, dL/dY_j); see csrc/cpu/leapfrog.cpp for the algebra.
template <typename T, typename S, int D, bool REV>
__global__ void __launch_bounds__(Cfg<D>::NT) k_bwd_leapfrog(const Params<T, S> p) {
  using C = Cfg<D>;
  SN_SMEM_BASE;
  const WPipe<T, D> pipe{sm, p.W, p.bias, p.d, p.N, p.nst, true};
  T* const Y0s = sm + p.nst * C::STAGE;
  T* const Y1s = Y0s + C::TILE;  // reversible: Y tiles alternate between steps
  T* const Ls = Y1s + C::TILE;
  T* const As = Ls + C::TILE;
  T* const Gs = As + C::TILE;
  pipe.zero_padding();
  DK<T, D> dk;
  dk.init();
  const T mh2 = -p.h * p.h;
  for (int64_t tile = blockIdx.x; tile < p.ntiles; tile += gridDim.x) {
    const bool first = tile == blockIdx.x;
    __syncthreads();
    Frag<T, D> fr;
    fr.init(tile, p.B, p.d);
    Regs<T, D> a, c, yc, ym, pv, acc, yr, ym_next, pv_next;
    fr.load(p.xf0, p.x0, a);
    fr.load(p.xf1, p.x1, c);
    if (REV) {
      fr.load(p.carry_in, p.s0, yc);  // Y_{j+1}
      fr.load(p.carry_in ? p.carry_in + p.B * p.d : nullptr, p.s1, ym);  // Y_j
      fr.put(Y0s, ym);
    } else {  // stored states, fetched one layer ahead
      fr.load(state_slot(p.st, p.N - 1, 0, 2, p.B, p.d), ym_next);
      fr.load(state_slot(p.st, p.N - 1, 1, 2, p.B, p.d), pv_next);
    }
    pipe.prologue();
    for (int s = 0; s < p.N; ++s) {
      const int j = p.N - 1 - s;
      T* const Ycur = (REV && (s & 1)) ? Y1s : Y0s;
      T* const Ynext = (s & 1) ? Y0s : Y1s;
      if (!REV) {
        fr.copy(ym, ym_next);
        fr.copy(pv, pv_next);
        if (j > 0) {
          fr.load(state_slot(p.st, j - 1, 0, 2, p.B, p.d), ym_next);
          fr.load(state_slot(p.st, j - 1, 1, 2, p.B, p.d), pv_next);
        }
      }
      const T* K = pipe.begin(s);
      const T* bj = K + D * C::LD;
      if (REV) {
        prod_kt(fr, Ycur, K, pv);  // P_j = Y_j K^T + b
#pragma unroll
        for (int k = 0; k < C::RPT; ++k)
#pragma unroll
          for (int m = 0; m < C::OPT; ++m) pv[k][m] += bj[fr.f(m)];
      } else {
        fr.put(Ycur, ym);
      }
#pragma unroll
      for (int k = 0; k < C::RPT; ++k)
#pragma unroll
        for (int m = 0; m < C::OPT; ++m) {
          const T pre = pv[k][m];
          pv[k][m] = act_fwd(p.act, pre);  // from here on pv holds act(P)
          yr[k][m] = act_grad_pa(p.act, pre, pv[k][m]);  // act'(P); yr is free until below
          acc[k][m] = mh2 * pv[k][m];
        }
      fr.put(As, acc);  // -h^2 act(P)
      fr.put(Ls, a);    // lam
      __syncthreads();
      prod_kt(fr, Ls, K, acc);  // lam K^T
#pragma unroll
      for (int k = 0; k < C::RPT; ++k)
#pragma unroll
        for (int m = 0; m < C::OPT; ++m) acc[k][m] *= mh2 * yr[k][m];
      fr.put(Gs, acc);
      if (REV) {
        prod_k(fr, As, K, yr);  // Y_{j-1} = 2 Y_j - Y_{j+1} - h^2 act(P) K
#pragma unroll
        for (int k = 0; k < C::RPT; ++k)
#pragma unroll
          for (int m = 0; m < C::OPT; ++m)
            yr[k][m] = fr.ok[k][m] ? T(2) * ym[k][m] - yc[k][m] + yr[k][m] : T(0);
      }
      __syncthreads();
      prod_k(fr, Gs, K, acc);  // G K
#pragma unroll
      for (int k = 0; k < C::RPT; ++k)
#pragma unroll
        for (int m = 0; m < C::OPT; ++m) {
          const T an = c[k][m] + T(2) * a[k][m] + acc[k][m];
          c[k][m] = fr.ok[k][m] ? -a[k][m] : T(0);
          a[k][m] = fr.ok[k][m] ? an : T(0);
        }
      dk.add(As, Ls);
      dk.add(Gs, Ycur);
      dk.add_sum(Gs);
      dk.flush(layer_partial(p, j), p.d, first);
      if (REV) {
        fr.put(Ynext, yr);
#pragma unroll
        for (int k = 0; k < C::RPT; ++k)
#pragma unroll
          for (int m = 0; m < C::OPT; ++m) {
            yc[k][m] = ym[k][m];
            ym[k][m] = yr[k][m];
          }
      }
    }
    if (REV && p.carry_out) {  // (Y_j, Y_{j-1}) of the last layer done, for the next chunk
      fr.store(p.carry_out, yc);
      fr.store(p.carry_out + p.B * p.d, ym);
    }
    fr.store(p.outf0, p.out0, a);
    fr.store(p.outf1, p.out1, c);
    if (REV) {  // (Y_0, Y_{-1}): the caller compares them with the forward's inputs
      fr.store(p.rebuilt0, yc);
      fr.store(p.rebuilt1, ym);
    }
  }
}

// (ly, lz) = (dL/dY_{j+1}, dL/dZ_{j+1/2}); see csrc/cpu/verlet.cpp.
template <typename T, typename S, int D, bool REV>
__global__ void __launch_bounds__(Cfg<D>::NT) k_bwd_verlet(const Params<T, S> p) {
  using C = Cfg<D>;
  SN_SMEM_BASE;
  const WPipe<T, D> pipe{sm, p.W, p.bias, p.d, p.N, p.nst, true};
  T* const Ys = sm + p.nst * C::STAGE;
  T* const Z0s = Ys + C::TILE;
  T* const Z1s = Z0s + C::TILE;  // reversible: Z tiles alternate between steps
  T* const G2s = Z1s + C::TILE;
  T* const G1s = G2s + C::TILE;
  pipe.zero_padding();
  DK<T, D> dk;
  dk.init();
  for (int64_t tile = blockIdx.x; tile < p.ntiles; tile += gridDim.x) {
    const bool first = tile == blockIdx.x;
    __syncthreads();
    Frag<T, D> fr;
    fr.init(tile, p.B, p.d);
    Regs<T, D> ly, lz, y, z, yj, p1, p2, acc;
    Regs<T, D> yj_next, p1_next, z_next, p2_next;
    fr.load(p.xf0, p.x0, ly);
    fr.load(p.xf1, p.x1, lz);
    if (REV) {
      fr.load(p.carry_in, p.s0, y);                                     // Y_{j+1}
      fr.load(p.carry_in ? p.carry_in + p.B * p.d : nullptr, p.s1, z);  // Z_{j+1/2}
      fr.put(Z0s, z);
    } else {  // stored states, fetched one layer ahead
      fr.load(state_slot(p.st, p.N - 1, 0, 4, p.B, p.d), yj_next);
      fr.load(state_slot(p.st, p.N - 1, 1, 4, p.B, p.d), p1_next);
      fr.load(state_slot(p.st, p.N - 1, 2, 4, p.B, p.d), z_next);
      fr.load(state_slot(p.st, p.N - 1, 3, 4, p.B, p.d), p2_next);
    }
    pipe.prologue();
    for (int s = 0; s < p.N; ++s) {
      const int j = p.N - 1 - s;
      T* const Zcur = (REV && (s & 1)) ? Z1s : Z0s;
      T* const Znext = (s & 1) ? Z0s : Z1s;
      if (!REV) {
        fr.copy(yj, yj_next);
        fr.copy(p1, p1_next);
        fr.copy(z, z_next);
        fr.copy(p2, p2_next);
        if (j > 0) {
          fr.load(state_slot(p.st, j - 1, 0, 4, p.B, p.d), yj_next);
          fr.load(state_slot(p.st, j - 1, 1, 4, p.B, p.d), p1_next);
          fr.load(state_slot(p.st, j - 1, 2, 4, p.B, p.d), z_next);
          fr.load(state_slot(p.st, j - 1, 3, 4, p.B, p.d), p2_next);
        }
      }
      const T* K = pipe.begin(s);
      const T* bj = K + D * C::LD;
      if (REV) {
        prod_kt(fr, Zcur, K, p2);  // P2 = Z K^T + b;  Y_j = Y_{j+1} - h act(P2)
#pragma unroll
        for (int k = 0; k < C::RPT; ++k)
#pragma unroll
          for (int m = 0; m < C::OPT; ++m) {
            const T pre = p2[k][m] + bj[fr.f(m)];
            const T a = act_fwd(p.act, pre);
            p2[k][m] = act_grad_pa(p.act, pre, a);  // reversible: p2 holds act'(P2)
            yj[k][m] = fr.ok[k][m] ? y[k][m] - p.h * a : T(0);
          }
      } else {
        fr.put(Zcur, z);
      }
      fr.put(Ys, yj);
#pragma unroll
      for (int k = 0; k < C::RPT; ++k)
#pragma unroll
        for (int m = 0; m < C::OPT; ++m)
          acc[k][m] =
              p.h * ly[k][m] * (REV ? p2[k][m] : act_grad(p.act, p2[k][m]));
      fr.put(G2s, acc);
      __syncthreads();
      if (REV) {
        prod_k(fr, Ys, K, p1);  // P1 = Y_j K + b
#pragma unroll
        for (int k = 0; k < C::RPT; ++k)
#pragma unroll
          for (int m = 0; m < C::OPT; ++m) {
            const T pre = p1[k][m] + bj[fr.f(m)];
            p1[k][m] = act_fwd(p.act, pre);              // reversible: act(P1)
            p2[k][m] = act_grad_pa(p.act, pre, p1[k][m]);  // and p2 (free now) act'(P1)
          }
      }
      prod_k(fr, G2s, K, acc);  // lz += G2 K
#pragma unroll
      for (int k = 0; k < C::RPT; ++k)
#pragma unroll
        for (int m = 0; m < C::OPT; ++m) {
          lz[k][m] = fr.ok[k][m] ? lz[k][m] + acc[k][m] : T(0);
          acc[k][m] =
              -p.h * lz[k][m] * (REV ? p2[k][m] : act_grad(p.act, p1[k][m]));
        }
      fr.put(G1s, acc);
      __syncthreads();
      prod_kt(fr, G1s, K, acc);  // ly += G1 K^T
#pragma unroll
      for (int k = 0; k < C::RPT; ++k)
#pragma unroll
        for (int m = 0; m < C::OPT; ++m) ly[k][m] = fr.ok[k][m] ? ly[k][m] + acc[k][m] : T(0);
      dk.add(G2s, Zcur);
      dk.add(Ys, G1s);
      dk.add_sum(G2s);
      dk.add_sum(G1s);
      dk.flush(layer_partial(p, j), p.d, first);
      if (REV) {
        // Z_{j-1/2} = Z_{j+1/2} + h act(P1)
#pragma unroll
        for (int k = 0; k < C::RPT; ++k)
#pragma unroll
          for (int m = 0; m < C::OPT; ++m) {
            z[k][m] = fr.ok[k][m] ? z[k][m] + p.h * p1[k][m] : T(0);
            y[k][m] = yj[k][m];
          }
        fr.put(Znext, z);
      }
    }
    if (REV && p.carry_out) {  // (Y_j, Z_{j-1/2}) of the last layer done, for the next chunk
      fr.store(p.carry_out, y);
      fr.store(p.carry_out + p.B * p.d, z);
    }
    fr.store(p.outf0, p.out0, ly);
    fr.store(p.outf1, p.out1, lz);
    if (REV) {  // (Y_0, Z_{-1/2}): the caller compares them with the forward's inputs
      fr.store(p.rebuilt0, y);
      fr.store(p.rebuilt1, z);
    }
  }
}

// dW, db from the per-block partials (nblk, N, d, d+1), summed in block order
// in T and rounded once to the storage type S.
template <typename T, typename S>
__global__ void k_reduce_partials(const T* __restrict__ partial, int nblk, int N, int d,
                                  bool antisym, S* __restrict__ dW, S* __restrict__ db) {
  const int64_t per = static_cast<int64_t>(d) * (d + 1);
  const int64_t E = per * N;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < E;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = e / per;
    const int rem = static_cast<int>(e - j * per);
    const int o = rem / (d + 1), i = rem - o * (d + 1);
    T s = T(0);
    for (int k = 0; k < nblk; ++k) s += partial[k * E + e];
    if (i == d) {
      db[j * d + o] = Mem<S>::template put<T>(s);
    } else if (!antisym) {
      dW[(j * d + o) * d + i] = Mem<S>::template put<T>(s);
    } else {  // A = (K - K^T - gamma I)/2  =>  dK = (dA - dA^T)/2
      const int64_t et = j * per + static_cast<int64_t>(i) * (d + 1) + o;
      T t = T(0);
      for (int k = 0; k < nblk; ++k) t += partial[k * E + et];
      dW[(j * d + o) * d + i] = Mem<S>::template put<T>(T(0.5) * (s - t));
    }
  }
}

// Host-side handles of the kernels of one (dtype, padded width), which
// narrow_host.h launches. The table's definition (narrow_table.cuh) names the
// kernels and so instantiates them: in the CUDA build that happens only in
// narrow_<dtype>_d<D>.cu, one translation unit per pair, compiled in parallel.
template <typename T, typename S = T>
using KernelFn = void (*)(Params<T, S>);

template <typename T, typename S = T>
struct KernelTable {
  KernelFn<T, S> fwd_resnet, fwd_leapfrog, fwd_verlet;
  KernelFn<T, S> bwd_resnet, bwd_leapfrog, bwd_leapfrog_rev, bwd_verlet, bwd_verlet_rev;
};

template <typename T, typename S, int D>
KernelTable<T, S> kernel_table();

}  // namespace narrow
}  // namespace cuda_detail
}  // namespace stablenets
