"""What every synthetic-gradient trainer shares: a StableNet cut into stages,
the synthetic-gradient (SG) modules at the cuts, and one stage's update rule.

A network of ``N`` layers is cut into ``M`` stages at layer ``bounds``
(``0 = b_0 < b_1 < ... < b_M = N``). Stage 0 owns the input lift, the last
stage the classifier; stage ``k`` owns stack layers ``b_k .. b_{k+1}-1``. The
whole integrator state crosses each cut: ``(Y,)`` for resnet/antisymmetric,
``(Y, Y_prev)`` for leapfrog, ``(Y, Z)`` for verlet.

The schedule, identical in every backend (in-process, processes, torch.distributed):

- stage ``k < M-1`` runs its forward on batch ``t``, asks its SG module for
  ``dL/dh`` of its output given the output and the one-hot label (cDNI),
  backpropagates that, steps its optimiser and hands the true gradient of its
  *input* back to stage ``k-1``;
- the last stage does the same with the true loss;
- stage ``k`` trains its SG module (MSE) on the true gradient of batch ``t``
  before its forward of batch ``t + inflight``, and on every outstanding one at
  the end of an epoch. ``inflight = 1`` is the textbook DNI update (learn as
  soon as the gradient exists); a pipeline needs ``inflight >= 2`` for stages
  to overlap, and the in-process trainer can replay any ``inflight`` exactly.

SG modules predict the per-example gradient ``n * dL/dh`` (``L`` the batch-mean
loss over ``n`` examples), so their targets do not shrink with the batch size.
"""

from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from ... import models
from .. import amp as _amp
from .. import regularizers
from ..backprop import engine as backprop


def state_parts(arch: str) -> int:
    """How many tensors cross a cut: 2 for leapfrog/verlet, else 1."""
    return 2 if models.base_arch(arch) in models.TWO_STATE else 1


def split_bounds(layers: int, stages: int) -> list[int]:
    """Layer boundaries of ``stages`` near-equal slices of ``layers`` layers."""
    if not isinstance(stages, int) or isinstance(stages, bool) or stages < 1:
        raise ValueError(f"stages: expected a positive int, got {stages!r}")
    if stages > layers:
        raise ValueError(
            f"stages: a network of {layers} layers cannot be cut into {stages} stages "
            "(each stage needs at least one layer)"
        )
    return [round(i * layers / stages) for i in range(stages + 1)]


def default_bounds(model, stages: int) -> list[int]:
    """Where to cut ``model`` into ``stages`` slices: a multi-stage model whose
    stage count equals ``stages`` is cut at its stage boundaries (the natural
    cuts); otherwise near-equal layer counts (:func:`split_bounds`)."""
    natural = model.stage_bounds() if getattr(model, "multistage", False) else None
    if natural is not None and len(natural) - 1 == stages:
        return natural
    return split_bounds(model.layers, stages)


def check_bounds(bounds, layers: int) -> list[int]:
    bounds = [int(b) for b in bounds]
    if (len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != layers
            or any(b <= a for a, b in zip(bounds, bounds[1:]))):
        raise ValueError(
            f"bounds: expected increasing layer indices from 0 to {layers}, got {bounds}"
        )
    return bounds


def _slice_stack(stack, lo, hi):
    """A copy of ``stack`` holding its layers ``lo .. hi-1``."""
    out = copy.deepcopy(stack)
    with torch.no_grad():
        out.weight = nn.Parameter(stack.weight.detach()[lo:hi].clone())
        out.bias = nn.Parameter(stack.bias.detach()[lo:hi].clone())
    out.layers = hi - lo
    return out


