"""Trainers: plain backpropagation, multilevel (layer doubling), and (in their
own modules, imported on demand) synthetic gradients and PVD."""

from .backprop import evaluate, train
from .multilevel import train_multilevel
from .presets import PRESETS, preset

__all__ = ["PRESETS", "evaluate", "preset", "train", "train_multilevel"]
