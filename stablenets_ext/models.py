"""``StableNet`` = input lift + stable stack + linear classifier, and layer doubling.

Dense architectures (``resnet``, ``antisymmetric``, ``leapfrog``, ``verlet``)
run a stack from :data:`stablenets_ext.layers.STACKS` (fused kernels where
compiled) on ``(B, width)`` states; image inputs are flattened. Convolutional
architectures (``conv-resnet``, ... , see :mod:`stablenets_ext.conv`) need
``(C, H, W)`` inputs, run ``kernel_size x kernel_size`` convolution stacks with
``width`` channels, then average-pool to ``pool x pool`` (or flatten, ``pool=0``)
before the classifier.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import conv as _conv
from . import functional as SF
from .layers import STACKS

DENSE_ARCHS = tuple(STACKS)
CONV_ARCHS = tuple(f"conv-{a}" for a in _conv.CONV_STACKS)
ARCHS = DENSE_ARCHS + CONV_ARCHS
TWO_STATE = ("leapfrog", "verlet")


def is_conv(arch: str) -> bool:
    return arch.startswith("conv-")


def base_arch(arch: str) -> str:
    """``"conv-verlet"`` -> ``"verlet"``."""
    return arch[5:] if is_conv(arch) else arch


class ZeroPad(nn.Module):
    """Embed ``features`` inputs in ``width`` by appending zeros (along dim 1)."""

    def __init__(self, features: int, width: int):
        super().__init__()
        if width < features:
            raise ValueError(f"width: zero-padding needs width >= features ({features}), got {width}")
        self.features, self.width = features, width

    def forward(self, x):
        if self.width == self.features:
            return x
        pad = [0, 0] * (x.dim() - 2) + [0, self.width - self.features]
        return F.pad(x, pad)

    def extra_repr(self):
        return f"features={self.features}, width={self.width}"


def _positive_int(value, name):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


LIFTS = {None: None, "auto": None, True: True, "learned": True, False: False, "pad": False}


def normalize_lift(lift):
    """``None``/``"auto"`` -> None, ``True``/``"learned"`` -> True, ``False``/``"pad"`` -> False."""
    try:
        return LIFTS[lift]
    except (KeyError, TypeError):
        raise ValueError(
            f"lift: expected None or 'auto' (pad when width >= inputs, else learn), True or "
            f"'learned', False or 'pad'; got {lift!r}"
        ) from None


DEFAULT_POOL = 4


def normalize_pool(pool):
    """``None`` -> 4 (the default); a positive int p -> p (average-pool to p x p);
    ``0`` or ``"flatten"`` -> 0 (no pooling: the classifier sees the whole feature map)."""
    if pool is None:
        return DEFAULT_POOL
    if pool == "flatten":
        return 0
    if not isinstance(pool, int) or isinstance(pool, bool) or pool < 0:
        raise ValueError(
            f"pool: expected a positive int (average-pool to pool x pool), 0 or 'flatten' "
            f"(classifier on the flattened feature map) or None (default {DEFAULT_POOL}), got {pool!r}"
        )
    return pool


class StableNet(nn.Module):
    """A ready-made classifier: lift -> stack of ``layers`` stable layers -> classifier.

    Dense archs lift ``(B, inputs)`` (images flattened) to ``(B, width)``, run a
    :class:`~stablenets_ext.VerletStack` (etc.) and classify the final state with an
    ``nn.Linear``. Conv archs (``"conv-verlet"``, ...) lift ``(B, C, H, W)`` images to
    ``width`` channels, run a :class:`~stablenets_ext.ConvVerletStack` (etc.) at full
    resolution, pool and classify.

    Args:
        arch (str): ``"resnet"``, ``"antisymmetric"``, ``"leapfrog"``, ``"verlet"`` or
            their conv twins ``"conv-resnet"``, ... (see ``models.ARCHS``).
        features (int or tuple): number of inputs, or ``(C, H, W)`` for images (needed
            by conv archs).
        classes (int): number of classes (outputs of the classifier).
        layers (int): number of stable layers in the stack.
        width (int, optional): width of the stack's state (dense; default the number of
            inputs) or its channels (conv; default 16).
        step (float): the stack's step ``h`` (default 0.1); see
            :class:`~stablenets_ext.VerletStack` for how to choose it.
        activation (str or callable): the stack's activation (default ``"tanh"``).
        impl (str): ``"auto"`` (default), ``"fused"`` or ``"reference"``.
        lift: None/``"auto"`` (default) pads with zeros when ``width`` >= the inputs
            (channels, for conv archs) and learns a lift otherwise; True/``"learned"``
            always learns one (``nn.Linear``; conv: an ``nn.Conv2d`` with the stack's
            ``kernel_size``, "same" padding); False/``"pad"`` always pads (error when
            ``width`` is smaller than the inputs).
        pool (int or str, optional): conv archs only: a positive int p average-pools
            the final feature map to ``p x p`` before the classifier (default 4; 1 is
            global average pooling); 0 or ``"flatten"`` feeds it the whole flattened
            ``width x H x W`` map.
        kernel_size (int, optional): conv archs only: odd kernel size of the stack
            (default 3).
        batch_norm (bool): conv archs only: per-layer BatchNorm2d on every
            pre-activation (default False; outside the stability theory, reference
            path, not reversible).
        reversible (bool): leapfrog and Verlet archs (dense or conv): rebuild the states
            in the backward instead of storing them (default False); see
            :class:`~stablenets_ext.LeapfrogStack` for what it costs.
        stack_kwargs: further keyword arguments for the stack (``gamma`` for the
            antisymmetric archs).

    Example:
        >>> import torch, stablenets_ext as sn
        >>> net = sn.StableNet("conv-verlet", (1, 8, 8), classes=10, layers=4, width=4)
        >>> net(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, arch, features, classes, layers, width=None, step=0.1, activation="tanh",
                 impl="auto", *, lift=None, pool=None, kernel_size=None, batch_norm=False,
                 reversible=False, **stack_kwargs):
        """Build the model; every argument is described on the class (``help(StableNet)``)."""
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch: expected one of {list(ARCHS)}, got {arch!r}")
        _positive_int(classes, "classes")
        _positive_int(layers, "layers")
        if impl not in SF.IMPLS:
            raise ValueError(f"impl: expected one of {SF.IMPLS}, got {impl!r}")
        if isinstance(features, (list, tuple)):
            features = tuple(int(f) for f in features)
            if len(features) != 3 or min(features) < 1:
                raise ValueError(f"features: expected an int or (C, H, W), got {features!r}")
        else:
            _positive_int(features, "features")
        lift = normalize_lift(lift)
        if not isinstance(batch_norm, bool):
            raise ValueError(f"batch_norm: expected True or False, got {batch_norm!r}")
        if not isinstance(reversible, bool):
            raise ValueError(f"reversible: expected True or False, got {reversible!r}")
        if reversible and base_arch(arch) not in TWO_STATE:
            raise SF.reversible_refused(
                f"arch {arch!r} has no reversible mode (only leapfrog and verlet stacks can be "
                "run backwards)", path=False)
        self.arch, self.features, self.classes = arch, features, classes
        self.impl, self.lift_mode = impl, lift
        self.reversible, self.batch_norm = reversible, batch_norm
        self.stack_kwargs = dict(stack_kwargs)
        if reversible:
            stack_kwargs["reversible"] = True
        if is_conv(arch):
            if not isinstance(features, tuple):
                raise ValueError(
                    f"arch: {arch!r} is convolutional and needs image data with features "
                    f"(C, H, W), got features={features!r}; use a dense arch ({', '.join(DENSE_ARCHS)})"
                )
            channels, height, wide = features
            width = 16 if width is None else _positive_int(width, "width")
            kernel_size = 3 if kernel_size is None else kernel_size
            if (not isinstance(kernel_size, int) or isinstance(kernel_size, bool) or kernel_size < 1
                    or kernel_size % 2 == 0):
                raise ValueError(f"kernel_size: expected an odd positive int, got {kernel_size!r}")
            pool = normalize_pool(pool)
            if lift is False or (lift is None and width >= channels):
                self.lift = ZeroPad(channels, width)
            else:
                self.lift = nn.Conv2d(channels, width, kernel_size, padding=kernel_size // 2)
            self.stack = _conv.CONV_STACKS[base_arch(arch)](
                width, layers, step, activation, impl=impl, kernel_size=kernel_size,
                batch_norm=batch_norm, **stack_kwargs)
            if pool:
                self.pool = nn.AdaptiveAvgPool2d(pool)
                self.classifier = nn.Linear(width * pool * pool, classes)
            else:
                self.pool = nn.Identity()  # flattened in head()
                self.classifier = nn.Linear(width * height * wide, classes)
        else:
            for name, value, default in (("kernel_size", kernel_size, None),
                                         ("batch_norm", batch_norm, False)):
                if value != default:
                    raise ValueError(f"{name}: only applies to convolutional archs "
                                     f"({', '.join(CONV_ARCHS)}), not {arch!r}")
            if pool not in (None, DEFAULT_POOL):
                raise ValueError(f"pool: only applies to convolutional archs "
                                 f"({', '.join(CONV_ARCHS)}), not {arch!r}")
            pool = DEFAULT_POOL
            inputs = math.prod(features) if isinstance(features, tuple) else features
            width = inputs if width is None else _positive_int(width, "width")
            if lift is False or (lift is None and width >= inputs):
                self.lift = ZeroPad(inputs, width)
            else:
                self.lift = nn.Linear(inputs, width)
            self.stack = STACKS[arch](width, layers, step, activation, impl=impl, **stack_kwargs)
            self.pool = None
            self.classifier = nn.Linear(width, classes)
        self.pool_size, self.kernel_size = pool, kernel_size
        self.width = width

    # -- properties mirrored from the stack
    @property
    def layers(self) -> int:
        return self.stack.layers

    @property
    def step(self) -> float:
        return self.stack.step

    @property
    def activation(self) -> str:
        return self.stack.activation

    def config(self) -> dict:
        """Keyword arguments that rebuild this model.

        Returns:
            dict: ``StableNet(**model.config())`` (or :meth:`from_config`) builds the same
            architecture (fresh parameters).
        """
        cfg = {
            "arch": self.arch, "features": self.features, "classes": self.classes,
            "layers": self.layers, "width": self.width, "step": self.step,
            "activation": self.activation, "impl": self.impl, "lift": self.lift_mode,
            "pool": self.pool_size, **self.stack_kwargs,
        }
        if is_conv(self.arch):
            cfg.update(kernel_size=self.kernel_size, batch_norm=self.batch_norm)
        if self.reversible:
            cfg["reversible"] = True
        return cfg

    @classmethod
    def from_config(cls, config: dict) -> "StableNet":
        """Build a model from :meth:`config`'s dict (JSON round trips allowed: a list
        ``features`` becomes a tuple).

        Args:
            config (dict): keyword arguments of :class:`StableNet`.

        Returns:
            StableNet: a new model with fresh parameters.
        """
        cfg = dict(config)
        if isinstance(cfg.get("features"), list):
            cfg["features"] = tuple(cfg["features"])
        return cls(**cfg)

    def lift_input(self, x):
        """The stack's initial state ``Y_0`` for inputs ``x`` (flattened for dense archs)."""
        if self.pool is None and x.dim() > 2:
            x = x.flatten(1)
        return self.lift(x)

    def head(self, y):
        """Logits ``(B, classes)`` from the stack's final state ``y``."""
        if self.pool is not None:
            y = self.pool(y).flatten(1)
        return self.classifier(y)

    def forward(self, x):
        """Logits for a batch.

        Args:
            x (Tensor): ``(B, features)`` (dense; images are flattened) or
                ``(B, C, H, W)`` (conv), the parameters' dtype and device.

        Returns:
            Tensor: ``(B, classes)`` logits.
        """
        return self.head(self.stack(self.lift_input(x)))

    def loss(self, logits, target):
        """Cross-entropy of ``logits`` ``(B, classes)`` against integer ``target`` ``(B,)``."""
        return F.cross_entropy(logits, target)

    @torch.no_grad()
    def trajectory(self, x) -> torch.Tensor:
        """States ``Y_0 .. Y_N`` through the stack for inputs ``x``, shape
        ``(N+1, B, ...)``, by running the stack one layer at a time and carrying its state."""
        fn = layer_function(self)
        stack = self.stack
        norm = stack.norm() if getattr(stack, "batch_norm", False) else None
        y = self.lift_input(x)
        states, carry = [y], None
        for j in range(stack.layers):
            w, b = stack.weight[j:j + 1], stack.bias[j:j + 1]
            kw = {} if norm is None else {"norm": norm.slice(j, j + 1)}
            if base_arch(self.arch) in TWO_STATE:
                y, carry = fn(y, w, b, carry, **kw)
            else:
                y = fn(y, w, b, None, **kw)
            states.append(y)
        return torch.stack(states)

    def extra_repr(self):
        return f"arch={self.arch!r}, features={self.features}, classes={self.classes}, width={self.width}"


def layer_function(model: StableNet):
    """``fn(y, weight, bias, carry) -> y`` (one-state) or ``-> (y, carry)`` (leapfrog:
    ``Y_{N-1}``, verlet: ``Z``) running a slice of ``model``'s stack with its settings.
    Conv functions also take ``norm=`` (the slice's :class:`stablenets_ext.conv.ConvNorm`,
    for stacks with batch norm)."""
    stack, arch = model.stack, base_arch(model.arch)
    h, act = stack.step, stack.activation
    if is_conv(model.arch):
        f = _conv.FUNCTIONS[arch]
        impl = stack.impl
        if arch == "antisymmetric":
            return lambda y, w, b, c, norm=None: f(y, w, b, h, act, stack.gamma, impl=impl, norm=norm)
        if arch in TWO_STATE:
            return lambda y, w, b, c, norm=None: f(y, w, b, h, act, c, return_state=True, impl=impl,
                                                   norm=norm)
        return lambda y, w, b, c, norm=None: f(y, w, b, h, act, impl=impl, norm=norm)
    f = SF.FUNCTIONS[arch]
    impl = stack.impl
    if arch == "antisymmetric":
        return lambda y, w, b, c: f(y, w, b, h, act, gamma=stack.gamma, impl=impl)
    if arch == "leapfrog":
        return lambda y, w, b, c: f(y, w, b, h, act, y_prev=c, return_state=True, impl=impl)
    if arch == "verlet":
        return lambda y, w, b, c: f(y, w, b, h, act, z=c, return_state=True, impl=impl)
    return lambda y, w, b, c: f(y, w, b, h, act, impl=impl)


def interpolate_layers(p: torch.Tensor) -> torch.Tensor:
    """``(N, ...)`` -> ``(2N, ...)``: layer ``j`` sits at the centre of cell
    ``[j h, (j+1) h]``; the new layers sit at the centres of the half cells,
    linearly interpolated between neighbours (the first and last, which have
    one neighbour, take the nearest layer's value)."""
    prev = torch.cat([p[:1], p[:-1]])
    nxt = torch.cat([p[1:], p[-1:]])
    left = 0.75 * p + 0.25 * prev
    right = 0.75 * p + 0.25 * nxt
    return torch.stack([left, right], 1).reshape(2 * p.shape[0], *p.shape[1:])


def double_layers(model: StableNet) -> StableNet:
    """Layer doubling (multilevel training): twice the layers at half the step.

    The new model covers the same time ``N h``: stack parameters (and batch-norm
    parameters and statistics) interpolated (:func:`interpolate_layers`), lift and
    classifier copied, so it computes nearly the same function and training goes on
    from there.

    Args:
        model (StableNet): the model to refine (unchanged).

    Returns:
        StableNet: a new model, on the device and dtype of ``model``, in the same
        train/eval mode.

    Example:
        >>> import stablenets_ext as sn
        >>> net = sn.StableNet("verlet", 2, classes=2, layers=4, width=4, step=0.2)
        >>> fine = sn.double_layers(net)
        >>> fine.layers, fine.step
        (8, 0.1)
    """
    cfg = model.config()
    cfg["layers"] = 2 * model.layers
    cfg["step"] = model.step / 2
    ref = model.stack.weight
    new = StableNet.from_config(cfg).to(device=ref.device, dtype=ref.dtype)
    new.lift.load_state_dict(model.lift.state_dict())
    new.classifier.load_state_dict(model.classifier.state_dict())
    with torch.no_grad():
        new.stack.weight.copy_(interpolate_layers(model.stack.weight))
        new.stack.bias.copy_(interpolate_layers(model.stack.bias))
        if getattr(model.stack, "batch_norm", False):
            for name in ("norm_weight", "norm_bias", "norm_mean", "norm_var"):
                getattr(new.stack, name).copy_(interpolate_layers(getattr(model.stack, name)))
    new.train(model.training)
    return new
