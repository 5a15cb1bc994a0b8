"""RegNetX (Radosavovic et al. 2020): AnyNets whose widths and depths come from four numbers.

The generator follows torchvision's `BlockParams.from_init_params` step by step, in float32 as
torchvision computes it, so torchvision's parameter counts and checkpoints are the reference:

    u_j = w0 + wa * j                          (j = 0 .. depth-1, continuous widths)
    s_j = round(log(u_j / w0) / log(wm))       (the step of block j)
    w_j = round(w0 * wm**s_j / 8) * 8          (quantized to multiples of 8)
    stages = runs of equal w_j                 (widths, depths)
    w_b = int(w * b); g = min(g, w_b); w_b = make_divisible(w_b, g); w = int(w_b / b)

`make_divisible` rounds half up and never more than 10% down (pycls rounds half to even instead:
RegNetX-400MF's last stage is 384 wide in pycls, 400 here and in torchvision).
"""
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from .anynet import AnyNet, AnyNetCfg
from .base import check_positive, register_preset

__all__ = ["REGNETX_CFGS", "RegNet", "RegNetCfg", "adjust_widths_groups", "make_divisible", "regnet_stages",
           "regnetx_200mf", "regnetx_400mf", "regnetx_600mf", "regnetx_800mf", "regnetx_1_6gf",
           "regnetx_3_2gf", "regnetx_4_0gf", "regnetx_6_4gf", "regnetx_8gf", "regnetx_12gf", "regnetx_16gf",
           "regnetx_32gf"]

QUANT = 8


def make_divisible(v: float, divisor: int, min_value: int = None) -> int:
    """The nearest multiple of `divisor` (halves up), at least `min_value`, never below 0.9 * v."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def regnet_stages(depth: int, w0: int, wa: float, wm: float) -> Tuple[List[int], List[int]]:
    """Per-stage (widths, depths) of the quantized linear width rule, before group adjustment."""
    if wa < 0 or w0 <= 0 or wm <= 1 or w0 % QUANT != 0 or depth <= 0:
        raise ValueError(f"invalid RegNet settings: need depth > 0, w0 > 0 and a multiple of {QUANT}, wa >= 0, "
                         f"wm > 1; got depth={depth}, w0={w0}, wa={wa}, wm={wm}")
    widths_cont = torch.arange(depth, dtype=torch.float32, device="cpu") * wa + w0  # also under a meta device
    steps = torch.round(torch.log(widths_cont / w0) / math.log(wm))
    block_widths = (torch.round(w0 * torch.pow(wm, steps) / QUANT) * QUANT).int().tolist()
    widths, depths = [], []
    for w in block_widths:
        if widths and widths[-1] == w:
            depths[-1] += 1
        else:
            widths.append(w)
            depths.append(1)
    return widths, depths


def adjust_widths_groups(widths, bottleneck_multipliers, group_widths) -> Tuple[List[int], List[int]]:
    """Make each stage's bottleneck width a multiple of its group width (group width capped by it)."""
    bottleneck = [int(w * b) for w, b in zip(widths, bottleneck_multipliers)]
    group_widths = [min(g, w_b) for g, w_b in zip(group_widths, bottleneck)]
    bottleneck = [make_divisible(w_b, g) for w_b, g in zip(bottleneck, group_widths)]
    widths = [int(w_b / b) for w_b, b in zip(bottleneck, bottleneck_multipliers)]
    return widths, group_widths


@dataclass(frozen=True)
class RegNetCfg:
    """A RegNetX: depth, initial width w0, slope wa, log-step wm, group width (SE none)."""

    depth: int
    w0: int
    wa: float
    wm: float
    group_width: int
    bottleneck_multiplier: float = 1.0
    stem_width: int = 32
    zero_init_last_bn: bool = False

    def anynet(self) -> AnyNetCfg:
        check_positive("group_width", self.group_width)
        widths, depths = regnet_stages(self.depth, self.w0, self.wa, self.wm)
        n = len(widths)
        widths, group_widths = adjust_widths_groups(widths, [self.bottleneck_multiplier] * n,
                                                    [self.group_width] * n)
        return AnyNetCfg(depths=tuple(depths), widths=tuple(widths), group_widths=tuple(group_widths),
                         bottleneck_multipliers=self.bottleneck_multiplier, strides=2,
                         stem_width=self.stem_width, block="bottleneck", zero_init_last_bn=self.zero_init_last_bn)