class StageNet(nn.Module):
    """One slice of a :class:`~stablenets_ext.models.StableNet`.

    ``forward(inputs)`` takes a tuple: ``(x,)`` for the first stage, the cut
    state otherwise; it returns the state at the next cut (a tuple), or the
    logits for the last stage.

    In a multi-stage model a slice may span several model stages (global layers
    ``lo .. hi-1``, see :meth:`~stablenets_ext.models.StableNet.pieces`); it then
    holds ``stacks`` (one slice per model stage it touches) and the
    ``transitions`` into the model stages it starts. A cut on a model-stage
    boundary carries ``(Y,)`` only (the next model stage starts at rest): see
    :attr:`in_parts` and :attr:`out_parts`."""

    def __init__(self, model: models.StableNet, lo: int, hi: int, index: int, count: int):
        super().__init__()
        self.index, self.count, self.lo, self.hi = index, count, lo, hi
        self.arch = model.arch
        self.parts = state_parts(model.arch)
        self.flatten = model.pool is None
        multistage = getattr(model, "multistage", False)
        if multistage:
            self.pieces = model.pieces(lo, hi)
            stacks = model.stage_stacks
            self.stacks = nn.ModuleList(_slice_stack(stacks[k], a, b) for k, a, b in self.pieces)
            self.transitions = nn.ModuleList(
                copy.deepcopy(model.transitions[k - 1]) if a == 0 and k > 0 else nn.Identity()
                for k, a, b in self.pieces)
            bounds = model.stage_bounds()
            self.in_parts = 1 if lo in bounds else self.parts
            self.out_parts = 1 if hi in bounds else self.parts
        else:
            self.pieces = [(0, lo, hi)]
            self.stack = _slice_stack(model.stack, lo, hi)
            self.in_parts = self.out_parts = self.parts
        self.lift = copy.deepcopy(model.lift) if index == 0 else None
        last = index == count - 1
        self.pool = copy.deepcopy(model.pool) if last and model.pool is not None else None
        self.classifier = copy.deepcopy(model.classifier) if last else None

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.count - 1

    @property
    def piece_stacks(self) -> list:
        """The stack slices this stage runs, in order."""
        return list(self.stacks) if "stacks" in self._modules else [self.stack]

    def forward(self, inputs):
        if self.first:
            x = inputs[0]
            if self.flatten and x.dim() > 2:
                x = x.flatten(1)
            y, carry = self.lift(x), None
        else:
            y = inputs[0]
            carry = inputs[1] if self.in_parts == 2 else None
        for i, stack in enumerate(self.piece_stacks):
            if "transitions" in self._modules and self.pieces[i][1] == 0 and self.pieces[i][0] > 0:
                y, carry = self.transitions[i](y), None  # a new model stage starts at rest
            if self.parts == 2:
                y, carry = stack(y, carry, return_state=True)
            else:
                y = stack(y)
        if not self.last:
            return (y, carry) if self.out_parts == 2 else (y,)
        if self.pool is not None:
            y = self.pool(y).flatten(1)
        return self.classifier(y)

    def penalty(self, alpha: float, alpha_c: float):
        """The backprop trainer's regularisers restricted to this stage's
        parameters (smoothness couples neighbouring layers within the stage)."""
        total = sum((regularizers.smoothness(s, alpha) for s in self.piece_stacks), 0.0)
        if self.last and alpha_c:
            total = total + 0.5 * alpha_c * self.classifier.weight.pow(2).sum()
        return total

    def extra_repr(self):
        return f"stage={self.index}/{self.count}, layers={self.lo}..{self.hi - 1}"


def split_model(model: models.StableNet, stages: int | None = None, bounds=None) -> list[StageNet]:
    """Copies of ``model``'s parameters as ``len(bounds)-1`` :class:`StageNet`\\ s."""
    if bounds is None:
        bounds = default_bounds(model, 2 if stages is None else stages)
    bounds = check_bounds(bounds, model.layers)
    count = len(bounds) - 1
    return [StageNet(model, bounds[k], bounds[k + 1], k, count) for k in range(count)]


@torch.no_grad()
def merge_stages(nets, model: models.StableNet) -> models.StableNet:
    """Write the stages' parameters back into ``model`` (in place)."""
    stacks = model.stage_stacks if hasattr(model, "stage_stacks") else [model.stack]
    for net in nets:
        for (k, a, b), piece in zip(net.pieces, net.piece_stacks):
            stacks[k].weight[a:b].copy_(piece.weight)
            stacks[k].bias[a:b].copy_(piece.bias)
        if "transitions" in net._modules:
            for (k, a, b), t in zip(net.pieces, net.transitions):
                if a == 0 and k > 0:
                    model.transitions[k - 1].load_state_dict(t.state_dict())
        if net.first:
            model.lift.load_state_dict(net.lift.state_dict())
        if net.last:
            model.classifier.load_state_dict(net.classifier.state_dict())
    return model


