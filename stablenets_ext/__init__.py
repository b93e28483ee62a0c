"""stablenets-ext: fused kernels for the stable deep networks of Haber & Ruthotto (2017).

Dense stacks (``(B, features)`` states): :class:`ResNetStack`,
:class:`AntisymmetricStack`, :class:`LeapfrogStack`, :class:`VerletStack`;
their functional forms in :mod:`stablenets_ext.functional`. Convolutional
stacks (``(B, C, H, W)`` states): :class:`ConvResNetStack`,
:class:`ConvAntisymmetricStack`, :class:`ConvLeapfrogStack`,
:class:`ConvVerletStack`; functional forms in :mod:`stablenets_ext.conv`. A
ready-made classifier: :class:`StableNet` (and :func:`double_layers`). The same
maths in plain PyTorch: :mod:`stablenets_ext.reference`. The reference page is
``docs/api.md``.
"""

from . import conv, functional, models, reference
from ._info import __version__, info
from .conv import ConvAntisymmetricStack, ConvLeapfrogStack, ConvResNetStack, ConvVerletStack
from .layers import AntisymmetricStack, LeapfrogStack, ResNetStack, VerletStack
from .models import StableNet, double_layers

__all__ = [
    "AntisymmetricStack",
    "ConvAntisymmetricStack",
    "ConvLeapfrogStack",
    "ConvResNetStack",
    "ConvVerletStack",
    "LeapfrogStack",
    "ResNetStack",
    "StableNet",
    "VerletStack",
    "__version__",
    "conv",
    "double_layers",
    "functional",
    "info",
    "models",
    "reference",
]
