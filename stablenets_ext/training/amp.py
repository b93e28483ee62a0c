"""Mixed-precision training (``TrainConfig.amp``, ``stablenets train --amp``).

``"bf16"`` runs each forward (and its loss) under ``torch.autocast`` in bfloat16;
``"fp16"`` in float16 with a gradient scaler (float16's range is too narrow for
small gradients). Parameters and optimiser state stay float32. A device that
cannot honour the choice is refused by name before training starts, never
silently run in float32.
"""

from __future__ import annotations

import contextlib

import torch

from .options import OptionError

MODES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_mode(amp) -> None:
    if amp is not None and amp not in MODES:
        raise OptionError(f"amp: expected one of {sorted(MODES)} or None, got {amp!r}")


def check_device(amp, device) -> None:
    """Refuse ``amp`` on a device that cannot run it."""
    if amp is None:
        return
    check_mode(amp)
    device = torch.device(device if device is not None else "cpu")
    if device.type not in ("cpu", "cuda") or not torch.amp.is_autocast_available(device.type):
        raise OptionError(f"amp: torch.autocast is not available on device {device.type!r}")
    if device.type == "cuda" and amp == "bf16" and not torch.cuda.is_bf16_supported():
        raise OptionError(f"amp: bf16: this GPU ({torch.cuda.get_device_name(device)}) has no "
                          "bfloat16 support; use --amp fp16")
    if device.type == "cpu" and amp == "fp16" and not hasattr(torch.amp, "GradScaler"):
        raise OptionError("amp: fp16 on the CPU needs torch.amp.GradScaler (torch >= 2.3); "
                          "use --amp bf16")


class LossScale:
    """Dynamic loss scaling for float16 where ``torch.amp.GradScaler`` cannot drive the
    step: SG's stages (each seeds its backward with a gradient, not a loss, and hands
    the unscaled gradient of its input upstream) and PVD's workers (their own Adam,
    and gradient sums written to shared memory). The same rule as GradScaler's: start
    at 2**16; a step whose gradients hold an inf or NaN is skipped and the scale
    halved; after ``growth_interval`` finite steps in a row it doubles. Each stage or
    worker keeps its own: their backwards are separate graphs, and what crosses
    between them is unscaled."""

    def __init__(self, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000):
        self.scale = float(init_scale)
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval = growth_interval
        self.good_steps = 0
        self.skipped = 0

    @staticmethod
    def all_finite(tensors) -> bool:
        """Whether every tensor is free of inf and NaN (one host sync for all)."""
        tensors = [t for t in tensors if t is not None]
        if not tensors:
            return True
        return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())

    def update(self, finite: bool) -> None:
        if not finite:
            self.scale *= self.backoff_factor
            self.good_steps = 0
            self.skipped += 1
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped": self.skipped}

    def load_state_dict(self, state) -> None:
        if state:
            self.scale = float(state["scale"])
            self.good_steps = int(state["good_steps"])
            self.skipped = int(state.get("skipped", 0))


class Amp:
    """What one training process needs: the autocast region and, for fp16, the scaler
    (``torch.amp.GradScaler`` for a torch optimiser's step; ``manual_scale=True``: a
    :class:`LossScale` the trainer applies itself, as ``loss_scale``)."""

    def __init__(self, amp, device, *, manual_scale=False):
        check_device(amp, device)
        self.mode = amp
        self.device_type = torch.device(device if device is not None else "cpu").type
        fp16 = amp == "fp16"
        self.scaler = torch.amp.GradScaler(self.device_type) if fp16 and not manual_scale else None
        self.loss_scale = LossScale() if fp16 and manual_scale else None

    def autocast(self):
        if self.mode is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=MODES[self.mode])

    def backward(self, loss) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, opt) -> None:
        if self.scaler is None:
            opt.step()
            return
        self.scaler.step(opt)
        self.scaler.update()

    def state_dict(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
