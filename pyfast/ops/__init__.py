"""The fused functional ops (docs/ARCHITECTURE.md, section 4). Each takes `backend=` to override
the dispatcher's choice for that call."""
from . import lean
from ._bn import BatchNormArgs
from ._cache import clear as clear_cache
from .backends import BACKENDS, get_backend, select, set_backend, use_backend
from .bn_add_relu import add_relu, bn_add_relu, conv_bn_add_relu
from .bn_relu_conv import bn_relu_conv
from .conv_bn_relu import conv_bn_relu, fold_batch_norm

__all__ = ["BACKENDS", "BatchNormArgs", "add_relu", "clear_cache", "bn_add_relu", "bn_relu_conv", "conv_bn_add_relu",
           "conv_bn_relu", "fold_batch_norm", "get_backend", "lean", "select", "set_backend", "use_backend"]