def chain_forward(nets, x):
    inputs = (x,)
    for net in nets:
        inputs = net(inputs)
    return inputs


@torch.no_grad()
def evaluate_stages(nets, x, y, batch_size=4096, device=None):
    """Mean cross-entropy and accuracy (a fraction) of the chained stages."""
    device = torch.device(device) if device is not None else next(nets[0].parameters()).device
    loss, correct, n = 0.0, 0, x.shape[0]
    modes = [net.training for net in nets]
    for net in nets:
        net.eval()
    for lo in range(0, n, batch_size):
        xb, yb = x[lo:lo + batch_size].to(device), y[lo:lo + batch_size].to(device)
        logits = chain_forward(nets, xb)
        loss += F.cross_entropy(logits, yb, reduction="sum").item()
        correct += (logits.argmax(1) == yb).sum().item()
    for net, mode in zip(nets, modes):
        net.train(mode)
    return loss / max(n, 1), correct / max(n, 1)


class SyntheticGradient(nn.Module):
    """Predicts the per-example gradient at a cut from the cut's state and, when
    ``classes > 0``, the one-hot label (Jaderberg et al. 2016, cDNI).

    Dense states ``(d,)``: one linear map (``hidden = 0``) or Linear-ReLU-Linear.
    Image states ``(C, H, W)`` (conv archs): the same with 1x1 convolutions, the
    label entering as constant one-hot planes and through a per-class gradient
    map (``label_map``), so the module stays small against the stage. The
    output layer starts at zero: an untrained module predicts a zero gradient."""

    def __init__(self, state_shape, parts: int, classes: int, hidden: int = 0):
        super().__init__()
        state_shape = tuple(int(s) for s in state_shape)
        self.state_shape, self.parts, self.classes = state_shape, int(parts), int(classes)
        self.size = math.prod(state_shape)
        self.hidden = int(hidden)
        self.spatial = len(state_shape) == 3
        if self.spatial:
            channels = state_shape[0]
            inputs, outputs = self.parts * channels + self.classes, self.parts * channels

            # 1x1: the per-class map below carries the spatial layout, so the
            # convolution only needs the local state (3x3 predicted no better on
            # digits and cost 9x; on MNIST it would cost half of a 4-layer stage)
            def layer(i, o):
                return nn.Conv2d(i, o, 1)
        else:
            inputs, outputs = self.parts * self.size + self.classes, self.parts * self.size
            layer = nn.Linear
        if self.hidden > 0:
            out = layer(self.hidden, outputs)
            self.net = nn.Sequential(layer(inputs, self.hidden), nn.ReLU(), out)
        else:
            out = layer(inputs, outputs)
            self.net = out
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        # Conv modules: a convolution sees the label only as constant planes,
        # so it cannot say *where* a class's gradient lies, yet at a conv cut
        # most of the gradient is exactly that (the classifier's weights on the
        # pooled map, carried back). A learned per-class gradient map adds it:
        # classes x (parts * C) x H x W numbers, an index and an add per example.
        # Fitted by a running per-class mean of the residual (StageRunner.learn),
        # the least-squares answer for a bias, not by Adam, which needs ~1/lr
        # steps to grow an O(1) entry and sees each class in a tenth of a batch.
        self.label_map = (nn.Parameter(torch.zeros(self.classes, outputs, *state_shape[1:]),
                                       requires_grad=False)
                          if self.spatial and self.classes else None)
        # The module predicts the gradient in units of a running RMS of its
        # targets (set by StageRunner.learn; 0 = not yet, read as 1):
        # per-example gradients are small (~0.05 on digits) and shrink as the
        # network learns, which Adam's unit-sized steps would swamp. A
        # parameter without a gradient, so it travels wherever the weights go.
        self.scale = nn.Parameter(torch.zeros(()), requires_grad=False)

    def _unit(self):
        return torch.where(self.scale > 0, self.scale, torch.ones_like(self.scale))

    @property
    def solvable(self) -> bool:
        """A linear map on a flat state: :class:`RidgeFit` can fit it exactly."""
        return not self.spatial and self.hidden == 0

    def inputs(self, state, labels):
        """The flat input of a dense module: the state parts, then the one-hot label."""
        n = state[0].shape[0]
        flat = [s.reshape(n, -1) for s in state]
        if self.classes:
            flat.append(F.one_hot(labels, self.classes).to(flat[0].dtype))
        return torch.cat(flat, 1)

    def forward(self, state, labels):
        n = state[0].shape[0]
        if self.spatial:
            parts = list(state)
            if self.classes:
                onehot = F.one_hot(labels, self.classes).to(parts[0].dtype)
                parts.append(onehot[:, :, None, None].expand(-1, -1, *self.state_shape[1:]))
            g = self.net(torch.cat(parts, 1))
            if self.label_map is not None:
                g = g + self.label_map[labels]
            g = g * self._unit()
            c = self.state_shape[0]
            return tuple(g[:, i * c:(i + 1) * c] for i in range(self.parts))
        g = self.net(self.inputs(state, labels)) * self._unit()
        return tuple(g[:, i * self.size:(i + 1) * self.size].reshape(n, *self.state_shape)
                     for i in range(self.parts))

    def extra_repr(self):
        return (f"state={self.parts}x{self.state_shape}, classes={self.classes}, "
                f"hidden={self.hidden}")


