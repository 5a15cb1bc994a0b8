"""Drop-in modules over pyfast's fused ops, their functional form, and `fuse(model)`.

The modules keep the state_dict keys of the plain PyTorch sequences they replace, so checkpoints load
both ways: ConvBNReLU2d / BNReLUConv2d are nn.Sequential subclasses of the plain modules, BNAddReLU is an
nn.BatchNorm2d.
"""
from . import functional
from ._report import FuseReport, Fusion, LeftAlone
from ._sequential import FusedSequential
from ._sync import SyncBatchNorm2d, convert_sync_batchnorm
from .bn_add_relu import AddReLU, BNAddReLU, LazyBNAddReLU
from .bn_relu_conv import BNReLUConv2d, LazyBNReLUConv2d
from .conv_bn_relu import ConvBNReLU2d, LazyConvBNReLU2d
from ._graph_module import FusedGraphModule
from .fuse import fuse

__all__ = ["AddReLU", "BNAddReLU", "BNReLUConv2d", "ConvBNReLU2d", "FuseReport", "FusedGraphModule", "FusedSequential",
           "Fusion", "LazyBNAddReLU", "LazyBNReLUConv2d", "LazyConvBNReLU2d", "LeftAlone", "SyncBatchNorm2d",
           "convert_sync_batchnorm",
           "functional", "fuse"]
