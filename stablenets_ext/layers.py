"""``nn.Module`` holders of the stack parameters over :mod:`stablenets_ext.functional`.

Each stack is ``Module(features, layers, step=0.1, activation="tanh", *, impl="auto")``
with parameters ``weight`` ``(layers, features, features)`` (the ``nn.Linear``
layout) and ``bias`` ``(layers, features)``, and maps ``(B, features)`` to
``(B, features)`` with one fused op for all ``layers`` layers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import functional as SF
from . import reference


_ARGS = """
        features (int): width ``d`` of the state ``Y`` of shape ``(B, d)`` (the last
            dimension of the input).
        layers (int): number of layers ``N``; each owns ``weight[j]`` (``d x d``) and
            ``bias[j]`` (``d``). Cost grows linearly with it.
        step (float): the step ``h`` (default 0.1). Keep ``h`` times the largest
            eigenvalue modulus of the layer Jacobian small (rule of thumb:
            ``h * ||K_j||_2 <= 1``; the default initialisation gives ``||K_j||_2`` of
            about 1 to 1.15) and the total time ``N * h`` of order 1 to 10; when you double
            ``layers``, halve ``step``. ``stablenets stability`` shows how states and
            gradients grow with depth for each architecture.
        activation (str or callable): one of ``"tanh"`` (default), ``"relu"``,
            ``"identity"``, ``"sigmoid"``, ``"softplus"``, ``"leaky_relu"`` (slope
            0.01), ``"silu"``, all fused. A Python callable (``nn.ReLU()``,
            ``torch.sin``) also works, on the plain-PyTorch reference path (slower,
            one warning; refused with ``impl="fused"`` or ``reversible=True``).
        impl (str): ``"auto"`` (default: the fused kernel where one was compiled for
            the input's device, else the reference with one warning), ``"fused"``
            (error instead of any fallback) or ``"reference"`` (plain PyTorch).
        device (torch.device, optional): device of the parameters.
        dtype (torch.dtype, optional): ``torch.float32`` (default), ``torch.float64``,
            ``torch.bfloat16`` or ``torch.float16`` (mixed precision: float32 inside);
            the input must have the same dtype and device as the parameters."""

_REVERSIBLE = """
        reversible (bool): False (default) stores every layer's state in the forward
            for the backward; True stores only the last two and rebuilds the others by
            running the stack backwards, so backward memory does not grow with depth,
            for little or no extra time (a user's measurement of a training step of
            ``LeapfrogStack(64, 4096, step=0.02)`` at batch 1024: 2.72 s and 2769 MB
            stored, 2.18 s and 725 MB reversible). Needs the fused op: with a callable
            activation, ``impl="reference"`` or a device without a kernel it is refused
            (ValueError). If the stack is too unstable to run backwards (``step`` too
            large) the backward warns; use ``reversible=False`` then."""

_NOT_REVERSIBLE = """
        reversible (bool): must be False (accepted so that code can pass the same keywords
            to every stack); this stack has no reversible mode, and True raises
            ValueError."""


def _no_reversible(cls_name, reversible):
    if reversible is not False:
        if reversible is not True:
            raise ValueError(f"reversible: expected True or False, got {reversible!r}")
        raise SF.reversible_refused(
            f"{cls_name} has no reversible mode (a forward-Euler step cannot be run backwards "
            "exactly; LeapfrogStack and VerletStack can)", path=False)


class _Stack(nn.Module):
    arch = ""

    def __init__(self, features, layers, step=0.1, activation="tanh", *, impl="auto",
                 device=None, dtype=None):
        super().__init__()
        if not isinstance(features, int) or isinstance(features, bool) or features < 1:
            raise ValueError(f"features: expected a positive int, got {features!r}")
        if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
            raise ValueError(f"layers: expected a positive int, got {layers!r}")
        if not isinstance(step, (int, float)) or isinstance(step, bool) or not math.isfinite(step) or step <= 0:
            raise ValueError(f"step: expected a finite positive number, got {step!r}")
        reference.activation_fn(activation)  # a name, or a callable (reference path only)
        if impl not in SF.IMPLS:
            raise ValueError(f"impl: expected one of {SF.IMPLS}, got {impl!r}")
        if impl == "fused" and not isinstance(activation, str):
            raise SF.fused_refused_for_callable(activation)
        self.features, self.layers = features, layers
        self.step, self.activation, self.impl = float(step), activation, impl
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(layers, features, features, **kw))
        self.bias = nn.Parameter(torch.empty(layers, features, **kw))
        self.reset_parameters()

    def reset_parameters(self):
        """Draw ``weight`` and ``bias`` uniformly in ``+-1/sqrt(features)``
        (``nn.Linear``'s default, per layer)."""
        bound = 1.0 / math.sqrt(self.features)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            self.bias.uniform_(-bound, bound)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling
        raise RuntimeError(f"{type(self).__name__}: {SF.SCRIPT_REFUSED}")

    def extra_repr(self):
        act = repr(self.activation)
        if not isinstance(self.activation, (str, nn.Module)):  # a function: its name, unquoted
            act = getattr(self.activation, "__name__", act)
        return (f"features={self.features}, layers={self.layers}, step={self.step}, "
                f"activation={act}, impl={self.impl!r}")


class ResNetStack(_Stack):
    """Forward-Euler residual stack: ``Y <- Y + h act(Y K_j^T + b_j)`` for ``j = 0..N-1``.

    Stable only while every eigenvalue ``lambda`` of the layer Jacobian keeps
    ``|1 + h lambda| <= 1`` (non-positive real parts and small ``h``); with
    eigenvalues of positive real part states and gradients grow exponentially with
    depth. The other stacks are stable by construction.

    Example:
        >>> import torch, stablenets_ext as sn
        >>> stack = sn.ResNetStack(16, 8, step=0.1)
        >>> stack(torch.randn(4, 16)).shape
        torch.Size([4, 16])
    """

    arch = "resnet"

    def __init__(self, features, layers, step=0.1, activation="tanh", *, impl="auto",
                 reversible=False, device=None, dtype=None):
        _no_reversible(type(self).__name__, reversible)
        super().__init__(features, layers, step, activation, impl=impl, device=device, dtype=dtype)

    __init__.__doc__ = "A forward-Euler stack.\n\n    Args:" + _ARGS + _NOT_REVERSIBLE + "\n    "

    def forward(self, y):
        """Run the ``layers`` layers.

        Args:
            y (Tensor): ``(B, features)`` input ``Y_0``, the parameters' dtype and device.

        Returns:
            Tensor: ``Y_N``, same shape, dtype and device.
        """
        return SF.resnet(y, self.weight, self.bias, self.step, self.activation, impl=self.impl)


class AntisymmetricStack(_Stack):
    """ResNet stack with antisymmetric weights: ``A_j = (K_j - K_j^T - gamma I) / 2``,
    ``Y <- Y + h act(Y A_j^T + b_j)`` (Haber & Ruthotto 2017, eq. 4.12).

    The eigenvalues of ``A_j`` are imaginary shifted by ``-gamma/2``, so forward
    Euler neither blows up nor dies out with depth for small ``h``.

    Example:
        >>> import torch, stablenets_ext as sn
        >>> stack = sn.AntisymmetricStack(16, 8, step=0.1, gamma=0.01)
        >>> stack(torch.randn(4, 16)).shape
        torch.Size([4, 16])
    """

    arch = "antisymmetric"

    def __init__(self, features, layers, step=0.1, activation="tanh", gamma=0.01, *,
                 impl="auto", reversible=False, device=None, dtype=None):
        if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not math.isfinite(gamma) or gamma < 0:
            raise ValueError(f"gamma: expected a finite number >= 0, got {gamma!r}")
        _no_reversible(type(self).__name__, reversible)
        self.gamma = float(gamma)
        super().__init__(features, layers, step, activation, impl=impl, device=device, dtype=dtype)

    __init__.__doc__ = ("An antisymmetric stack.\n\n    Args:" + _ARGS + """
        gamma (float): damping ``gamma >= 0`` (default 0.01) subtracted on the diagonal:
            0 is the purely imaginary (energy-conserving) spectrum; raise it a little if
            the forward Euler steps drift.""" + _NOT_REVERSIBLE + "\n    ")

    def forward(self, y):
        """Run the ``layers`` layers.

        Args:
            y (Tensor): ``(B, features)`` input ``Y_0``, the parameters' dtype and device.

        Returns:
            Tensor: ``Y_N``, same shape, dtype and device.
        """
        return SF.antisymmetric(y, self.weight, self.bias, self.step, self.activation,
                                gamma=self.gamma, impl=self.impl)

    def extra_repr(self):
        return super().extra_repr() + f", gamma={self.gamma}"


class _TwoStateStack(_Stack):
    def __init__(self, features, layers, step=0.1, activation="tanh", *, impl="auto",
                 reversible=False, device=None, dtype=None):
        SF.check_reversible(reversible, activation, impl)
        self.reversible = reversible
        super().__init__(features, layers, step, activation, impl=impl, device=device, dtype=dtype)

    def extra_repr(self):
        return super().extra_repr() + f", reversible={self.reversible}"


class LeapfrogStack(_TwoStateStack):
    """Second-order (leapfrog) stack:
    ``Y_{j+1} = 2 Y_j - Y_{j-1} - h^2 act(Y_j K_j^T + b_j) K_j``, ``Y_{-1} = Y_0``.

    The discretisation of ``Y'' = -K^T act(K Y + b)``: stable for any ``K`` while
    ``h^2`` times the largest eigenvalue of ``K_j^T diag(act') K_j`` stays below 4
    (roughly ``h * ||K_j||_2 < 2`` for tanh). It can be run backwards exactly, hence
    ``reversible=True``.

    Example:
        >>> import torch, stablenets_ext as sn
        >>> stack = sn.LeapfrogStack(16, 32, step=0.1, reversible=True)
        >>> x = torch.randn(4, 16, requires_grad=True)
        >>> stack(x).square().sum().backward()   # states rebuilt, not stored
        >>> x.grad.shape
        torch.Size([4, 16])
    """

    arch = "leapfrog"

    def __init__(self, features, layers, step=0.1, activation="tanh", *, impl="auto",
                 reversible=False, device=None, dtype=None):
        super().__init__(features, layers, step, activation, impl=impl, reversible=reversible,
                         device=device, dtype=dtype)

    __init__.__doc__ = "A leapfrog stack.\n\n    Args:" + _ARGS + _REVERSIBLE + "\n    "

    def forward(self, y, y_prev=None, return_state=False):
        """Run the ``layers`` layers.

        Args:
            y (Tensor): ``(B, features)`` state ``Y_0``, the parameters' dtype and device.
            y_prev (Tensor, optional): ``Y_{-1}``, same shape; default ``y`` (zero
                initial velocity). Pass the state returned by a previous stack to
                continue it.
            return_state (bool): also return ``Y_{N-1}`` (default False), to carry the
                whole state across a cut.

        Returns:
            Tensor ``Y_N``, or the pair ``(Y_N, Y_{N-1})`` with ``return_state=True``.
        """
        return SF.leapfrog(y, self.weight, self.bias, self.step, self.activation, y_prev=y_prev,
                           return_state=return_state, reversible=self.reversible, impl=self.impl)


class VerletStack(_TwoStateStack):
    """Hamiltonian (Verlet) stack: ``Z <- Z - h act(Y K_j + b_j)``, then
    ``Y <- Y + h act(Z K_j^T + b_j)``, from ``Z_{-1/2} = 0``.

    A symplectic integrator of a Hamiltonian system: stable while ``h`` times the
    largest singular value of ``K_j`` (times ``act'``) stays below about 2. It can be
    run backwards exactly, hence ``reversible=True``.

    Example:
        >>> import torch, stablenets_ext as sn
        >>> stack = sn.VerletStack(16, 32, step=0.1)
        >>> y, z = stack(torch.randn(4, 16), return_state=True)
        >>> stack(y, z=z).shape           # continue the same trajectory
        torch.Size([4, 16])
    """

    arch = "verlet"

    def __init__(self, features, layers, step=0.1, activation="tanh", *, impl="auto",
                 reversible=False, device=None, dtype=None):
        super().__init__(features, layers, step, activation, impl=impl, reversible=reversible,
                         device=device, dtype=dtype)

    __init__.__doc__ = "A Verlet stack.\n\n    Args:" + _ARGS + _REVERSIBLE + "\n    "

    def forward(self, y, z=None, return_state=False):
        """Run the ``layers`` layers.

        Args:
            y (Tensor): ``(B, features)`` state ``Y_0``, the parameters' dtype and device.
            z (Tensor, optional): ``Z_{-1/2}``, same shape; default zeros. Pass the state
                returned by a previous stack to continue it.
            return_state (bool): also return ``Z_{N-1/2}`` (default False), to carry the
                whole state across a cut.

        Returns:
            Tensor ``Y_N``, or the pair ``(Y_N, Z_{N-1/2})`` with ``return_state=True``.
        """
        return SF.verlet(y, self.weight, self.bias, self.step, self.activation, z=z,
                         return_state=return_state, reversible=self.reversible, impl=self.impl)


STACKS = {
    "resnet": ResNetStack,
    "antisymmetric": AntisymmetricStack,
    "leapfrog": LeapfrogStack,
    "verlet": VerletStack,
}
