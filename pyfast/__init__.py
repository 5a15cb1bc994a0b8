"""pyfast: fused kernels for the convolution blocks of ResNet/ResNeXt/RegNet networks."""
from . import _extension  # loads pyfast._C first: it registers the torch.ops.pyfast.* kernels
from . import ops
from .ops import get_backend, set_backend, use_backend

__version__ = "0.1.0"
__all__ = ["ops", "get_backend", "set_backend", "use_backend", "__version__"]
