"""stablenets-ext: fused kernels for the stable deep networks of Haber & Ruthotto (2017)."""

from . import functional, reference
from ._info import __version__, info
from .layers import AntisymmetricStack, LeapfrogStack, ResNetStack, VerletStack

__all__ = [
    "AntisymmetricStack",
    "LeapfrogStack",
    "ResNetStack",
    "VerletStack",
    "__version__",
    "functional",
    "info",
    "reference",
]
