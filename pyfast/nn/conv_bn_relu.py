"""ConvBNReLU2d: relu(bn(conv(x))) as one fused call, keeping the plain sequence's state_dict."""
from typing import Optional

from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin

from . import functional
from ._common import ConvBNSequential, check_backend, check_conv, initialize_lazy, make_batch_norm, make_lazy_conv


class ConvBNReLU2d(ConvBNSequential):
    """`nn.Sequential(nn.Conv2d, nn.BatchNorm2d, nn.ReLU)` whose forward is `pyfast.ops.conv_bn_relu`.

    The children are the plain modules, so the state_dict keys are the sequence's (`0.weight`,
    `1.weight`, `1.running_mean`, ...) and checkpoints load both ways; `.conv` and `.bn` name them.
    Arguments are nn.Conv2d's and nn.BatchNorm2d's, plus:

    - relu: False drops the ReLU child (a residual branch's last conv+BN);
    - backend: this module's backend (None: the global default, see `pyfast.set_backend`);
    - sync_bn / process_group: a SyncBatchNorm2d child: batch statistics over the process group.

    Only zero padding (padding_mode='zeros') and symmetric padding are fused; anything else raises.
    """

    OP = "conv_bn_relu"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, padding_mode: str = "zeros", eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True, track_running_stats: bool = True,
                 relu: bool = True, backend: Optional[str] = None, sync_bn: bool = False, process_group=None,
                 device=None, dtype=None):
        check_conv(padding_mode, padding, kernel_size, dilation)
        factory = {"device": device, "dtype": dtype}
        conv = self._make_conv(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                               padding_mode, factory)
        bn = make_batch_norm(out_channels, eps, momentum, affine, track_running_stats, sync_bn, process_group,
                             factory)
        super().__init__(conv, bn, *([nn.ReLU()] if relu else []))
        self.backend = check_backend(backend)

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool = True,
                     backend: Optional[str] = None) -> "ConvBNReLU2d":
        """The fused module over existing `conv` and `bn`: it holds those very modules, so parameters,
        buffers and their updates are shared."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if not isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            raise TypeError(f"bn must be an nn.BatchNorm2d or nn.SyncBatchNorm, got {type(bn).__name__}")
        check_conv(conv.padding_mode, conv.padding, conv.kernel_size, conv.dilation)
        if conv.out_channels != bn.num_features:
            raise ValueError(f"conv has {conv.out_channels} output channels but bn has {bn.num_features} features")
        return cls._over([conv, bn, *([nn.ReLU()] if relu else [])], backend)

    @property
    def conv(self) -> nn.Conv2d:
        return self._modules["0"]

    @property
    def bn(self) -> nn.BatchNorm2d:
        return self._modules["1"]

    def forward(self, x: Tensor) -> Tensor:
        return functional.conv_bn_relu(x, self.conv, self.bn, relu=self.has_relu, backend=self.backend)


class LazyConvBNReLU2d(LazyModuleMixin, ConvBNReLU2d):
    """ConvBNReLU2d whose in_channels is inferred from the first input (an nn.LazyConv2d child); after that
    call it is a ConvBNReLU2d."""

    cls_to_become = ConvBNReLU2d
    _make_conv = staticmethod(make_lazy_conv)

    def __init__(self, out_channels: int, kernel_size, stride=1, padding=0, dilation=1, groups: int = 1,
                 bias: bool = False, padding_mode: str = "zeros", eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True, track_running_stats: bool = True,
                 relu: bool = True, backend: Optional[str] = None, sync_bn: bool = False, process_group=None,
                 device=None, dtype=None):
        super().__init__(0, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, eps,
                         momentum, affine, track_running_stats, relu, backend, sync_bn, process_group, device,
                         dtype)

    def initialize_parameters(self, x: Tensor) -> None:
        initialize_lazy(self.conv, x)
