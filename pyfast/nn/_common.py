"""What the module files share: argument checks, the conv and BN a module builds, the backend its repr
shows, the one-time initialization of lazy children, and the base of the two conv+BN sequences."""
from typing import Optional

import torch
from torch import nn

from .. import ops
from ..ops.backends import check_name
from ._sync import SyncBatchNorm2d
from .functional import resolve_padding


def check_backend(backend: Optional[str]) -> Optional[str]:
    """A module's backend override: a backend name, "auto", or None (the global default)."""
    return check_name(backend, optional=True)


def check_conv(padding_mode: str, padding, kernel_size, dilation) -> None:
    """The convolutions the fused kernels run: zero padding, symmetric."""
    if padding_mode != "zeros":
        raise ValueError(f"padding_mode={padding_mode!r} is not supported: the fused kernels pad with zeros")
    resolve_padding(padding, kernel_size, dilation)


def make_batch_norm(num_features: int, eps: float, momentum: Optional[float], affine: bool,
                    track_running_stats: bool, sync_bn: bool, process_group, factory: dict) -> nn.Module:
    """nn.BatchNorm2d, or with `sync_bn=True` a SyncBatchNorm2d (same parameters, buffers and state_dict;
    DistributedDataParallel takes it on CPU too, unlike nn.SyncBatchNorm)."""
    if sync_bn:
        return SyncBatchNorm2d(num_features, eps, momentum, affine, track_running_stats, process_group, **factory)
    if process_group is not None:
        raise ValueError("process_group is only used with sync_bn=True")
    return nn.BatchNorm2d(num_features, eps, momentum, affine, track_running_stats, **factory)


def make_conv(in_channels: int, out_channels: int, kernel_size, stride, padding, dilation, groups: int, bias: bool,
              padding_mode: str, factory: dict) -> nn.Module:
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
                     **factory)


def make_lazy_conv(in_channels: int, out_channels: int, kernel_size, stride, padding, dilation, groups: int,
                   bias: bool, padding_mode: str, factory: dict) -> nn.Module:
    """nn.LazyConv2d: `in_channels` is ignored, the first input tells it."""
    return nn.LazyConv2d(out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, **factory)


def backend_repr(requested: Optional[str], op: str, module: nn.Module) -> str:
    """'cpu', or 'auto→cpu': the backend that runs this module's op for tensors on its device and dtype."""
    name = requested or ops.get_backend()
    if name != "auto":
        return name
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    device = tensor.device if tensor is not None else torch.device("cpu")
    dtype = tensor.dtype if tensor is not None and tensor.is_floating_point() else torch.float32
    try:
        return f"auto→{ops.select(op, torch.empty(0, device=device, dtype=dtype)).name}"
    except Exception:  # a repr never raises
        return "auto"


def initialize_lazy(module: nn.Module, x: torch.Tensor) -> None:
    """Initializes a lazy child (nn.LazyConv2d / nn.LazyBatchNorm2d) from the channels of `x` through its
    own first call, on an empty batch: no compute, no statistics, and the child becomes its regular class
    as after any first call. A BN is asked in eval mode, so no running statistic moves."""
    if not isinstance(module, nn.modules.lazy.LazyModuleMixin):
        return
    training = module.training
    with torch.no_grad():
        try:
            module.train(False)
            module(x[:0])
        finally:
            module.train(training)


def refuse_scripting(module: nn.Module):
    """`__prepare_scriptable__` (torch.jit.script calls it first) of pyfast's modules: a clear error."""
    raise RuntimeError(f"torch.jit.script cannot compile {type(module).__name__}: its forward is a pyfast "
                       "custom op called from Python. Use torch.compile or torch.export, or script the plain "
                       "modules (nn.Sequential(*module) holds them)")


class ConvBNSequential(nn.Sequential):
    """The base of ConvBNReLU2d and BNReLUConv2d: an nn.Sequential of the plain modules, a conv, a BN and
    an optional nn.ReLU (so the state_dict is the plain sequence's), whose forward is the fused op `OP`
    with this module's `backend`."""

    OP = ""
    _make_conv = staticmethod(make_conv)

    @classmethod
    def _over(cls, children, backend: Optional[str]):
        """An instance holding `children`, the very modules (for `from_modules`)."""
        module = cls.__new__(cls)
        nn.Sequential.__init__(module, *children)
        module.backend = check_backend(backend)
        return module

    __prepare_scriptable__ = refuse_scripting

    @property
    def has_relu(self) -> bool:
        return len(self._modules) > 2

    def extra_repr(self) -> str:
        return f"backend={backend_repr(self.backend, self.OP, self)}"
