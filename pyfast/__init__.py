"""pyfast: fused kernels for the convolution blocks of ResNet/ResNeXt/RegNet networks.

Layers, bottom up: pyfast._C and pyfast.kernels (the kernels), pyfast.ops (fused functional ops,
their autograd and backend dispatch), pyfast.nn (drop-in modules and fuse), pyfast.models (families).
"""
from . import _extension  # noqa: F401  (loads pyfast._C first: it registers the torch.ops.pyfast.* kernels)
from . import models, nn, ops
from .nn import fuse
from .ops import get_backend, set_backend, use_backend
from .ops.lean import set_lean

__version__ = "0.1.0"
__all__ = ["fuse", "get_backend", "models", "nn", "ops", "set_backend", "set_lean", "use_backend", "__version__"]
