"""Pre-activation ResNet ("Identity Mappings in Deep Residual Networks", He et al. 2016).

Full pre-activation units: out = x + F(x), F = (BN-ReLU-conv) x 2 (basic) or x 3 (bottleneck,
1x1-3x3-1x1), and nothing after the addition (no ReLU, no BN): the identity path runs clean from
block to block. Layout of the authors' ImageNet code (fb.resnet.torch `preresnet.lua`):

- stem 7x7 stride-2 conv-BN-ReLU, 3x3 stride-2 max-pool; the first block of layer1 takes the stem's
  activation as is (it has no bn1);
- where the shape changes, the BN-ReLU of the first unit is shared by the residual branch and the
  1x1 projection shortcut (a plain conv, no BN: the next unit normalizes the sum);
- a final BN-ReLU before the average pool.

Fused (fused=True): every BN-ReLU-conv of an identity block is one `bn_relu_conv`, the normalized
activation never stored; a projection block materializes its shared pre-activation once (`bn_relu`, a
fused BN-ReLU pass).
Parameter names: conv1, bn1 (stem), layerI.J.bnK / convK (bnK normalizes convK's input),
layerI.J.downsample, final_bn, fc.
"""
from typing import List

from torch import Tensor, nn

from .base import register_preset
from .complexity import Cost, bn_cost, conv_cost
from .layers import get_kit
from .resnet import RESNET_CFGS, ResNetBase, bottleneck_width, conv1x1, conv3x3

__all__ = ["PreActBasicBlock", "PreActBlock", "PreActBottleneck", "PreActResNet", "preact_resnet18",
           "preact_resnet34", "preact_resnet50", "preact_resnet101", "preact_resnet152"]


class PreActBlock(nn.Module):
    """x + conv_n(relu(bn_n(... conv_1(relu(bn_1(x)))))), shortcut x or downsample(relu(bn_1(x)))."""

    expansion = 1

    def __init__(self, convs: List[nn.Conv2d], preact: bool, stride: int, kit) -> None:
        super().__init__()
        self.depth = len(convs)
        for i, conv in enumerate(convs, 1):
            self.register_module(f"bn{i}", nn.BatchNorm2d(conv.in_channels) if (preact or i > 1) else None)
            self.register_module(f"conv{i}", conv)
        inplanes, out = convs[0].in_channels, convs[-1].out_channels
        self.downsample = conv1x1(inplanes, out, stride) if (stride != 1 or inplanes != out) else None
        self.kit = get_kit(kit or False)

    def units(self):
        return [(getattr(self, f"bn{i}"), getattr(self, f"conv{i}")) for i in range(1, self.depth + 1)]

    def forward(self, x: Tensor) -> Tensor:
        (bn, conv), *rest = self.units()
        if self.downsample is not None:
            if bn is not None:
                x = self.kit.bn_relu(x, bn)  # shared by both paths
            shortcut, h = self.downsample(x), conv(x)
        else:
            shortcut, h = x, (conv(x) if bn is None else self.kit.bn_relu_conv(x, bn, conv))
        for bn, conv in rest:
            h = self.kit.bn_relu_conv(h, bn, conv)
        return h + shortcut

    def cost(self, shape):
        total, h = Cost(), shape
        for bn, conv in self.units():
            h, c = conv_cost(conv, h)
            total += c + bn_cost(bn)
        if self.downsample is not None:
            total += conv_cost(self.downsample, shape)[1]
        return h, total


class PreActBasicBlock(PreActBlock):
    """BN-ReLU-3x3 conv (stride), BN-ReLU-3x3 conv."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, groups: int = 1, base_width: int = 64,
                 preact: bool = True, kit=None) -> None:
        super().__init__([conv3x3(inplanes, planes, stride), conv3x3(planes, planes)], preact, stride, kit)


class PreActBottleneck(PreActBlock):
    """BN-ReLU-1x1 conv, BN-ReLU-3x3 conv (stride, groups), BN-ReLU-1x1 conv to 4x planes."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, groups: int = 1, base_width: int = 64,
                 preact: bool = True, kit=None) -> None:
        width = bottleneck_width(planes, base_width, groups)
        super().__init__([conv1x1(inplanes, width), conv3x3(width, width, stride, groups),
                          conv1x1(width, planes * self.expansion)], preact, stride, kit)


BLOCKS = {"basic": PreActBasicBlock, "bottleneck": PreActBottleneck}


class PreActResNet(ResNetBase):
    """conv1-bn1-relu-maxpool -> layer1..layerN (pre-activation units) -> final_bn-relu -> avgpool -> fc."""

    BLOCKS = BLOCKS
    HEAD_KIND = "BNReLU+AvgPool+Linear"

    def _make_block(self, block: type, inplanes: int, planes: int, stride: int, first: bool) -> nn.Module:
        preact = not first  # the stem's BN-ReLU pre-activates the first unit
        return block(inplanes, planes, stride, self.cfg.groups, self.cfg.width_per_group, preact, self.kit)

    def _build_head(self, width: int, num_classes: int) -> None:
        self.final_bn = nn.BatchNorm2d(width)
        super()._build_head(width, num_classes)

    def _zero_init_residual(self) -> None:
        """Each unit starts as the identity: zero its last conv."""
        for m in self.modules():
            if isinstance(m, PreActBlock):
                nn.init.zeros_(getattr(m, f"conv{m.depth}").weight)

    def _head(self, x: Tensor) -> Tensor:
        return super()._head(self.kit.bn_relu(x, self.final_bn))

    def _head_cost(self, shape):
        out, cost = super()._head_cost(shape)
        return out, cost + bn_cost(self.final_bn)


def _preact(name: str, doc: str):
    """The registered entry point `preact_{name}`: ResNet `name`'s configuration with pre-activation
    units; keyword arguments as for the ResNets."""
    return register_preset(f"preact_{name}", PreActResNet, RESNET_CFGS, doc, cfg_name=name)


preact_resnet18 = _preact("resnet18", "Pre-activation ResNet-18: basic units (2, 2, 2, 2).")
preact_resnet34 = _preact("resnet34", "Pre-activation ResNet-34: basic units (3, 4, 6, 3).")
preact_resnet50 = _preact("resnet50", "Pre-activation ResNet-50: bottleneck units (3, 4, 6, 3).")
preact_resnet101 = _preact("resnet101", "Pre-activation ResNet-101: bottleneck units (3, 4, 23, 3).")
preact_resnet152 = _preact("resnet152", "Pre-activation ResNet-152: bottleneck units (3, 8, 36, 3).")
