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


def check_bf16_only(amp, trainer: str) -> None:
    """Refuse fp16 for a trainer that runs bf16 but has no correct gradient
    scaler: its gradients cross stages or processes (SG's per-stage backward
    seeded by synthetic gradients, PVD's per-block subproblems and its
    synchronisation), where one scaler's skipped steps and scale changes would
    have to be agreed by every part. bf16 has float32's range and needs none."""
    check_mode(amp)
    if amp == "fp16":
        raise OptionError(f"amp: fp16 needs a gradient scaler, which the {trainer} trainer "
                          f"cannot apply across its stages/workers; use --amp bf16 (or backprop)")


class Amp:
    """What one training process needs: the autocast region and, for fp16, the scaler."""

    def __init__(self, amp, device):
        check_device(amp, device)
        self.mode = amp
        self.device_type = torch.device(device if device is not None else "cpu").type
        self.scaler = (torch.amp.GradScaler(self.device_type) if amp == "fp16" else None)

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
