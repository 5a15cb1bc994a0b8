"""ResNet (He et al. 2016, Table 1) and ResNeXt (Xie et al. 2017), laid out as torchvision's.

Stem: 7x7 stride-2 conv-BN-ReLU, 3x3 stride-2 max-pool. Stages conv2_x..conv5_x (layer1..layer4) of
basic blocks (3x3, 3x3; ResNet-18/34) or bottleneck blocks (1x1, 3x3, 1x1 with expansion 4;
ResNet-50+). The stride of a stage's first block sits on its 3x3 convolution (torchvision's "v1.5"),
its shortcut is a 1x1 conv-BN projection when the shape changes (option B). ResNeXt's bottleneck is
`groups * int(planes * width_per_group / 64)` wide with a grouped 3x3. Parameter names are
torchvision's (conv1, bn1, layer1.0.conv1, layer1.0.downsample.0/1, fc), so its checkpoints load.
"""
from dataclasses import dataclass
from functools import partial
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from .base import ImageClassifier, check_positive, register_preset
from .complexity import Cost, conv_bn_cost, head_cost, pool_shape
from .layers import get_kit

__all__ = ["RESNET_CFGS", "BasicBlock", "Bottleneck", "ResNet", "ResNetBase", "ResNetCfg", "bottleneck_width",
           "conv1x1", "conv3x3", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
           "resnext101_32x8d", "stem_cost"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride, padding=1, groups=groups, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)


@dataclass(frozen=True)
class ResNetCfg:
    """A ResNet/ResNeXt: block type, blocks per stage, stage widths ("planes"), ResNeXt cardinality."""

    block: str  # "basic" or "bottleneck"
    layers: Tuple[int, ...]
    widths: Tuple[int, ...] = (64, 128, 256, 512)  # planes; a bottleneck stage outputs 4x as many
    stem_width: int = 64
    groups: int = 1
    width_per_group: int = 64
    zero_init_residual: bool = False  # zero gamma of each block's last BN (Goyal et al. 2017)

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "widths", tuple(self.widths))
        if self.block not in BLOCKS:
            raise ValueError(f"block must be one of {sorted(BLOCKS)}, got {self.block!r}")
        if not self.layers or len(self.layers) != len(self.widths):
            raise ValueError(f"layers and widths need one entry per stage, got {self.layers}, {self.widths}")
        for name in ("stem_width", "groups", "width_per_group"):
            check_positive(name, getattr(self, name))
        if self.block == "basic" and (self.groups != 1 or self.width_per_group != 64):
            raise ValueError("basic blocks take groups=1 and width_per_group=64 only")


def bottleneck_width(planes: int, base_width: int, groups: int) -> int:
    """The width of a (ResNeXt) bottleneck's 3x3: `int(planes * base_width / 64) * groups`, at least 1."""
    width = int(planes * (base_width / 64.0)) * groups
    if width < 1:
        raise ValueError(f"bottleneck width int({planes} * {base_width} / 64) * {groups} is 0")
    return width


def _shortcut_out(kit, h: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, x: Tensor,
                  downsample: Optional[nn.Sequential]) -> Tensor:
    """relu(bn(conv(h)) + shortcut), the shortcut being x or downsample(x) = bn_d(conv_d(x))."""
    if downsample is None:
        return kit.conv_bn_add_relu(h, conv, bn, x)
    return kit.conv_bn_add_relu(h, conv, bn, downsample[0](x), downsample[1])


def stem_cost(conv: nn.Conv2d, bn: nn.BatchNorm2d, shape):
    """7x7 stride-2 conv-BN-ReLU, 3x3 stride-2 max-pool."""
    out, cost = conv_bn_cost(conv, bn, shape)
    return pool_shape(out, 3, 2, 1), cost


def _downsample_cost(downsample, shape) -> Cost:
    return Cost() if downsample is None else conv_bn_cost(downsample[0], downsample[1], shape)[1]


