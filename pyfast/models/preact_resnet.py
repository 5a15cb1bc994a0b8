"""Pre-activation ResNet ("Identity Mappings in Deep Residual Networks", He et al. 2016).

Full pre-activation units: out = x + F(x), F = (BN-ReLU-conv) x 2 (basic) or x 3 (bottleneck,
1x1-3x3-1x1), and nothing after the addition (no ReLU, no BN): the identity path runs clean from
block to block. Layout of the authors' ImageNet code (fb.resnet.torch `preresnet.lua`):

- stem 7x7 stride-2 conv-BN-ReLU, 3x3 stride-2 max-pool; the first block of layer1 takes the stem's
  activation as is (it has no bn1);
- where the shape changes, the BN-ReLU of the first unit is shared by the residual branch and the
  1x1 projection shortcut (a plain conv, no BN: the next unit normalizes the sum);
- a final BN-ReLU before the average pool.

Fast backend: every BN-ReLU-conv of an identity block is one `bn_relu_conv`, the normalized
activation never stored; a projection block materializes its shared pre-activation once (`bn_relu`, a fused BN-ReLU pass).
Parameter names: conv1, bn1 (stem), layerI.J.bnK / convK (bnK normalizes convK's input),
layerI.J.downsample, final_bn, fc.
"""
from functools import partial
from typing import List

import torch
from torch import Tensor, nn

from .base import ImageClassifier, build, check_positive
from .complexity import Cost, bn_cost, conv_cost, head_cost
from .layers import get_kit
from .registry import register_model
from .resnet import RESNET_CFGS, ResNetCfg, conv1x1, conv3x3, stem_cost

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
        self.kit = get_kit(kit or "eager")

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
        width = int(planes * (base_width / 64.0)) * groups
        if width < 1:
            raise ValueError(f"bottleneck width int({planes} * {base_width} / 64) * {groups} is 0")
        super().__init__([conv1x1(inplanes, width), conv3x3(width, width, stride, groups),
                          conv1x1(width, planes * self.expansion)], preact, stride, kit)


BLOCKS = {"basic": PreActBasicBlock, "bottleneck": PreActBottleneck}


class PreActResNet(ImageClassifier):
    """conv1-bn1-relu-maxpool -> layer1..layerN (pre-activation units) -> final_bn-relu -> avgpool -> fc."""

    def __init__(self, cfg: ResNetCfg, num_classes: int = 1000, in_chans: int = 3, backend="eager") -> None:
        super().__init__(num_classes, in_chans, backend)
        self.cfg = cfg
        block = BLOCKS[cfg.block]
        self.conv1 = nn.Conv2d(in_chans, cfg.stem_width, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(cfg.stem_width)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = cfg.stem_width
        for i, (depth, planes) in enumerate(zip(cfg.layers, cfg.widths)):
            blocks = []
            for j in range(check_positive(f"layers[{i}]", depth)):
                stride = 2 if (i > 0 and j == 0) else 1
                preact = not (i == 0 and j == 0)  # the stem's BN-ReLU pre-activates the first unit
                blocks.append(block(inplanes, planes, stride, cfg.groups, cfg.width_per_group, preact, self.kit))
                inplanes = planes * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.final_bn = nn.BatchNorm2d(inplanes)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.cfg.zero_init_residual:  # each unit starts as the identity: zero its last conv
            for m in self.modules():
                if isinstance(m, PreActBlock):
                    nn.init.zeros_(getattr(m, f"conv{m.depth}").weight)

    def stages(self):
        return [getattr(self, f"layer{i + 1}") for i in range(len(self.cfg.layers))]

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        x = self.maxpool(self.kit.conv_bn_relu(x, self.conv1, self.bn1))
        for stage in self.stages():
            x = stage(x)
        x = self.kit.bn_relu(x, self.final_bn)
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def _head_cost(self, shape):
        out, cost = head_cost(self.fc, shape)
        return out, cost + bn_cost(self.final_bn)

    def units(self):
        yield "stem", "Conv7x7+MaxPool", partial(stem_cost, self.conv1, self.bn1)
        for i, stage in enumerate(self.stages()):
            for j, block in enumerate(stage):
                yield f"layer{i + 1}.{j}", type(block).__name__, block.cost
        yield "head", "BNReLU+AvgPool+Linear", self._head_cost


def _preact(name: str, **kwargs) -> PreActResNet:
    """ResNet `name`'s configuration with pre-activation units; keyword arguments as for `_resnet`."""
    return build(PreActResNet, RESNET_CFGS[name], **kwargs)


@register_model
def preact_resnet18(**kwargs) -> PreActResNet:
    """Pre-activation ResNet-18: basic units (2, 2, 2, 2)."""
    return _preact("resnet18", **kwargs)


@register_model
def preact_resnet34(**kwargs) -> PreActResNet:
    """Pre-activation ResNet-34: basic units (3, 4, 6, 3)."""
    return _preact("resnet34", **kwargs)


@register_model
def preact_resnet50(**kwargs) -> PreActResNet:
    """Pre-activation ResNet-50: bottleneck units (3, 4, 6, 3)."""
    return _preact("resnet50", **kwargs)


@register_model
def preact_resnet101(**kwargs) -> PreActResNet:
    """Pre-activation ResNet-101: bottleneck units (3, 4, 23, 3)."""
    return _preact("resnet101", **kwargs)


@register_model
def preact_resnet152(**kwargs) -> PreActResNet:
    """Pre-activation ResNet-152: bottleneck units (3, 8, 36, 3)."""
    return _preact("resnet152", **kwargs)