def make_sg_modules(nets, probe_x, classes, hidden=0, conditional=True) -> list[SyntheticGradient]:
    """One SG module per cut; shapes found by running ``probe_x`` (a few rows)."""
    with torch.no_grad():
        state, mods = (probe_x[:1].to(next(nets[0].parameters()).device),), []
        for net in nets[:-1]:
            state = net(state)
            mods.append(SyntheticGradient(state[0].shape[1:], len(state),
                                          classes if conditional else 0, hidden))
    return mods


SCALE_RATE = 0.05
LABEL_MAP_RATE = 0.3


def update_scale(scale, rms):
    """An SG module's unit: the targets' RMS on the first batch, then an
    exponential average (about 20 batches), following the shrinking gradients."""
    scale.copy_(torch.where(scale > 0, scale + SCALE_RATE * (rms - scale), rms))
SG_FITS = ("auto", "solve", "adam")


class RidgeFit:
    """Fits a linear SG module by least squares over the recent batches: the
    minimiser of the module's L2 loss on the true gradients, each batch's
    weight decaying by ``forget`` per batch (recursive least squares), with a
    ridge of ``ridge`` times the mean diagonal of the normal matrix.

    Jaderberg et al. train the module by SGD on that same loss. Adam steps on
    it cannot keep up with a target that moves as fast as the network learns
    (on digits, ``sg_rel_error`` stayed at 0.99 while a least-squares fit of
    the same linear map on the same batches reaches 0.3-0.6); the module, its
    inputs and its loss are the paper's, only the minimiser differs.

    Cost per batch, ``D`` = state size + classes + 1 inputs, ``O`` outputs:
    the normal equations (``B D^2 + B D O``) and the fit (a Cholesky
    factorisation and solve, ``D^3 + D^2 O``); on digits (``D`` = 139) about
    1-3 ms, as much as a backprop step of the whole fused network. ``every >
    1`` solves only every ``every`` batches after ``warmup`` (the last fit
    standing in between); on digits at h = 0.5 that let the relative error go
    above 1, so the default solves every batch.
    """

    def __init__(self, sg: SyntheticGradient, forget: float = 0.9, ridge: float = 1e-3,
                 every: int = 1, warmup: int = 8):
        if not sg.solvable:
            raise ValueError("sg_fit: 'solve' fits a linear SG module on a flat state; this one "
                             f"is {'convolutional' if sg.spatial else 'an MLP'} (use 'adam')")
        self.sg, self.forget, self.ridge = sg, forget, ridge
        self.every, self.warmup = every, warmup
        self.gram = self.cross = None
        self.batches = 0

    @torch.no_grad()
    def step(self, state, labels, target, rms):
        """Learn from one batch; returns the squared error of the module's
        prediction before it (the statistics' numerator). ``rms``: the
        targets' RMS, folded into the module's scale first."""
        sg = self.sg
        n = labels.shape[0]
        x = sg.inputs(state, labels)
        y = torch.cat([g.reshape(n, -1) for g in target], 1)
        sq = (torch.addmm(sg.net.bias, x, sg.net.weight.T).mul_(sg._unit()) - y).pow_(2).sum()
        old = sg._unit().clone()
        update_scale(sg.scale, rms)
        x = torch.cat([x, x.new_ones(n, 1)], 1)
        gram, cross = x.T @ x, x.T @ y
        if self.gram is None:
            self.gram, self.cross = gram, cross
        else:
            self.gram.mul_(self.forget).add_(gram)
            self.cross.mul_(self.forget).add_(cross)
        self.batches += 1
        if self.batches <= self.warmup or self.batches % self.every == 0:
            eye = torch.eye(self.gram.shape[0], dtype=x.dtype, device=x.device)
            reg = self.ridge * self.gram.diagonal().mean().clamp_min(1e-12)
            chol, info = torch.linalg.cholesky_ex(self.gram + reg * eye)
            if int(info) == 0:  # else (not positive definite in floating point) keep the last
                w = torch.cholesky_solve(self.cross, chol).div_(sg.scale.clamp_min(1e-12))
                sg.net.weight.copy_(w[:-1].T)
                sg.net.bias.copy_(w[-1])
                return sq
        # the last fit stands; keep its prediction in absolute units
        ratio = old / sg.scale.clamp_min(1e-12)
        sg.net.weight.mul_(ratio)
        sg.net.bias.mul_(ratio)
        return sq

    def state_dict(self) -> dict:
        return {"gram": self.gram, "cross": self.cross, "batches": self.batches}

    def load_state_dict(self, state: dict):
        self.gram, self.cross = state["gram"], state["cross"]
        self.batches = state["batches"]



