"""The four stable stacks in plain PyTorch.

Each function mirrors one op of :mod:`stablenets_ext.ops`: same arguments, same
results, differentiated by autograd. Tests check the fused kernels against
these, benchmarks time them as the baseline, and the modules fall back to them
on a device for which no kernel was compiled.

Rows are examples: ``y`` is ``(B, d)``, ``weight`` is ``(N, d, d)`` in the
``nn.Linear`` layout and ``bias`` is ``(N, d)``. The update rules are those of
:mod:`stablenets_ext.layers` (and the README's table). Any activation works here,
a name from :data:`ACTIVATIONS` or a Python callable; any dtype and device
PyTorch supports.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The one list of activation names: the fused kernels (csrc/include/stablenets/
# activation.h), the fake kernels, the modules and the CLI all accept exactly these.
ACTIVATIONS = {
    "tanh": torch.tanh,
    "relu": torch.relu,
    "identity": lambda x: x,
    "sigmoid": torch.sigmoid,
    "softplus": F.softplus,  # beta 1 (PyTorch's threshold 20; the kernels use the exact form)
    "leaky_relu": F.leaky_relu,  # negative slope 0.01, as the kernels
    "silu": F.silu,
}


def activation_fn(activation):
    """The activation function for a name.

    Args:
        activation (str or callable): a name in :data:`ACTIVATIONS`, or a callable
            (``nn.ReLU()``, ``torch.sin``: reference path only), returned as is.

    Returns:
        callable: the function. Raises ValueError for anything else.
    """
    if isinstance(activation, str):
        if activation in ACTIVATIONS:
            return ACTIVATIONS[activation]
    elif callable(activation):
        return activation
    raise ValueError(
        f"activation: expected one of {sorted(ACTIVATIONS)} or a callable, got {activation!r}"
    )


def antisymmetric_weight(weight: torch.Tensor, gamma: float) -> torch.Tensor:
    """``A_j = 0.5 * (K_j - K_j^T - gamma * I)`` for every layer at once.

    Args:
        weight (Tensor): ``(..., d, d)``.
        gamma (float): damping subtracted on the diagonal.

    Returns:
        Tensor: same shape as ``weight``.
    """
    eye = torch.eye(weight.shape[-1], dtype=weight.dtype, device=weight.device)
    return 0.5 * (weight - weight.transpose(-1, -2) - gamma * eye)


def resnet(y, weight, bias, step=0.1, activation="tanh"):
    """Forward Euler, one layer at a time: ``Y <- Y + h act(Y K_j^T + b_j)``.

    Args:
        y (Tensor): ``(B, d)`` state ``Y_0``.
        weight (Tensor): ``(N, d, d)``, the ``nn.Linear`` layout.
        bias (Tensor): ``(N, d)``.
        step (float): the step ``h`` (default 0.1).
        activation (str or callable): a name from :data:`ACTIVATIONS` or a callable.

    Returns:
        Tensor: ``Y_N``.
    """
    act = activation_fn(activation)
    for j in range(weight.shape[0]):
        y = y + step * act(F.linear(y, weight[j], bias[j]))
    return y


def antisymmetric(y, weight, bias, step=0.1, activation="tanh", gamma=0.01):
    """:func:`resnet` with :func:`antisymmetric_weight` ``(weight, gamma)``.

    Args:
        y (Tensor): ``(B, d)`` state ``Y_0``.
        weight (Tensor): ``(N, d, d)``, the ``nn.Linear`` layout.
        bias (Tensor): ``(N, d)``.
        step (float): the step ``h`` (default 0.1).
        activation (str or callable): a name from :data:`ACTIVATIONS` or a callable.
        gamma (float): damping ``>= 0`` (default 0.01).

    Returns:
        Tensor: ``Y_N``.
    """
    return resnet(y, antisymmetric_weight(weight, gamma), bias, step, activation)


def leapfrog(y, weight, bias, step=0.1, activation="tanh", y_prev=None, return_state=False):
    """Leapfrog, one layer at a time: ``Y_{j+1} = 2 Y_j - Y_{j-1} - h^2 act(Y_j K_j^T + b_j) K_j``.

    Args:
        y (Tensor): ``(B, d)`` state ``Y_0``.
        weight (Tensor): ``(N, d, d)``, the ``nn.Linear`` layout.
        bias (Tensor): ``(N, d)``.
        step (float): the step ``h`` (default 0.1).
        activation (str or callable): a name from :data:`ACTIVATIONS` or a callable.
        y_prev (Tensor, optional): ``Y_{-1}`` (default ``y``: zero initial velocity).
        return_state (bool): return ``(Y_N, Y_{N-1})`` (default False: ``Y_N``).

    Returns:
        Tensor ``Y_N``, or the pair ``(Y_N, Y_{N-1})``.
    """
    act = activation_fn(activation)
    prev = y if y_prev is None else y_prev
    h2 = step * step
    for j in range(weight.shape[0]):
        nxt = 2 * y - prev - h2 * (act(F.linear(y, weight[j], bias[j])) @ weight[j])
        prev, y = y, nxt
    return (y, prev) if return_state else y


def verlet(y, weight, bias, step=0.1, activation="tanh", z=None, return_state=False):
    """Verlet, one layer at a time: ``Z <- Z - h act(Y K_j + b_j)``, then
    ``Y <- Y + h act(Z K_j^T + b_j)``.

    Args:
        y (Tensor): ``(B, d)`` state ``Y_0``.
        weight (Tensor): ``(N, d, d)``, the ``nn.Linear`` layout.
        bias (Tensor): ``(N, d)``.
        step (float): the step ``h`` (default 0.1).
        activation (str or callable): a name from :data:`ACTIVATIONS` or a callable.
        z (Tensor, optional): ``Z_{-1/2}`` (default zeros).
        return_state (bool): return ``(Y_N, Z_{N-1/2})`` (default False: ``Y_N``).

    Returns:
        Tensor ``Y_N``, or the pair ``(Y_N, Z_{N-1/2})``.
    """
    act = activation_fn(activation)
    if z is None:
        z = torch.zeros_like(y)
    for j in range(weight.shape[0]):
        z = z - step * act(y @ weight[j] + bias[j])
        y = y + step * act(F.linear(z, weight[j], bias[j]))
    return (y, z) if return_state else y


FUNCTIONS = {
    "resnet": resnet,
    "antisymmetric": antisymmetric,
    "leapfrog": leapfrog,
    "verlet": verlet,
}
