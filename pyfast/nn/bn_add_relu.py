"""BNAddReLU: relu(bn(y) + shortcut), the end of a residual block, and AddReLU: relu(a + b)."""
from typing import Optional

from torch import Tensor, nn

from . import functional
from ._common import backend_repr, check_backend, refuse_scripting


def _extra(module) -> str:
    sync = ", sync_bn=True" if module.sync_bn else ""
    return f"relu={module.relu}, backend={backend_repr(module.backend, 'bn_add_relu', module)}{sync}"


class BNAddReLU(nn.BatchNorm2d):
    """An nn.BatchNorm2d whose forward(y, shortcut) is relu(bn(y) + shortcut), in one elementwise pass.

    Its state_dict is the BatchNorm2d's. `forward(y, shortcut, shortcut_bn)` also normalizes the shortcut
    with `shortcut_bn` (the downsample branch's own BatchNorm2d module) in the same pass:
    relu(bn(y) + shortcut_bn(shortcut)). Arguments are nn.BatchNorm2d's, plus `relu` (False: no ReLU),
    `backend`, and `sync_bn` / `process_group` (batch statistics over a process group, as nn.SyncBatchNorm;
    use `pyfast.nn.convert_sync_batchnorm`, not torch's, to convert a model holding BNAddReLU modules).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, relu: bool = True, backend: Optional[str] = None,
                 sync_bn: bool = False, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.relu = relu
        self.backend = check_backend(backend)
        self.sync_bn = sync_bn
        self.process_group = process_group

    def forward(self, y: Tensor, shortcut: Tensor, shortcut_bn: Optional[nn.Module] = None) -> Tensor:
        self._check_input_dim(y)  # nn.BatchNorm2d's check: 4-D input
        return functional.bn_add_relu(y, self, shortcut, shortcut_bn, relu=self.relu, backend=self.backend)

    __prepare_scriptable__ = refuse_scripting

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {_extra(self)}"


class LazyBNAddReLU(nn.LazyBatchNorm2d):
    """BNAddReLU whose num_features is inferred from y at the first call; it then becomes a BNAddReLU."""

    cls_to_become = BNAddReLU

    def __init__(self, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, relu: bool = True, backend: Optional[str] = None,
                 sync_bn: bool = False, process_group=None, device=None, dtype=None):
        super().__init__(eps, momentum, affine, track_running_stats, device, dtype)
        self.relu = relu
        self.backend = check_backend(backend)
        self.sync_bn = sync_bn
        self.process_group = process_group

    def initialize_parameters(self, y: Tensor, *args, **kwargs) -> None:
        super().initialize_parameters(y)

    forward = BNAddReLU.forward
    __prepare_scriptable__ = refuse_scripting

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {_extra(self)}"


class AddReLU(nn.Module):
    """forward(a, b) = relu(a + b) in one pass (eager PyTorch's result where a and b broadcast)."""

    def __init__(self, backend: Optional[str] = None):
        super().__init__()
        self.backend = check_backend(backend)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return functional.add_relu(a, b, backend=self.backend)

    __prepare_scriptable__ = refuse_scripting

    def extra_repr(self) -> str:
        return f"backend={backend_repr(self.backend, 'add_relu', self)}"
