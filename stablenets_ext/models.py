"""``StableNet`` = input lift + stable stack + linear classifier, and layer doubling.

Dense architectures (``resnet``, ``antisymmetric``, ``leapfrog``, ``verlet``)
run a stack from :data:`stablenets_ext.layers.STACKS` (fused kernels where
compiled) on ``(B, width)`` states; image inputs are flattened. Convolutional
architectures (``conv-resnet``, ... , see :mod:`stablenets_ext.conv`) need
``(C, H, W)`` inputs, run ``kernel_size x kernel_size`` convolution stacks with
``width`` channels, then average-pool to ``pool x pool`` (or flatten, ``pool=0``)
before the classifier.

Multi-stage networks (the image networks of Ruthotto & Haber 2019 and Chang et
al. 2018): ``layers`` and/or ``width`` given as one value per stage, e.g.
``StableNet("conv-verlet", (1, 28, 28), 10, layers=(2, 2, 2), width=(16, 32, 64))``.
Each stage is one fused stack at one resolution and width; between stages a
transition (plain PyTorch) downsamples (``downsample="pool"``: 2x2 average
pooling, ``"stride"``: a 3x3 convolution of stride 2, ``"none"``) and changes the
width (``widen="conv"``: a learned 1x1 convolution, or ``nn.Linear`` for dense
archs; ``"pad"``: zero channels appended, which leaves the map a stable
embedding). The carried state of leapfrog and Verlet (``Y_prev``, ``Z``) does not
cross a transition: every stage starts at rest, as the first one does. Stage
boundaries are the natural cuts of the SG and PVD trainers
(:meth:`StableNet.stage_bounds`). One value for ``layers`` and ``width`` keeps the
single stack (attribute ``stack``, unchanged checkpoints).
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


DOWNSAMPLES = ("pool", "stride", "none")
WIDENS = ("conv", "pad")


def _per_stage(value, name):
    """An int -> (value,); a non-empty list/tuple of positive ints -> tuple."""
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            raise ValueError(f"{name}: expected a positive int or a non-empty sequence of them "
                             f"(one per stage), got {value!r}")
        for v in value:
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected positive ints (one per stage), got {value!r}")
        return tuple(value)
    return None if value is None else (_positive_int(value, name),)


def _stage_shape(layers, width):
    """``(layers per stage, width per stage or None)``: a single value is
    repeated over the stages the other one names; two sequences must match."""
    layers = _per_stage(layers, "layers")
    width = _per_stage(width, "width")
    count = len(layers)
    if width is not None and len(width) != count:
        if count == 1:
            layers, count = layers * len(width), len(width)
        elif len(width) == 1:
            width = width * count
        else:
            raise ValueError(
                f"width: expected one width per stage ({count} stages from layers={list(layers)}), "
                f"got {len(width)} values: {list(width)}")
    return layers, (None if width is None else width)


class Transition(nn.Module):
    """Between two stages: downsample (``"pool"``: 2x2 average pooling, ceil mode;
    ``"stride"``: a 3x3 convolution of stride 2, which also changes the width;
    ``"none"``), then change the width (``"conv"``: a 1x1 convolution, or
    ``nn.Linear`` for dense states; ``"pad"``: zero channels appended).

    Args:
        inputs, outputs: widths (channels for images) before and after.
        conv: image states ``(B, C, H, W)`` (else dense ``(B, d)``).
        downsample: ``"pool"``, ``"stride"`` or ``"none"`` (dense: ``"none"`` only).
        widen: ``"conv"`` or ``"pad"`` (``"pad"`` needs ``outputs >= inputs``)."""

    def __init__(self, inputs, outputs, *, conv, downsample, widen):
        super().__init__()
        self.inputs, self.outputs = inputs, outputs
        self.downsample, self.widen = downsample, widen
        if downsample == "stride":
            if widen == "pad":
                raise ValueError("widen: 'pad' needs downsample='pool' or 'none' (a strided "
                                 "convolution already maps the channels)")
            self.down = nn.Conv2d(inputs, outputs, 3, stride=2, padding=1)
            self.change = nn.Identity()
            return
        self.down = nn.AvgPool2d(2, ceil_mode=True) if downsample == "pool" else nn.Identity()
        if outputs == inputs:
            self.change = nn.Identity()
        elif widen == "pad":
            if outputs < inputs:
                raise ValueError(f"widen: 'pad' can only grow the width, but stage widths go "
                                 f"from {inputs} to {outputs}; use widen='conv'")
            self.change = ZeroPad(inputs, outputs)
        else:
            self.change = nn.Conv2d(inputs, outputs, 1) if conv else nn.Linear(inputs, outputs)

    def forward(self, y):
        return self.change(self.down(y))

    def extra_repr(self):
        return f"{self.inputs} -> {self.outputs}, downsample={self.downsample!r}, widen={self.widen!r}"


class StableNet(nn.Module):
    """A ready-made classifier: lift -> one or more stages of stable layers -> classifier.

    Dense archs lift ``(B, inputs)`` (images flattened) to ``(B, width)``, run a
    :class:`~stablenets_ext.VerletStack` (etc.) and classify the final state with an
    ``nn.Linear``. Conv archs (``"conv-verlet"``, ...) lift ``(B, C, H, W)`` images to
    ``width`` channels, run a :class:`~stablenets_ext.ConvVerletStack` (etc.), pool and
    classify. Several stages (``layers`` and/or ``width`` given one value per stage, as
    the papers build image networks: e.g. widths 16, 32, 64 at falling resolution) are
    stacks joined by a :class:`Transition` (downsample, then change the width). Each
    stage is one fused stack; the carried state of leapfrog/Verlet does not cross a
    transition (each stage starts at rest, like the first).

    Args:
        arch (str): ``"resnet"``, ``"antisymmetric"``, ``"leapfrog"``, ``"verlet"`` or
            their conv twins ``"conv-resnet"``, ... (see ``models.ARCHS``).
        features (int or tuple): number of inputs, or ``(C, H, W)`` for images (needed
            by conv archs).
        classes (int): number of classes (outputs of the classifier).
        layers (int or sequence of int): number of stable layers in the stack, or one
            per stage (a single value is repeated over the stages ``width`` names).
        width (int or sequence of int, optional): width of the state (dense; default the
            number of inputs) or its channels (conv; default 16), or one per stage.
        step (float): the stacks' step ``h`` (default 0.1); see
            :class:`~stablenets_ext.VerletStack` for how to choose it.
        activation (str or callable): the stacks' activation (default ``"tanh"``).
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
        kernel_size (int, optional): conv archs only: odd kernel size of the stacks
            (default 3).
        batch_norm (bool): conv archs only: per-layer BatchNorm2d on every
            pre-activation (default False; outside the stability theory, reference
            path, not reversible).
        reversible (bool): leapfrog and Verlet archs (dense or conv): rebuild the states
            in the backward instead of storing them, in every stage (default False); see
            :class:`~stablenets_ext.LeapfrogStack` for what it costs.
        downsample (str, optional): several stages only: ``"pool"`` (2x2 average
            pooling; the conv default), ``"stride"`` (3x3 convolution of stride 2, which
            also maps the channels) or ``"none"`` (the only choice for dense archs).
        widen (str, optional): several stages only: ``"conv"`` (default: a learned 1x1
            convolution, or ``nn.Linear`` for dense states) or ``"pad"`` (zero channels
            appended; the width may only grow).
        stack_kwargs: further keyword arguments for every stack (``gamma`` for the
            antisymmetric archs).

    The stacks are ``stacks[k]`` and the transitions ``transitions[k-1]``; with one
    stage the stack is ``stack`` as before. :attr:`stage_stacks` lists them in both
    cases and :meth:`stage_bounds` gives the natural cut points (SG cuts, PVD blocks).

    Example:
        >>> import torch, stablenets_ext as sn
        >>> net = sn.StableNet("conv-verlet", (1, 8, 8), classes=10, layers=4, width=4)
        >>> net(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
        >>> staged = sn.StableNet("conv-verlet", (1, 8, 8), classes=10, layers=(1, 1),
        ...                       width=(4, 8))
        >>> staged(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, arch, features, classes, layers, width=None, step=0.1, activation="tanh",
                 impl="auto", *, lift=None, pool=None, kernel_size=None, batch_norm=False,
                 reversible=False, downsample=None, widen=None, **stack_kwargs):
        """Build the model; every argument is described on the class (``help(StableNet)``)."""
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch: expected one of {list(ARCHS)}, got {arch!r}")
        _positive_int(classes, "classes")
        stage_layers, stage_width = _stage_shape(layers, width)
        multi = len(stage_layers) > 1
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
        if downsample is not None and downsample not in DOWNSAMPLES:
            raise ValueError(f"downsample: expected one of {list(DOWNSAMPLES)}, got {downsample!r}")
        if widen is not None and widen not in WIDENS:
            raise ValueError(f"widen: expected one of {list(WIDENS)}, got {widen!r}")
        if not multi:
            for name, value in (("downsample", downsample), ("widen", widen)):
                if value is not None:
                    raise ValueError(f"{name}: only applies between stages; give layers (or "
                                     f"width) one value per stage, e.g. layers=(2, 2, 2)")
        if not is_conv(arch) and downsample not in (None, "none"):
            raise ValueError(f"downsample: dense archs have no resolution to reduce; only "
                             f"'none' applies to {arch!r}")
        self.arch, self.features, self.classes = arch, features, classes
        self.impl, self.lift_mode = impl, lift
        self.reversible, self.batch_norm = reversible, batch_norm
        self.stack_kwargs = dict(stack_kwargs)
        self.downsample = (downsample or ("pool" if is_conv(arch) else "none")) if multi else None
        self.widen = (widen or "conv") if multi else None
        if reversible:
            stack_kwargs["reversible"] = True
        if is_conv(arch):
            if not isinstance(features, tuple):
                raise ValueError(
                    f"arch: {arch!r} is convolutional and needs image data with features "
                    f"(C, H, W), got features={features!r}; use a dense arch ({', '.join(DENSE_ARCHS)})"
                )
            channels, height, wide = features
            widths = stage_width or (16,) * len(stage_layers)
            kernel_size = 3 if kernel_size is None else kernel_size
            if (not isinstance(kernel_size, int) or isinstance(kernel_size, bool) or kernel_size < 1
                    or kernel_size % 2 == 0):
                raise ValueError(f"kernel_size: expected an odd positive int, got {kernel_size!r}")
            pool = normalize_pool(pool)
            if lift is False or (lift is None and widths[0] >= channels):
                self.lift = ZeroPad(channels, widths[0])
            else:
                self.lift = nn.Conv2d(channels, widths[0], kernel_size, padding=kernel_size // 2)
            stacks = [_conv.CONV_STACKS[base_arch(arch)](
                w, n, step, activation, impl=impl, kernel_size=kernel_size,
                batch_norm=batch_norm, **stack_kwargs) for n, w in zip(stage_layers, widths)]
            self._set_stages(stacks, widths)
            for _ in range(len(stage_layers) - 1):
                if self.downsample != "none":
                    height, wide = (height + 1) // 2, (wide + 1) // 2
            last = widths[-1]
            if pool:
                self.pool = nn.AdaptiveAvgPool2d(pool)
                self.classifier = nn.Linear(last * pool * pool, classes)
            else:
                self.pool = nn.Identity()  # flattened in head()
                self.classifier = nn.Linear(last * height * wide, classes)
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
            widths = stage_width or (inputs,) * len(stage_layers)
            if lift is False or (lift is None and widths[0] >= inputs):
                self.lift = ZeroPad(inputs, widths[0])
            else:
                self.lift = nn.Linear(inputs, widths[0])
            stacks = [STACKS[arch](w, n, step, activation, impl=impl, **stack_kwargs)
                      for n, w in zip(stage_layers, widths)]
            self._set_stages(stacks, widths)
            self.pool = None
            self.classifier = nn.Linear(widths[-1], classes)
        self.pool_size, self.kernel_size = pool, kernel_size
        self.width = widths if multi else widths[0]

    def _set_stages(self, stacks, widths):
        # registered before pool and classifier: parameter order lift, stack(s), classifier
        if len(stacks) == 1:
            self.stack = stacks[0]
            return
        self.stacks = nn.ModuleList(stacks)
        self.transitions = nn.ModuleList(
            Transition(a, b, conv=is_conv(self.arch), downsample=self.downsample, widen=self.widen)
            for a, b in zip(widths, widths[1:]))

    # -- stages
    @property
    def stage_stacks(self) -> list:
        """The stacks, one per stage, in order (``[stack]`` for a single stage)."""
        return list(self.stacks) if "stacks" in self._modules else [self.stack]

    @property
    def stage_prefixes(self) -> list[str]:
        """Parameter-name prefixes of the stacks (``"stack."`` or ``"stacks.k."``)."""
        if "stacks" in self._modules:
            return [f"stacks.{k}." for k in range(len(self.stacks))]
        return ["stack."]

    @property
    def multistage(self) -> bool:
        return "stacks" in self._modules

    @property
    def stage_layers(self) -> tuple:
        return tuple(s.layers for s in self.stage_stacks)

    def stage_bounds(self) -> list[int]:
        """Global layer indices where the stages begin, and the total: the
        natural cuts of the SG and PVD trainers (``[0, N]`` for one stage)."""
        out = [0]
        for n in self.stage_layers:
            out.append(out[-1] + n)
        return out

    def pieces(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """Global layers ``lo .. hi-1`` as ``(stage, a, b)``: local layers
        ``a .. b-1`` of stage ``stage``, in order."""
        out, bounds = [], self.stage_bounds()
        for k in range(len(bounds) - 1):
            a, b = max(lo, bounds[k]), min(hi, bounds[k + 1])
            if a < b:
                out.append((k, a - bounds[k], b - bounds[k]))
        return out

    def transition(self, k: int, y):
        """Apply the transition into stage ``k`` to the previous stage's final state ``y``
        (identity for ``k = 0``)."""
        return y if k == 0 else self.transitions[k - 1](y)

    # -- properties mirrored from the stack(s)
    @property
    def layers(self) -> int:
        """Total layers over all stages."""
        return sum(self.stage_layers)

    @property
    def step(self) -> float:
        return self.stage_stacks[0].step

    @property
    def activation(self) -> str:
        return self.stage_stacks[0].activation

    def set_step(self, step: float) -> None:
        """Set the step ``h`` of every stage."""
        for s in self.stage_stacks:
            s.step = float(step)

    def config(self) -> dict:
        """Keyword arguments that rebuild this model.

        Returns:
            dict: ``StableNet(**model.config())`` (or :meth:`from_config`) builds the same
            architecture (fresh parameters).
        """
        multi = self.multistage
        cfg = {
            "arch": self.arch, "features": self.features, "classes": self.classes,
            "layers": list(self.stage_layers) if multi else self.layers,
            "width": list(self.width) if multi else self.width, "step": self.step,
            "activation": self.activation, "impl": self.impl, "lift": self.lift_mode,
            "pool": self.pool_size, **self.stack_kwargs,
        }
        if multi:
            cfg.update(downsample=self.downsample, widen=self.widen)
        if is_conv(self.arch):
            cfg.update(kernel_size=self.kernel_size, batch_norm=self.batch_norm)
        if self.reversible:
            cfg["reversible"] = True
        return cfg

    @classmethod
    def from_config(cls, config: dict) -> "StableNet":
        """Build a model from :meth:`config`'s dict (JSON round trips allowed: lists
        become tuples).

        Args:
            config (dict): keyword arguments of :class:`StableNet`.

        Returns:
            StableNet: a new model with fresh parameters.
        """
        cfg = dict(config)
        for key in ("features", "layers", "width"):
            if isinstance(cfg.get(key), list):
                cfg[key] = tuple(cfg[key])
        return cls(**cfg)

    def lift_input(self, x):
        """The first stack's initial state ``Y_0`` for inputs ``x`` (flattened for dense archs)."""
        if self.pool is None and x.dim() > 2:
            x = x.flatten(1)
        return self.lift(x)

    def head(self, y):
        """Logits ``(B, classes)`` from the last stack's final state ``y``."""
        if self.pool is not None:
            y = self.pool(y).flatten(1)
        return self.classifier(y)

    def features_of(self, x):
        """The last stack's final state for inputs ``x`` (what :meth:`head` classifies)."""
        if not self.multistage:
            return self.stack(self.lift_input(x))
        y = self.lift_input(x)
        for k, stack in enumerate(self.stacks):
            y = stack(self.transition(k, y))
        return y

    def forward(self, x):
        """Logits for a batch.

        Args:
            x (Tensor): ``(B, features)`` (dense; images are flattened) or
                ``(B, C, H, W)`` (conv), the parameters' dtype and device.

        Returns:
            Tensor: ``(B, classes)`` logits.
        """
        return self.head(self.features_of(x))

    def loss(self, logits, target):
        """Cross-entropy of ``logits`` ``(B, classes)`` against integer ``target`` ``(B,)``."""
        return F.cross_entropy(logits, target)

    @torch.no_grad()
    def trajectory(self, x, stage=None):
        """States ``Y_0 .. Y_N`` through the stack for inputs ``x``, shape ``(N+1, B, ...)``, by
        running the stack one layer at a time and carrying its state. Several
        stages: ``stage=k`` gives stage ``k``'s states (from its input, after the
        transition), ``stage=None`` a list with one such tensor per stage."""
        y = self.lift_input(x)
        out = []
        for k, stack in enumerate(self.stage_stacks):
            y = self.transition(k, y)
            states = self._stage_trajectory(stack, y)
            out.append(states)
            y = states[-1]
        if not self.multistage:
            return out[0]
        return out if stage is None else out[stage]

    def _stage_trajectory(self, stack, y):
        fn = layer_function(self, stack)
        norm = stack.norm() if getattr(stack, "batch_norm", False) else None
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


def layer_function(model: StableNet, stack=None):
    """``fn(y, weight, bias, carry) -> y`` (one-state) or ``-> (y, carry)`` (leapfrog:
    ``Y_{N-1}``, verlet: ``Z``) running a slice of ``stack`` (default: the model's
    first stage) with its settings.
    Conv functions also take ``norm=`` (the slice's :class:`stablenets_ext.conv.ConvNorm`,
    for stacks with batch norm)."""
    stack = model.stage_stacks[0] if stack is None else stack
    arch = base_arch(model.arch)
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


def _rescaled(model: StableNet, factor: float, pick) -> StableNet:
    """A model of the same shape with ``layers * factor`` layers per stage and
    step ``step / factor``: non-stack parameters copied, each stack's per-layer
    tensors (and batch-norm parameters and statistics) mapped by ``pick``."""
    cfg = model.config()
    layers = [int(n * factor) for n in model.stage_layers]
    cfg["layers"] = layers if model.multistage else layers[0]
    cfg["step"] = model.step / factor
    ref = model.stage_stacks[0].weight
    new = StableNet.from_config(cfg).to(device=ref.device, dtype=ref.dtype)
    stack_names = tuple(model.stage_prefixes)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(stack_names)}
    new.load_state_dict(own, strict=False)
    with torch.no_grad():
        for old_stack, new_stack in zip(model.stage_stacks, new.stage_stacks):
            names = ["weight", "bias"]
            if getattr(old_stack, "batch_norm", False):
                names += ["norm_weight", "norm_bias", "norm_mean", "norm_var"]
            for name in names:
                getattr(new_stack, name).copy_(pick(getattr(old_stack, name)))
    new.train(model.training)
    return new


def double_layers(model: StableNet) -> StableNet:
    """Layer doubling (multilevel training): twice the layers at half the step, in
    every stage.

    The new model covers the same time ``N h``: stack parameters (and batch-norm
    parameters and statistics) interpolated (:func:`interpolate_layers`), lift,
    transitions and classifier copied, so it computes nearly the same function and
    training goes on from there.

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
    return _rescaled(model, 2, interpolate_layers)


def halve_layers(model: StableNet) -> StableNet:
    """A new model with every other layer of each stage (``layers[0::2]``) and
    twice the step: the coarse level of multilevel training. Every stage needs
    an even number of layers."""
    odd = [n for n in model.stage_layers if n % 2]
    if odd:
        raise ValueError(
            f"layers: halving the network needs an even number of layers in every stage, got "
            f"{list(model.stage_layers) if model.multistage else model.layers}")
    return _rescaled(model, 0.5, lambda p: p[0::2])