class StageRunner:
    """One stage's parameters, SG module (not for the last stage), optimisers
    and statistics, with the three operations of the schedule: :meth:`forward`,
    :meth:`backward`, :meth:`learn`."""

    def __init__(self, net: StageNet, sg: SyntheticGradient | None, *, lr, epochs, sg_lr=1e-3,
                 sg_fit="auto", weight_decay=0.0, lr_step=None, lr_gamma=0.5, alpha=0.0,
                 alpha_c=0.0, amp=None):
        self.net, self.sg = net, sg
        # Mixed precision: the stage's forward and its loss run under autocast; the
        # states and gradients crossing a cut, the SG module (its prediction and
        # fit) and the optimisers stay float32. fp16: the stage's own loss scale
        # (..amp.LossScale) seeds its backward scaled; the step is skipped on an
        # inf/NaN gradient, and the input gradient it hands upstream is unscaled
        # (a non-finite one is not learnt from, see learn).
        first = next(net.parameters())
        self.amp = _amp.Amp(amp, first.device, manual_scale=True)
        self.dtype = first.dtype
        self.index = net.index
        self.alpha, self.alpha_c = alpha, alpha_c
        self.opt, self.sched = backprop.make_optimizer(net, lr, weight_decay, lr_step, lr_gamma,
                                                       epochs)
        if sg_fit not in SG_FITS:
            raise ValueError(f"sg_fit: expected one of {SG_FITS}, got {sg_fit!r}")
        if sg is not None and sg_fit == "auto":
            sg_fit = "solve" if sg.solvable else "adam"
        self.sg_fit = sg_fit if sg is not None else None
        self.sg_opt = self.sg_solver = None
        if self.sg_fit == "adam":
            self.sg_opt = torch.optim.Adam([p for p in sg.parameters() if p.requires_grad],
                                           lr=sg_lr, foreach=True)
        elif self.sg_fit == "solve":
            self.sg_solver = RidgeFit(sg)
        self.pending: dict[int, tuple] = {}   # batch -> (detached output state, labels)
        self._graph = None
        self.reset_stats()

    @property
    def first(self):
        return self.net.first

    @property
    def last(self):
        return self.net.last

    def reset_stats(self):
        self.busy = 0.0
        self.loss_sum, self.correct, self.count = 0.0, 0, 0
        self._loss_acc = None
        self.sg_sq, self.sg_norm, self.sg_numel, self.sg_batches = None, None, 0, 0
        self.sg_skipped = 0

    # ------------------------------------------------------------ schedule

    def forward(self, t: int, inputs, labels):
        """Forward of batch ``t``; returns the detached output state (to hand to
        the next stage), or None for the last stage."""
        start = time.perf_counter()
        if not self.first:
            inputs = tuple(i.detach().requires_grad_() for i in inputs)
        with self.amp.autocast():
            out = self.net(inputs)
            loss = F.cross_entropy(out, labels) if self.last else None
        if self.last:
            n = labels.shape[0]
            hits = (out.detach().argmax(1) == labels).sum().to(loss.dtype)
            stats = torch.stack([loss.detach() * n, hits])
            self._loss_acc = stats if self._loss_acc is None else self._loss_acc + stats
            self.count += n
            self._graph = (inputs, loss, t, labels)
            self.busy += time.perf_counter() - start
            return None
        # the parameters' dtype (float32) across the cut: a no-op without autocast
        detached = tuple(o.detach().to(self.dtype) for o in out)
        self.pending[t] = (detached, labels)
        self._graph = (inputs, out, t, labels)
        self.busy += time.perf_counter() - start
        return detached

    def backward(self, grads=None):
        """Backward of the last :meth:`forward` and an optimiser step. ``grads``:
        the true per-example gradients of the output (None: ask the SG module).
        Returns the per-example gradients of the input, or None for stage 0."""
        start = time.perf_counter()
        inputs, out, t, labels = self._graph
        self._graph = None
        self.opt.zero_grad(set_to_none=True)
        penalty = self.net.penalty(self.alpha, self.alpha_c)
        ls = self.amp.loss_scale
        scale = ls.scale if ls is not None else 1.0
        if self.last:
            total = out + penalty
            (total * scale if ls is not None else total).backward()
        else:
            if grads is None:
                with torch.no_grad():
                    grads = self.sg(self.pending[t][0], labels)
            n = labels.shape[0]
            # scaled before the cast: a float16 seed of g / n alone would underflow
            tensors, seeds = list(out), [(g * (scale / n)).to(o.dtype) for g, o in zip(grads, out)]
            if isinstance(penalty, torch.Tensor):
                tensors.append(penalty)
                seeds.append(torch.full_like(penalty, scale))
            torch.autograd.backward(tensors, seeds)
        if ls is None:
            self.opt.step()
        else:
            params = [p.grad for p in self.net.parameters() if p.grad is not None]
            finite = ls.all_finite(params + [i.grad for i in inputs if not self.first])
            if finite:
                torch._foreach_div_(params, scale)
                self.opt.step()
            ls.update(finite)
        result = None
        if not self.first:
            n = labels.shape[0]
            result = tuple((i.grad if i.grad is not None else torch.zeros_like(i)) * (n / scale)
                           for i in inputs)
        self.busy += time.perf_counter() - start
        return result

    def learn(self, t: int, target):
        """Train the SG module on the true per-example gradient of batch ``t``."""
        start = time.perf_counter()
        state, labels = self.pending.pop(t)
        target = tuple(g.detach() for g in target)
        numel = sum(g.numel() for g in target)
        with torch.no_grad():
            norm = sum(g.pow(2).sum() for g in target)
            rms = (norm / numel).sqrt()
        if self.amp.loss_scale is not None and not torch.isfinite(norm).item():
            # fp16: the next stage's backward overflowed (and skipped its step)
            self.sg_skipped += 1
            self.busy += time.perf_counter() - start
            return
        if self.sg_solver is not None:
            sq = self.sg_solver.step(state, labels, target, rms)
        else:
            with torch.no_grad():
                update_scale(self.sg.scale, rms)
                inv = 1.0 / self.sg.scale.clamp_min(1e-12)
            pred = self.sg(state, labels)
            sq = sum(F.mse_loss(p, g, reduction="sum") for p, g in zip(pred, target))
            self.sg_opt.zero_grad(set_to_none=True)
            (sq * inv.square() / numel).backward()
            self.sg_opt.step()
            sq = sq.detach()
            if self.sg.label_map is not None:
                self._fit_label_map(labels, pred, target, inv)
        self.sg_sq = sq if self.sg_sq is None else self.sg_sq + sq
        self.sg_norm = norm if self.sg_norm is None else self.sg_norm + norm
        self.sg_numel += numel
        self.sg_batches += 1
        self.busy += time.perf_counter() - start

    @torch.no_grad()
    def _fit_label_map(self, labels, pred, target, inv):
        """Move each present class's gradient map part of the way to the mean
        residual of its examples (in the module's units)."""
        lm = self.sg.label_map
        resid = torch.cat([(g - p.detach()) for p, g in zip(pred, target)], 1) * inv
        sums = torch.zeros_like(lm).index_add_(0, labels, resid)
        counts = torch.bincount(labels, minlength=lm.shape[0]).to(lm.dtype)
        lm.add_(sums / counts.clamp_min(1).view(-1, 1, 1, 1), alpha=LABEL_MAP_RATE)

    def end_epoch(self):
        self.sched.step()

    def epoch_stats(self) -> dict:
        """Statistics since the last :meth:`reset_stats` (plain Python numbers)."""
        stats = {"busy": self.busy, "lr": self.opt.param_groups[0]["lr"]}
        if self.last and self._loss_acc is not None:
            loss_sum, correct = self._loss_acc.tolist()
            stats.update(loss_sum=loss_sum, correct=int(round(correct)), count=self.count)
        if self.sg is not None:
            if self.sg_batches:
                stats["sg_loss"] = self.sg_sq.item() / self.sg_numel
                ratio = self.sg_sq.item() / max(self.sg_norm.item(), 1e-30)
                stats["sg_rel_error"] = math.sqrt(ratio)
            else:
                stats["sg_loss"] = stats["sg_rel_error"] = float("nan")
        return stats

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {
            "net": self.net.state_dict(), "sg": None if self.sg is None else self.sg.state_dict(),
            "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
            "sg_opt": None if self.sg_opt is None else self.sg_opt.state_dict(),
            "sg_solver": None if self.sg_solver is None else self.sg_solver.state_dict(),
            **({"loss_scale": self.amp.loss_scale.state_dict()}
               if self.amp.loss_scale is not None else {}),
        }

    def load_state_dict(self, state: dict):
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        if self.amp.loss_scale is not None:
            self.amp.loss_scale.load_state_dict(state.get("loss_scale"))
        if self.sg is not None:
            self.sg.load_state_dict(state["sg"])
            saved = state.get("sg_solver") is not None
            if (self.sg_solver is not None) != saved or (
                    self.sg_opt is not None and state.get("sg_opt") is None):
                raise ValueError(f"resume: the checkpoint's SG module of stage {self.index} was "
                                 f"fitted {'by least squares' if saved else 'with Adam'}; this "
                                 f"run fits it {'by least squares' if self.sg_solver else 'with Adam'}"
                                 " (--sg-fit)")
            if self.sg_solver is not None:
                self.sg_solver.load_state_dict(state["sg_solver"])
            else:
                self.sg_opt.load_state_dict(state["sg_opt"])


def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The shuffled batches of an epoch: the same permutation as
    :class:`~stablenets_ext.data.TensorLoader` draws from ``(seed, epoch)``."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return list(torch.randperm(n, generator=g).split(batch_size))


def combine_epoch(stats: list[dict]) -> dict:
    """Per-stage statistics of one epoch -> the history fields."""
    busy = [s["busy"] for s in stats]
    last = stats[-1]
    count = max(last.get("count", 0), 1)
    return {
        "loss": last.get("loss_sum", float("nan")) / count,
        "lr": stats[0]["lr"],
        "train_accuracy": last.get("correct", 0) / count,
        "sg_loss": [s["sg_loss"] for s in stats[:-1]],
        "sg_rel_error": [s["sg_rel_error"] for s in stats[:-1]],
        "busy_seconds": busy,
        "theoretical_seconds": max(busy),
    }
