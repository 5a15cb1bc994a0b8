"""BNReLUConv2d: conv(relu(bn(x))), the pre-activation unit, as one fused call keeping the plain
sequence's state_dict."""
from typing import Optional

from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin

from . import functional
from ._common import ConvBNSequential, check_backend, check_conv, initialize_lazy, make_batch_norm, make_lazy_conv


class BNReLUConv2d(ConvBNSequential):
    """`nn.Sequential(nn.BatchNorm2d, nn.ReLU, nn.Conv2d)` whose forward is `pyfast.ops.bn_relu_conv`
    (He et al. 2016, "Identity Mappings in Deep Residual Networks").

    The children are the plain modules, so the state_dict keys are the sequence's (`0.weight`,
    `0.running_mean`, ..., `2.weight`); `.bn` and `.conv` name them. Arguments are nn.Conv2d's (the BN
    normalizes its `in_channels`) and nn.BatchNorm2d's, plus `relu` (False: no ReLU child, conv(bn(x))),
    `backend`, and `sync_bn` / `process_group` (a SyncBatchNorm2d child).
    """

    OP = "bn_relu_conv"
    _make_bn = staticmethod(make_batch_norm)

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, padding_mode: str = "zeros", eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True, track_running_stats: bool = True,
                 relu: bool = True, backend: Optional[str] = None, sync_bn: bool = False, process_group=None,
                 device=None, dtype=None):
        check_conv(padding_mode, padding, kernel_size, dilation)
        factory = {"device": device, "dtype": dtype}
        bn = self._make_bn(in_channels, eps, momentum, affine, track_running_stats, sync_bn, process_group, factory)
        conv = self._make_conv(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                               padding_mode, factory)
        super().__init__(bn, *([nn.ReLU()] if relu else []), conv)
        self.backend = check_backend(backend)

    @classmethod
    def from_modules(cls, bn: nn.BatchNorm2d, conv: nn.Conv2d, relu: bool = True,
                     backend: Optional[str] = None) -> "BNReLUConv2d":
        """The fused module over existing `bn` and `conv`, sharing their parameters and buffers."""
        if not isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            raise TypeError(f"bn must be an nn.BatchNorm2d or nn.SyncBatchNorm, got {type(bn).__name__}")
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        check_conv(conv.padding_mode, conv.padding, conv.kernel_size, conv.dilation)
        if conv.in_channels != bn.num_features:
            raise ValueError(f"bn has {bn.num_features} features but conv has {conv.in_channels} input channels")
        return cls._over([bn, *([nn.ReLU()] if relu else []), conv], backend)

    @property
    def bn(self) -> nn.BatchNorm2d:
        return self._modules["0"]

    @property
    def conv(self) -> nn.Conv2d:
        return self._modules[str(len(self._modules) - 1)]

    def forward(self, x: Tensor) -> Tensor:
        return functional.bn_relu_conv(x, self.bn, self.conv, relu=self.has_relu, backend=self.backend)


class LazyBNReLUConv2d(LazyModuleMixin, BNReLUConv2d):
    """BNReLUConv2d whose in_channels is inferred from the first input (nn.LazyBatchNorm2d and
    nn.LazyConv2d children); after that call it is a BNReLUConv2d. No `sync_bn` (SyncBatchNorm2d has no
    lazy form): convert after the first call with `pyfast.nn.convert_sync_batchnorm`."""

    cls_to_become = BNReLUConv2d
    _make_conv = staticmethod(make_lazy_conv)

    def __init__(self, out_channels: int, kernel_size, stride=1, padding=0, dilation=1, groups: int = 1,
                 bias: bool = False, padding_mode: str = "zeros", eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True, track_running_stats: bool = True,
                 relu: bool = True, backend: Optional[str] = None, device=None, dtype=None):
        super().__init__(0, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, eps,
                         momentum, affine, track_running_stats, relu, backend, False, None, device, dtype)

    @staticmethod
    def _make_bn(num_features, eps, momentum, affine, track_running_stats, sync_bn, process_group, factory):
        return nn.LazyBatchNorm2d(eps, momentum, affine, track_running_stats, **factory)

    def initialize_parameters(self, x: Tensor) -> None:
        initialize_lazy(self.bn, x)
        initialize_lazy(self.conv, x)