class BasicBlock(nn.Module):
    """3x3 conv-BN-ReLU, 3x3 conv-BN, add the shortcut, ReLU."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, kit=None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.kit = get_kit(kit or False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.kit.conv_bn_relu(x, self.conv1, self.bn1)
        return _shortcut_out(self.kit, h, self.conv2, self.bn2, x, self.downsample)

    def cost(self, shape):
        h, c1 = conv_bn_cost(self.conv1, self.bn1, shape)
        out, c2 = conv_bn_cost(self.conv2, self.bn2, h)
        return out, c1 + c2 + _downsample_cost(self.downsample, shape)


class Bottleneck(nn.Module):
    """1x1 conv-BN-ReLU, 3x3 (grouped, strided) conv-BN-ReLU, 1x1 conv-BN to 4x planes, add, ReLU."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, kit=None) -> None:
        super().__init__()
        width = bottleneck_width(planes, base_width, groups)
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = downsample
        self.kit = get_kit(kit or False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.kit.conv_bn_relu(x, self.conv1, self.bn1)
        h = self.kit.conv_bn_relu(h, self.conv2, self.bn2)
        return _shortcut_out(self.kit, h, self.conv3, self.bn3, x, self.downsample)

    def cost(self, shape):
        h, c1 = conv_bn_cost(self.conv1, self.bn1, shape)
        h, c2 = conv_bn_cost(self.conv2, self.bn2, h)
        out, c3 = conv_bn_cost(self.conv3, self.bn3, h)
        return out, c1 + c2 + c3 + _downsample_cost(self.downsample, shape)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNetBase(ImageClassifier):
    """The layout ResNet and PreActResNet share: conv1-bn1-relu-maxpool -> layer1..layerN -> head
    (avgpool -> fc), torchvision's names and initialization. Each stage's first block takes the stage's
    stride (1 in layer1, else 2). A subclass names its `BLOCKS` and the head's kind in `units()`, builds
    each block (`_make_block`), zeroes each residual branch's end (`_zero_init_residual`), and may put
    modules before the pool by extending `_build_head`, `_head` and `_head_cost`."""

    BLOCKS: Dict[str, type] = {}
    HEAD_KIND = "AvgPool+Linear"

    def __init__(self, cfg: ResNetCfg, num_classes: int = 1000, in_chans: int = 3, fused: bool = False,
                 backend: Optional[str] = None) -> None:
        super().__init__(num_classes, in_chans, fused, backend)
        self.cfg = cfg
        block = self.BLOCKS[cfg.block]
        self.conv1 = nn.Conv2d(in_chans, cfg.stem_width, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(cfg.stem_width)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = cfg.stem_width
        for i, (depth, planes) in enumerate(zip(cfg.layers, cfg.widths)):
            blocks = []
            for j in range(check_positive(f"layers[{i}]", depth)):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(self._make_block(block, inplanes, planes, stride, first=(i == 0 and j == 0)))
                inplanes = planes * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self._build_head(inplanes, num_classes)
        self._init_weights()

    def _make_block(self, block: type, inplanes: int, planes: int, stride: int, first: bool) -> nn.Module:
        """One block of `block`'s type (`first`: the network's first block, right after the stem)."""
        raise NotImplementedError

    def _build_head(self, width: int, num_classes: int) -> None:
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width, num_classes)

    def _init_weights(self) -> None:
        """torchvision's ResNet initialization (the Linear keeps PyTorch's default)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.cfg.zero_init_residual:
            self._zero_init_residual()

    def _zero_init_residual(self) -> None:
        raise NotImplementedError

    def stages(self):
        return [getattr(self, f"layer{i + 1}") for i in range(len(self.cfg.layers))]

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        with self.kit.scope():
            x = self.kit.max_pool(self.kit.conv_bn_relu(x, self.conv1, self.bn1), self.maxpool)
            for stage in self.stages():
                x = stage(x)
            return self._head(x)

    def _head(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def _head_cost(self, shape):
        return head_cost(self.fc, shape)

    def units(self):
        yield "stem", "Conv7x7+MaxPool", partial(stem_cost, self.conv1, self.bn1)
        for i, stage in enumerate(self.stages()):
            for j, block in enumerate(stage):
                yield f"layer{i + 1}.{j}", type(block).__name__, block.cost
        yield "head", self.HEAD_KIND, self._head_cost


class ResNet(ResNetBase):
    """conv1-bn1-relu-maxpool -> layer1..layerN -> avgpool -> fc (torchvision's names)."""

    BLOCKS = BLOCKS  # the module's table (the one ResNetCfg checks `block` against)

    def _make_block(self, block: type, inplanes: int, planes: int, stride: int, first: bool) -> nn.Module:
        downsample = None
        if stride != 1 or inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        return block(inplanes, planes, stride, downsample, self.cfg.groups, self.cfg.width_per_group, self.kit)

    def _zero_init_residual(self) -> None:
        """Zero gamma of each block's last BN (Goyal et al. 2017)."""
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)


RESNET_CFGS = {
    "resnet18": ResNetCfg("basic", (2, 2, 2, 2)),
    "resnet34": ResNetCfg("basic", (3, 4, 6, 3)),
    "resnet50": ResNetCfg("bottleneck", (3, 4, 6, 3)),
    "resnet101": ResNetCfg("bottleneck", (3, 4, 23, 3)),
    "resnet152": ResNetCfg("bottleneck", (3, 8, 36, 3)),
    "resnext50_32x4d": ResNetCfg("bottleneck", (3, 4, 6, 3), groups=32, width_per_group=4),
    "resnext101_32x8d": ResNetCfg("bottleneck", (3, 4, 23, 3), groups=32, width_per_group=8),
}


def _resnet(name: str, doc: str):
    """The registered entry point `name`: `name`'s configuration; keyword arguments are num_classes,
    in_chans, fused, backend, or ResNetCfg fields."""
    return register_preset(name, ResNet, RESNET_CFGS, doc)


resnet18 = _resnet("resnet18", "ResNet-18: basic blocks (2, 2, 2, 2).")
resnet34 = _resnet("resnet34", "ResNet-34: basic blocks (3, 4, 6, 3).")
resnet50 = _resnet("resnet50", "ResNet-50: bottleneck blocks (3, 4, 6, 3).")
resnet101 = _resnet("resnet101", "ResNet-101: bottleneck blocks (3, 4, 23, 3).")
resnet152 = _resnet("resnet152", "ResNet-152: bottleneck blocks (3, 8, 36, 3).")
resnext50_32x4d = _resnet("resnext50_32x4d",
                          "ResNeXt-50 (32x4d): ResNet-50 with 32 groups of width 4 in conv2_x's 3x3.")
resnext101_32x8d = _resnet("resnext101_32x8d",
                           "ResNeXt-101 (32x8d): ResNet-101 with 32 groups of width 8 in conv2_x's 3x3.")
