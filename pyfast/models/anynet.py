"""AnyNet (Radosavovic et al. 2020, pycls) and the exercises' designs built on it: RegNetX-32,
DeResNeXt and the VioNets.

An AnyNet is a stem (3x3 stride-2 conv-BN-ReLU), stages of residual blocks, and a head (global
average pool, linear). Stage i has depth d_i, width w_i, group width g_i, bottleneck multiplier b_i
and stride s_i; its first block takes the stride and, when the stride or the width changes, a 1x1
conv-BN projection shortcut. Blocks:

- "bottleneck" (ResNeXt): 1x1 conv-BN-ReLU to w_b = round(w_i * b_i), 3x3 conv-BN-ReLU with
  w_b // g_i groups, 1x1 conv-BN back to w_i, add the shortcut, ReLU;
- "basic" (ResNet, for DeResNeXt): 3x3 conv-BN-ReLU, 3x3 conv-BN, add the shortcut, ReLU.

Module names follow torchvision's RegNet (stem.0/1, trunk_output.block1.block1-0.f.a/b/c, proj, fc),
so torchvision RegNet checkpoints load into `pyfast.models.regnetx_*`.
"""
import math
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .base import ImageClassifier, check_positive, register_preset
from .complexity import Cost, head_cost
from .layers import ConvNormAct, get_kit

__all__ = ["ANYNET_CFGS", "AnyNet", "AnyNetCfg", "AnyStage", "ResBlock", "StageSpec", "VioNet", "anynet", "deresnext",
           "regnetx_32", "vionet", "vionet_b", "vionet_c", "vionet_d", "vionet_g"]

BLOCKS = ("bottleneck", "basic")
PerStage = Union[int, float, Tuple]


class StageSpec(NamedTuple):
    depth: int
    width: int
    stride: int
    group_width: Optional[int]  # None: one group (a dense 3x3)
    bottleneck_multiplier: float


