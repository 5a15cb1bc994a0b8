"""Layer kits: the one place where a model's backend ("eager" or "fast") changes what runs.

Every block holds plain `nn.Conv2d` / `nn.BatchNorm2d` submodules (so both backends have the same
module tree, parameter names and state_dict) and a *kit*, a stateless strategy object with the four
fusable steps of DESIGN.md. A block's forward is written once against the kit:

    kit.conv_bn_relu(x, conv, bn, relu=True)          relu(bn(conv(x)))
    kit.bn_add_relu(y, bn, shortcut, shortcut_bn=None) relu(bn(y) + shortcut)  or  + shortcut_bn(shortcut)
    kit.bn_relu_conv(x, bn, conv)                      conv(relu(bn(x)))
    kit.bn_relu(x, bn)                                 relu(bn(x))

`EagerKit` runs them as separate PyTorch ops (torchvision's forwards: the benchmark baseline);
`FastKit` hands the same modules to `pyfast.nn.functional`. `switch_backend(model, "fast")` swaps the
kit of an existing model in place; its weights
are untouched.
"""
import torch.nn.functional as F
from torch import Tensor, nn

from .complexity import conv_bn_cost

__all__ = ["BACKENDS", "ConvNormAct", "EagerKit", "FastKit", "get_kit", "switch_backend"]


class EagerKit:
    """Plain PyTorch, one op per step, in-place ReLU where torchvision uses one."""

    name = "eager"

    def conv_bn_relu(self, x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool = True) -> Tensor:
        y = bn(conv(x))
        return F.relu(y, inplace=True) if relu else y

    def bn_add_relu(self, y: Tensor, bn: nn.BatchNorm2d, shortcut: Tensor,
                    shortcut_bn: nn.BatchNorm2d = None, relu: bool = True) -> Tensor:
        out = bn(y)
        out += shortcut if shortcut_bn is None else shortcut_bn(shortcut)
        return F.relu(out, inplace=True) if relu else out

    def bn_relu_conv(self, x: Tensor, bn: nn.BatchNorm2d, conv: nn.Conv2d) -> Tensor:
        return conv(F.relu(bn(x), inplace=True))

    def bn_relu(self, x: Tensor, bn: nn.BatchNorm2d) -> Tensor:
        return F.relu(bn(x), inplace=True)

    # The kits are stateless singletons: copies and pickles of a model share them.
    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (get_kit, (self.name,))


_FUNCTIONAL = None


def _functional():
    """`pyfast.nn.functional`, imported on first use so that eager models never need it (a cached
    global, which torch.compile traces through)."""
    global _FUNCTIONAL
    if _FUNCTIONAL is None:
        try:
            from ..nn import functional
        except ImportError as err:
            raise RuntimeError("backend='fast' needs pyfast.nn.functional, which could not be imported: "
                               f"{err}; build the model with backend='eager'") from err
        _FUNCTIONAL = functional
    return _FUNCTIONAL


class FastKit(EagerKit):
    """The fused ops of `pyfast.nn.functional` over the same modules (op backend chosen by pyfast's
    dispatcher: `pyfast.set_backend` / `pyfast.use_backend`)."""

    name = "fast"

    def conv_bn_relu(self, x, conv, bn, relu=True):
        return _functional().conv_bn_relu(x, conv, bn, relu=relu)

    def bn_add_relu(self, y, bn, shortcut, shortcut_bn=None, relu=True):
        return _functional().bn_add_relu(y, bn, shortcut, shortcut_bn, relu=relu)

    def bn_relu_conv(self, x, bn, conv):
        return _functional().bn_relu_conv(x, bn, conv)

    def bn_relu(self, x, bn):
        return _functional().bn_relu(x, bn)


BACKENDS = {"eager": EagerKit(), "fast": FastKit()}


def get_kit(backend) -> EagerKit:
    """The kit named `backend` ("eager" or "fast"); a kit object is returned as is."""
    if isinstance(backend, EagerKit):
        return backend
    try:
        kit = BACKENDS[backend]
    except (KeyError, TypeError):
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}") from None
    if kit.name == "fast":
        _functional()  # fail at construction, not at the first forward
    return kit


def switch_backend(model: nn.Module, backend) -> nn.Module:
    """Give every block of `model` the kit of `backend`, in place; returns `model`."""
    kit = get_kit(backend)
    for module in model.modules():
        if hasattr(module, "kit"):
            module.kit = kit
    return model


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
        self.kit = get_kit(kit or "eager")

    @property
    def conv(self) -> nn.Conv2d:
        return self[0]

    @property
    def bn(self) -> nn.BatchNorm2d:
        return self[1]

    @property
    def act(self) -> bool:
        return len(self) == 3

    def forward(self, x: Tensor) -> Tensor:
        return self.kit.conv_bn_relu(x, self[0], self[1], relu=self.act)

    def cost(self, shape):
        return conv_bn_cost(self[0], self[1], shape)
