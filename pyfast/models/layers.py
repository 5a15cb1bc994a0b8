"""Layer kits: the one place where a model's choice of fused ops changes what runs.

Every block holds plain `nn.Conv2d` / `nn.BatchNorm2d` submodules (so fused and unfused models have
the same module tree, parameter names and state_dict) and a *kit*, a stateless strategy object with
the fusable steps of docs/DESIGN.md. A block's forward is written once against the kit:

    kit.conv_bn_relu(x, conv, bn, relu=True)          relu(bn(conv(x)))
    kit.bn_add_relu(y, bn, shortcut, shortcut_bn=None) relu(bn(y) + shortcut)  or  + shortcut_bn(shortcut)
    kit.conv_bn_add_relu(x, conv, bn, shortcut, ...)  bn_add_relu(conv(x), bn, shortcut, ...)
    kit.bn_relu_conv(x, bn, conv)                      conv(relu(bn(x)))
    kit.bn_relu(x, bn)                                 relu(bn(x))
    kit.max_pool(x, pool)                              pool(x), an nn.MaxPool2d
    with kit.scope(): ...                              around a whole model's forward

`EagerKit` (fused=False) runs them as separate PyTorch ops (torchvision's forwards: the benchmark
baseline); `FastKit` (fused=True) hands the same modules to `pyfast.nn.functional`, on one op backend
("reference", "cpu", "cuda", "triton", "auto") or, with backend=None, on the one pyfast's dispatcher
picks (`pyfast.set_backend`), and keeps one tensor per convolution for the backward (its scope: lean
training, `pyfast.ops.lean`). `set_fused(model, True, backend=...)` swaps the kit of an existing
model in place; its weights are untouched.

The kits used to be chosen by name, `backend="eager"` / `backend="fast"`; those spellings still
work, with a DeprecationWarning, since `backend=` now names the op backend as everywhere in pyfast.
"""
import contextlib
import functools
import sys
import warnings
from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from .complexity import conv_bn_cost

__all__ = ["ConvNormAct", "EagerKit", "FastKit", "get_kit", "set_fused", "switch_backend"]


class EagerKit:
    """Plain PyTorch, one op per step, in-place ReLU where torchvision uses one."""

    fused = False
    backend = None

    def conv_bn_relu(self, x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool = True) -> Tensor:
        y = bn(conv(x))
        return F.relu(y, inplace=True) if relu else y

    def bn_add_relu(self, y: Tensor, bn: nn.BatchNorm2d, shortcut: Tensor,
                    shortcut_bn: nn.BatchNorm2d = None, relu: bool = True) -> Tensor:
        out = bn(y)
        out += shortcut if shortcut_bn is None else shortcut_bn(shortcut)
        return F.relu(out, inplace=True) if relu else out

    def conv_bn_add_relu(self, x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, shortcut: Tensor,
                         shortcut_bn: nn.BatchNorm2d = None, relu: bool = True) -> Tensor:
        return self.bn_add_relu(conv(x), bn, shortcut, shortcut_bn, relu)

    def bn_relu_conv(self, x: Tensor, bn: nn.BatchNorm2d, conv: nn.Conv2d) -> Tensor:
        return conv(F.relu(bn(x), inplace=True))

    def bn_relu(self, x: Tensor, bn: nn.BatchNorm2d) -> Tensor:
        return F.relu(bn(x), inplace=True)

    def max_pool(self, x: Tensor, pool: nn.MaxPool2d) -> Tensor:
        return pool(x)

    def scope(self):
        """The context of a whole model's forward (FastKit: lean training, pyfast.ops.lean)."""
        return contextlib.nullcontext()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.backend!r})" if self.fused else f"{type(self).__name__}()"

    # The kits are stateless and shared (one per op backend): copies and pickles of a model share them.
    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (get_kit, (self.fused, self.backend))


_FUNCTIONAL = None


def _functional():
    """`pyfast.nn.functional`, imported on first use so that unfused models never need it (a cached
    global, which torch.compile traces through)."""
    global _FUNCTIONAL
    if _FUNCTIONAL is None:
        try:
            from ..nn import functional
        except ImportError as err:
            raise RuntimeError("fused=True needs pyfast.nn.functional, which could not be imported: "
                               f"{err}; build the model with fused=False") from err
        _FUNCTIONAL = functional
    return _FUNCTIONAL