# torchvision's regnet_x_* (400MF ... 32GF); 200MF, 600MF, 4.0GF, 6.4GF, 12GF from pycls's model zoo
# (configs/dds_baselines/regnetx), which torchvision does not ship.
REGNETX_CFGS = {
    "regnetx_200mf": RegNetCfg(depth=13, w0=24, wa=36.44, wm=2.49, group_width=8),
    "regnetx_400mf": RegNetCfg(depth=22, w0=24, wa=24.48, wm=2.54, group_width=16),
    "regnetx_600mf": RegNetCfg(depth=16, w0=48, wa=36.97, wm=2.24, group_width=24),
    "regnetx_800mf": RegNetCfg(depth=16, w0=56, wa=35.73, wm=2.28, group_width=16),
    "regnetx_1_6gf": RegNetCfg(depth=18, w0=80, wa=34.01, wm=2.25, group_width=24),
    "regnetx_3_2gf": RegNetCfg(depth=25, w0=88, wa=26.31, wm=2.25, group_width=48),
    "regnetx_4_0gf": RegNetCfg(depth=23, w0=96, wa=38.65, wm=2.43, group_width=40),
    "regnetx_6_4gf": RegNetCfg(depth=17, w0=184, wa=60.83, wm=2.07, group_width=56),
    "regnetx_8gf": RegNetCfg(depth=23, w0=80, wa=49.56, wm=2.88, group_width=120),
    "regnetx_12gf": RegNetCfg(depth=19, w0=168, wa=73.36, wm=2.37, group_width=112),
    "regnetx_16gf": RegNetCfg(depth=22, w0=216, wa=55.59, wm=2.1, group_width=128),
    "regnetx_32gf": RegNetCfg(depth=23, w0=320, wa=69.86, wm=2.0, group_width=168),
}


class RegNet(AnyNet):
    """An AnyNet generated from a `RegNetCfg` (kept as `regnet_cfg`)."""

    def __init__(self, cfg: RegNetCfg, num_classes: int = 1000, in_chans: int = 3, fused: bool = False,
                 backend: Optional[str] = None) -> None:
        super().__init__(cfg.anynet(), num_classes, in_chans, fused, backend)
        self.regnet_cfg = cfg


def _regnetx(name: str, doc: str):
    """The registered entry point `name`: `name`'s preset; keyword arguments are num_classes, in_chans,
    fused, backend, or RegNetCfg fields."""
    return register_preset(name, RegNet, REGNETX_CFGS, doc)


regnetx_200mf = _regnetx("regnetx_200mf", "RegNetX-200MF.")
regnetx_400mf = _regnetx("regnetx_400mf", "RegNetX-400MF.")
regnetx_600mf = _regnetx("regnetx_600mf", "RegNetX-600MF.")
regnetx_800mf = _regnetx("regnetx_800mf", "RegNetX-800MF.")
regnetx_1_6gf = _regnetx("regnetx_1_6gf", "RegNetX-1.6GF.")
regnetx_3_2gf = _regnetx("regnetx_3_2gf", "RegNetX-3.2GF.")
regnetx_4_0gf = _regnetx("regnetx_4_0gf", "RegNetX-4.0GF.")
regnetx_6_4gf = _regnetx("regnetx_6_4gf", "RegNetX-6.4GF.")
regnetx_8gf = _regnetx("regnetx_8gf", "RegNetX-8.0GF.")
regnetx_12gf = _regnetx("regnetx_12gf", "RegNetX-12GF.")
regnetx_16gf = _regnetx("regnetx_16gf", "RegNetX-16GF.")
regnetx_32gf = _regnetx("regnetx_32gf", "RegNetX-32GF.")
