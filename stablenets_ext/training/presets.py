"""Hyper-parameters found to reach the targets quickly; the CLI's defaults.

``PRESETS[dataset]`` holds the settings shared by every architecture and
``ARCH_PRESETS[(dataset, arch)]`` what differs for one. Measured results are
in the comments (2-core machine, fused kernels unless noted)."""

from __future__ import annotations

PRESETS = {
    "swiss": {"arch": "verlet", "layers": 64, "width": 4, "step": 0.1, "activation": "tanh",
              "epochs": 60, "batch_size": 32, "lr": 0.05, "lr_step": None, "lr_gamma": 0.5,
              "weight_decay": 0.0, "alpha": 0.0, "alpha_c": 0.0},
    "ellipse": {"arch": "verlet", "layers": 16, "width": 4, "step": 0.1, "activation": "tanh",
                "epochs": 20, "batch_size": 32, "lr": 0.05, "lr_step": None, "lr_gamma": 0.5,
                "weight_decay": 0.0, "alpha": 0.0, "alpha_c": 0.0},
    "digits": {"arch": "verlet", "layers": 8, "width": 64, "step": 0.1, "activation": "tanh",
               "epochs": 30, "batch_size": 64, "lr": 0.01, "lr_step": None, "lr_gamma": 0.5,
               "weight_decay": 0.0, "alpha": 0.0, "alpha_c": 0.0},
    "mnist": {"arch": "conv-verlet", "layers": 8, "width": 16, "step": 0.1, "activation": "tanh",
              "epochs": 5, "batch_size": 128, "lr": 0.005, "lr_step": 2, "lr_gamma": 0.5,
              "weight_decay": 0.0, "alpha": 0.0, "alpha_c": 0.0},
    "cifar10": {"arch": "conv-verlet", "layers": 8, "width": 32, "step": 0.1, "activation": "tanh",
                "epochs": 20, "batch_size": 128, "lr": 0.005, "lr_step": 8, "lr_gamma": 0.5,
                "weight_decay": 0.0, "alpha": 0.0, "alpha_c": 0.0},
    "cifar100": {"arch": "conv-verlet", "layers": 8, "width": 32, "step": 0.1, "activation": "tanh",
                 "epochs": 20, "batch_size": 128, "lr": 0.005, "lr_step": 8, "lr_gamma": 0.5,
                 "weight_decay": 0.0, "alpha": 0.0, "alpha_c": 0.0},
}

ARCH_PRESETS: dict[tuple[str, str], dict] = {}


def preset(dataset: str, arch: str | None = None) -> dict:
    """The settings for ``dataset`` (and ``arch``, default the dataset's own)."""
    if dataset not in PRESETS:
        raise ValueError(f"dataset: expected one of {list(PRESETS)}, got {dataset!r}")
    out = dict(PRESETS[dataset])
    arch = arch or out["arch"]
    out["arch"] = arch
    out.update(ARCH_PRESETS.get((dataset, arch), {}))
    return out