class FastKit(EagerKit):
    """The fused ops of `pyfast.nn.functional` over the same modules, on op backend `backend` (None:
    the dispatcher's choice, `pyfast.set_backend` / `pyfast.use_backend`)."""

    fused = True

    def __init__(self, backend: Optional[str] = None) -> None:
        self.backend = backend

    def conv_bn_relu(self, x, conv, bn, relu=True):
        return _functional().conv_bn_relu(x, conv, bn, relu=relu, backend=self.backend)

    def bn_add_relu(self, y, bn, shortcut, shortcut_bn=None, relu=True):
        return _functional().bn_add_relu(y, bn, shortcut, shortcut_bn, relu=relu, backend=self.backend)

    def conv_bn_add_relu(self, x, conv, bn, shortcut, shortcut_bn=None, relu=True):
        return _functional().conv_bn_add_relu(x, conv, bn, shortcut, shortcut_bn, relu=relu, backend=self.backend)

    def bn_relu_conv(self, x, bn, conv):
        return _functional().bn_relu_conv(x, bn, conv, backend=self.backend)

    def bn_relu(self, x, bn):
        return _functional().bn_relu(x, bn, backend=self.backend)

    def max_pool(self, x, pool):
        return _functional().max_pool2d(x, pool)

    def scope(self):
        return _functional().lean_scope()


_EAGER = EagerKit()
# The kit names of the old `backend=` spelling, and what they mean now.
_KIT_NAMES = {"eager": False, "fast": True}


def _first_caller_outside_pyfast() -> int:
    """The stacklevel, for a warning raised by this module's caller, of the first frame outside pyfast:
    a DeprecationWarning is shown by default only where the user's own code triggered it."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] == "pyfast":
        level, frame = level + 1, frame.f_back
    return level


def translate_kit_names(fused: bool, backend):
    """(fused, op backend) from the arguments a model takes, accepting the deprecated backend="eager"/
    "fast" (then fused must be left False)."""
    if isinstance(backend, str) and backend in _KIT_NAMES:
        if fused:
            raise ValueError(f"fused=True with backend={backend!r}: backend names the op backend now "
                             "('reference', 'cpu', 'cuda', 'triton', 'auto'); drop it or pass one of those")
        warnings.warn(f"backend={backend!r} is deprecated: pass fused={_KIT_NAMES[backend]} (backend= now names "
                      "the op backend of the fused ops)", DeprecationWarning, stacklevel=_first_caller_outside_pyfast())
        return _KIT_NAMES[backend], None
    return fused, backend


@functools.lru_cache(maxsize=None)
def _fast_kit(backend: Optional[str]) -> FastKit:
    return FastKit(backend)


def get_kit(fused=False, backend: Optional[str] = None) -> EagerKit:
    """The kit of `fused` (False: plain PyTorch; True: pyfast's fused ops on op backend `backend`); a
    kit object is returned as is. Fails here, not at the first forward, when the fused ops cannot run."""
    if isinstance(fused, EagerKit):
        return fused
    if isinstance(fused, str) and fused in _KIT_NAMES:  # the deprecated get_kit("eager" | "fast")
        fused, backend = translate_kit_names(False, fused)
    if not isinstance(fused, bool):
        raise TypeError(f"fused must be a bool, got {fused!r}")
    if not fused:
        if backend is not None:
            raise ValueError(f"backend={backend!r} picks the op backend of the fused ops, and fused=False runs "
                             "plain PyTorch: pass fused=True with it")
        return _EAGER
    _functional()
    from ..nn._common import check_backend

    return _fast_kit(check_backend(backend))


def set_fused(model: nn.Module, fused: bool, backend: Optional[str] = None) -> nn.Module:
    """Give every block of `model` the kit of (`fused`, `backend`), in place; returns `model`."""
    kit = get_kit(fused, backend)
    for module in model.modules():
        if hasattr(module, "kit"):
            module.kit = kit
    return model


def switch_backend(model: nn.Module, backend: str) -> nn.Module:
    """Deprecated: `set_fused(model, backend == "fast")`."""
    return set_fused(model, *translate_kit_names(False, backend))


class ConvNormAct(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d [-> ReLU], laid out as torchvision's `Conv2dNormActivation`
    (children 0, 1[, 2]) so RegNet state_dicts keep torchvision's keys."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 groups: int = 1, act: bool = True, kit=None):
        layers = [nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2,
                            groups=groups, bias=False), nn.BatchNorm2d(out_channels)]
        if act:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)
        self.kit = get_kit(kit or False)

    # The children by key: Sequential's integer indexing walks its modules on every call.
    @property
    def conv(self) -> nn.Conv2d:
        return self._modules["0"]

    @property
    def bn(self) -> nn.BatchNorm2d:
        return self._modules["1"]

    @property
    def act(self) -> bool:
        return "2" in self._modules

    def forward(self, x: Tensor) -> Tensor:
        return self.kit.conv_bn_relu(x, self.conv, self.bn, relu=self.act)

    def cost(self, shape):
        return conv_bn_cost(self.conv, self.bn, shape)
