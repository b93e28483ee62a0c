// Host interface of the narrow-regime CUDA kernels (csrc/cuda/narrow.cu): the
// whole stack in one launch, each block walking all N layers over its tile of
// rows. Callers (csrc/cuda/stacks.cu) pass checked, contiguous tensors on one
// CUDA device, with the device guard already set.
#pragma once

#include <ATen/ATen.h>

#include "stablenets/activation.h"

namespace stablenets {
namespace cuda_detail {

enum class Arch { ResNet, Leapfrog, Verlet };

// Widest stack the one-launch kernels take; wider stacks run per layer on cuBLAS.
constexpr int64_t kNarrowMax = 64;

// Forward. `in1` is y_prev (leapfrog) or z (verlet), unused for resnet;
// `out1` likewise. `states` is (N, S, B, d) to fill, or undefined for store=False.
// Returns false (and does nothing) when this GPU cannot run the narrow kernel
// for these sizes (shared memory), so the caller takes the wide path.
bool narrow_forward(Arch arch, const at::Tensor& in0, const at::Tensor& in1, const at::Tensor& W,
                    const at::Tensor& b, double h, Act act, const at::Tensor& out0,
                    const at::Tensor& out1, const at::Tensor& states);

// Backward. g0/g1: incoming gradients (g1 unused for resnet). Stored mode reads
// `states`; reversible mode (leapfrog/verlet) rebuilds them from the forward's
// outputs s0/s1 and writes the rebuilt forward inputs to r0/r1 (undefined in
// stored mode). Writes grad0/grad1 (B, d), dW (N, d, d), db (N, d). With
// `antisym`, dW receives (S - S^T) / 2 of the plain weight gradient S.
bool narrow_backward(Arch arch, bool reversible, bool antisym, const at::Tensor& g0,
                     const at::Tensor& g1, const at::Tensor& states, const at::Tensor& s0,
                     const at::Tensor& s1, const at::Tensor& W, const at::Tensor& b, double h,
                     Act act, const at::Tensor& grad0, const at::Tensor& grad1,
                     const at::Tensor& dW, const at::Tensor& db, const at::Tensor& r0 = {},
                     const at::Tensor& r1 = {});

}  // namespace cuda_detail
}  // namespace stablenets