@dataclass(frozen=True)
class AnyNetCfg:
    """An AnyNet: per-stage tuples (a scalar means the same value for every stage)."""

    depths: Tuple[int, ...]
    widths: Tuple[int, ...]
    group_widths: Optional[PerStage] = None  # bottleneck blocks only; None: dense 3x3 convolutions
    bottleneck_multipliers: PerStage = 1.0  # bottleneck blocks only
    strides: PerStage = 2
    stem_width: int = 32
    block: str = "bottleneck"  # "bottleneck" (ResNeXt) or "basic" (ResNet)
    zero_init_last_bn: bool = False  # zero gamma of each block's last BN (pycls's ZERO_INIT_FINAL_GAMMA)

    def __post_init__(self):
        # Lists become tuples; scalars stay scalars, so an override of depths/widths keeps them valid.
        for name in ("depths", "widths", "group_widths", "bottleneck_multipliers", "strides"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if not isinstance(self.depths, tuple) or not isinstance(self.widths, tuple):
            raise ValueError(f"depths and widths must be tuples, got {self.depths!r}, {self.widths!r}")
        if not self.depths or len(self.depths) != len(self.widths):
            raise ValueError(f"depths and widths must be non-empty and of equal length, got {self.depths}, "
                             f"{self.widths}")
        if self.block not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, got {self.block!r}")
        check_positive("stem_width", self.stem_width)
        for i, s in enumerate(self.stages()):
            check_positive(f"depths[{i}]", s.depth)
            check_positive(f"widths[{i}]", s.width)
            check_positive(f"strides[{i}]", s.stride)
            if s.group_width is not None:
                check_positive(f"group_widths[{i}]", s.group_width)
            if not s.bottleneck_multiplier > 0:
                raise ValueError(f"bottleneck_multipliers[{i}] must be > 0, got {s.bottleneck_multiplier}")

    def per_stage(self, name: str) -> tuple:
        """Field `name` as one value per stage (a scalar repeated)."""
        value, n = getattr(self, name), len(self.depths)
        value = value if isinstance(value, tuple) else (value,) * n
        if len(value) != n:
            raise ValueError(f"{name} needs one value per stage ({n}), got {value}")
        return value

    def stages(self) -> Tuple[StageSpec, ...]:
        fields = ("depths", "widths", "strides", "group_widths", "bottleneck_multipliers")
        return tuple(StageSpec(*s) for s in zip(*(self.per_stage(f) for f in fields)))


def bottleneck_transform(w_in: int, w_out: int, stride: int, group_width: Optional[int],
                         bottleneck_multiplier: float, kit) -> nn.Sequential:
    """1x1 conv-BN-ReLU, 3x3 grouped conv-BN-ReLU, 1x1 conv-BN (torchvision's BottleneckTransform)."""
    w_b = int(round(w_out * bottleneck_multiplier))
    groups = 1 if group_width is None else w_b // group_width
    if groups < 1:
        raise ValueError(f"group width {group_width} is wider than the bottleneck width {w_b} "
                         f"(= round({w_out} * {bottleneck_multiplier}))")
    return nn.Sequential(OrderedDict(
        a=ConvNormAct(w_in, w_b, 1, kit=kit),
        b=ConvNormAct(w_b, w_b, 3, stride, groups=groups, kit=kit),
        c=ConvNormAct(w_b, w_out, 1, act=False, kit=kit),
    ))


def basic_transform(w_in: int, w_out: int, stride: int, group_width, bottleneck_multiplier, kit) -> nn.Sequential:
    """3x3 conv-BN-ReLU, 3x3 conv-BN (pycls's BasicTransform)."""
    return nn.Sequential(OrderedDict(
        a=ConvNormAct(w_in, w_out, 3, stride, kit=kit),
        b=ConvNormAct(w_out, w_out, 3, act=False, kit=kit),
    ))


TRANSFORMS = {"bottleneck": bottleneck_transform, "basic": basic_transform}


class ResBlock(nn.Module):
    """relu(f(x) + proj(x)): `f` a sequence of ConvNormAct whose last has no ReLU; `proj` a 1x1 stride-s
    conv-BN when the shape changes, else the identity. The last BN, the add and the ReLU are one step
    of the kit with the last conv (`conv_bn_add_relu`), the shortcut's BN included."""

    def __init__(self, w_in: int, w_out: int, stride: int, block: str = "bottleneck",
                 group_width: Optional[int] = None, bottleneck_multiplier: float = 1.0, kit=None) -> None:
        super().__init__()
        self.proj = ConvNormAct(w_in, w_out, 1, stride, act=False, kit=kit) if (w_in != w_out or stride != 1) else None
        self.f = TRANSFORMS[block](w_in, w_out, stride, group_width, bottleneck_multiplier, kit)
        self.kit = get_kit(kit or False)

    def forward(self, x: Tensor) -> Tensor:
        f = self.f
        h = x
        for i in range(len(f) - 1):
            h = f[i](h)
        last = f[-1]
        if self.proj is None:
            return self.kit.conv_bn_add_relu(h, last.conv, last.bn, x)
        return self.kit.conv_bn_add_relu(h, last.conv, last.bn, self.proj.conv(x), self.proj.bn)

    def cost(self, shape):
        total, h = Cost(), shape
        for layer in self.f:
            h, c = layer.cost(h)
            total += c
        if self.proj is not None:
            _, c = self.proj.cost(shape)
            total += c
        return h, total


class AnyStage(nn.Sequential):
    """The blocks of stage `index` (1-based), named `block{index}-{i}` as in torchvision."""

    def __init__(self, w_in: int, spec: StageSpec, index: int, block: str, kit) -> None:
        super().__init__()
        for i in range(spec.depth):
            self.add_module(f"block{index}-{i}", ResBlock(
                w_in if i == 0 else spec.width, spec.width, spec.stride if i == 0 else 1, block,
                spec.group_width, spec.bottleneck_multiplier, kit))


class AnyNet(ImageClassifier):
    """stem -> trunk_output (stages) -> avgpool -> fc; `fused`, `backend`: see ImageClassifier."""

    def __init__(self, cfg: AnyNetCfg, num_classes: int = 1000, in_chans: int = 3, fused: bool = False,
                 backend: Optional[str] = None) -> None:
        super().__init__(num_classes, in_chans, fused, backend)
        self.cfg = cfg
        self.stem = ConvNormAct(in_chans, cfg.stem_width, 3, stride=2, kit=self.kit)
        stages, width = [], cfg.stem_width
        for i, spec in enumerate(cfg.stages(), 1):
            stages.append((f"block{i}", AnyStage(width, spec, i, cfg.block, self.kit)))
            width = spec.width
        self.trunk_output = nn.Sequential(OrderedDict(stages))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """torchvision's RegNet initialization (ResNet-style)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=0.01)
                nn.init.zeros_(m.bias)
        if self.cfg.zero_init_last_bn:
            for m in self.modules():
                if isinstance(m, ResBlock):
                    nn.init.zeros_(m.f[-1].bn.weight)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        with self.kit.scope():
            x = self.trunk_output(self.stem(x))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    def units(self):
        yield "stem", "ConvNormAct", self.stem.cost
        for stage_name, stage in self.trunk_output.named_children():
            for name, block in stage.named_children():
                yield f"trunk_output.{stage_name}.{name}", f"ResBlock[{self.cfg.block}]", block.cost
        yield "head", "AvgPool+Linear", partial(head_cost, self.fc)


# -- the exercises' designs --------------------------------------------------------------------------

# The two-stage AnyNet of the exercises (d2l's RegNetX32): stem 32, depths (4, 6), widths (32, 80),
# group width 16, bottleneck multiplier 1. The VioNets each violate one RegNet design principle of it.
_BASE = AnyNetCfg(depths=(4, 6), widths=(32, 80), group_widths=16, bottleneck_multipliers=1.0, stem_width=32)

ANYNET_CFGS = {
    "anynet": _BASE,
    "regnetx_32": AnyNetCfg(depths=(4, 6, 8, 16), widths=(32, 80, 128, 256), group_widths=16,
                            bottleneck_multipliers=1.0, stem_width=32),
    "deresnext": AnyNetCfg(depths=(5, 6), widths=(32, 80), stem_width=32, block="basic"),
    "vionet": _BASE,
    "vionet_d": AnyNetCfg(depths=(6, 4), widths=(32, 80), group_widths=16, stem_width=32),  # depths shrink
    "vionet_c": AnyNetCfg(depths=(4, 6), widths=(80, 32), group_widths=16, stem_width=32),  # widths shrink
    "vionet_g": AnyNetCfg(depths=(4, 6), widths=(32, 80), group_widths=(16, 32), stem_width=32),  # g varies
    "vionet_b": AnyNetCfg(depths=(4, 6), widths=(32, 80), group_widths=16, bottleneck_multipliers=(1.0, 2.0),
                          stem_width=32),  # b varies
}


class VioNet(AnyNet):
    """An AnyNet from per-stage tuples, the exercises' way: `VioNet(depths=(6, 4))` is VioNet-d.
    Defaults are the two-stage base (depths (4, 6), widths (32, 80), group widths 16, multipliers 1)."""

    def __init__(self, depths=(4, 6), widths=(32, 80), group_widths=(16, 16), bottleneck_multipliers=(1.0, 1.0),
                 stem_width: int = 32, num_classes: int = 1000, in_chans: int = 3, fused: bool = False,
                 backend: Optional[str] = None) -> None:
        cfg = AnyNetCfg(depths=depths, widths=widths, group_widths=group_widths,
                        bottleneck_multipliers=bottleneck_multipliers, stem_width=stem_width)
        super().__init__(cfg, num_classes, in_chans, fused, backend)


def _anynet(name: str, doc: str):
    """The registered entry point `name`: `name`'s design; keyword arguments are num_classes, in_chans,
    fused, backend, or AnyNetCfg fields."""
    return register_preset(name, AnyNet, ANYNET_CFGS, doc)


anynet = _anynet(
    "anynet", "A generic AnyNet: any `AnyNetCfg` field may be given; defaults are the exercises' two-stage base.")
regnetx_32 = _anynet(
    "regnetx_32",
    "The exercises' four-stage RegNetX: stem 32, depths (4, 6, 8, 16), widths (32, 80, 128, 256), g 16, b 1.")
deresnext = _anynet(
    "deresnext", "AnyNet with ResNet basic blocks instead of ResNeXt ones: stem 32, depths (5, 6), widths (32, 80).")
vionet = _anynet(
    "vionet", "The VioNets' two-stage base: depths (4, 6), widths (32, 80), group width 16, multiplier 1.")
vionet_d = _anynet("vionet_d", "VioNet-d: depths (6, 4), decreasing.")
vionet_c = _anynet("vionet_c", "VioNet-c: widths (80, 32), decreasing.")
vionet_g = _anynet("vionet_g", "VioNet-g: group widths (16, 32), varying across stages.")
vionet_b = _anynet("vionet_b", "VioNet-b: bottleneck multipliers (1, 2), varying across stages.")
