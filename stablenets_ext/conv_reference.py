"""The convolutional stacks in plain PyTorch, one ATen convolution per layer.

The per-layer twins of the fused ``torch.ops.stablenets.conv_*`` ops (see
:mod:`stablenets_ext.conv` for the maths): tests check the ops against them,
benchmarks time them as the baseline, and :mod:`stablenets_ext.conv` falls back
to them (batch norm, callable activations, devices without a kernel), as
:mod:`stablenets_ext.reference` does for the dense stacks. Their autograd is
also what the fused ops' double backward differentiates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference


def same_padding(weight):
    return weight.shape[-1] // 2


def conv(y, k, b=None):
    """``K y`` (+ b): the convolution with "same" padding."""
    return F.conv2d(y, k, b, padding=same_padding(k))


def conv_t(y, k, b=None):
    """``K^T y`` (+ b): the true adjoint of :func:`conv`."""
    return F.conv_transpose2d(y, k, b, padding=same_padding(k))


def antisymmetric_kernel(weight, gamma):
    """Kernels of ``(K - K^T - gamma I) / 2``: the adjoint of a convolution is the
    convolution with the channel-transposed, spatially flipped kernel."""
    adj = weight.transpose(-4, -3).flip(-1, -2)
    out = 0.5 * (weight - adj)
    c = same_padding(weight)
    eye = torch.eye(weight.shape[-3], dtype=weight.dtype, device=weight.device)
    out[..., c, c] = out[..., c, c] - 0.5 * gamma * eye
    return out


# ------------------------------------------------------------ batch norm


class ConvNorm:
    """Per-layer batch normalisation parameters of a conv stack, as plain tensors
    with the layer index first (so that slicing layers slices them too):
    ``weight``/``bias`` ``(layers, halves, C)``, running ``mean``/``var`` likewise.
    ``halves`` is 2 for Verlet (one normalisation per half step), else 1."""

    def __init__(self, weight, bias, mean, var, training, momentum=0.1, eps=1e-5):
        self.weight, self.bias, self.mean, self.var = weight, bias, mean, var
        self.training, self.momentum, self.eps = training, momentum, eps

    def slice(self, lo, hi):
        """The parameters of layers ``lo .. hi-1`` (views: running statistics still update)."""
        return ConvNorm(self.weight[lo:hi], self.bias[lo:hi], self.mean[lo:hi], self.var[lo:hi],
                        self.training, self.momentum, self.eps)

    def __call__(self, p, j, half=0):
        return F.batch_norm(p, self.mean[j, half], self.var[j, half], self.weight[j, half],
                            self.bias[j, half], self.training, self.momentum, self.eps)


def normalised(p, norm, j, half=0):
    return p if norm is None else norm(p, j, half)


# ------------------------------------------------- per-layer reference twins


def reference_resnet(y, weight, bias, step=0.1, activation="tanh", *, norm=None):
    act = reference.activation_fn(activation)
    for j in range(weight.shape[0]):
        y = y + step * act(normalised(conv(y, weight[j], bias[j]), norm, j))
    return y


def reference_antisymmetric(y, weight, bias, step=0.1, activation="tanh", gamma=0.01, *, norm=None):
    return reference_resnet(y, antisymmetric_kernel(weight, gamma), bias, step, activation, norm=norm)


def reference_leapfrog(y, weight, bias, step=0.1, activation="tanh", y_prev=None, return_state=False,
                       *, norm=None):
    act = reference.activation_fn(activation)
    prev = y if y_prev is None else y_prev
    h2 = step * step
    for j in range(weight.shape[0]):
        a = act(normalised(conv(y, weight[j], bias[j]), norm, j))
        nxt = 2 * y - prev - h2 * conv_t(a, weight[j])
        prev, y = y, nxt
    return (y, prev) if return_state else y


def reference_verlet(y, weight, bias, step=0.1, activation="tanh", z=None, return_state=False,
                     *, norm=None):
    act = reference.activation_fn(activation)
    if z is None:
        z = torch.zeros_like(y)
    for j in range(weight.shape[0]):
        z = z - step * act(normalised(conv(y, weight[j], bias[j]), norm, j, 0))
        y = y + step * act(normalised(conv_t(z, weight[j], bias[j]), norm, j, 1))
    return (y, z) if return_state else y


REFERENCE = {
    "resnet": reference_resnet,
    "antisymmetric": reference_antisymmetric,
    "leapfrog": reference_leapfrog,
    "verlet": reference_verlet,
}
