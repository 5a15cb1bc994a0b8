"""Analytic complexity of a model, computed from its configuration without running it.

pycls's `complexity(cx)` idea: every unit of a model (the stem, each residual block, the head) maps an
input shape to its output shape and a `Cost`:

- `flops`: multiply-accumulates of its convolutions and linear layers (bias additions, BN, ReLU,
  pooling and residual additions are not counted: the convention of torchvision's published
  GFLOPS and of `torch.utils.flop_counter`, which reports 2 x this number);
- `params`: parameters (conv/linear weights and biases, BN weight and bias; no buffers);
- `acts`: elements written by its convolutions and linear layers (pycls's "activations").

A `UnitCost` adds the unit's input and output shapes. The *minimal bytes moved* of a unit is a lower
bound for a forward pass that runs the unit in one pass: read its input once, read its parameters
once, write its output once (`UnitCost.min_bytes`); a model's is the sum over its units. Achieved
bandwidth and throughput are `Complexity.gbps(seconds)` and `Complexity.tflops(seconds)`.

Shapes are (N, C, H, W) or (N, C); `complexity(model, (C, H, W))` means a batch of one.
"""
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from .._shapes import conv_output_size

__all__ = ["Complexity", "Cost", "UnitCost", "complexity", "conv_bn_cost", "conv_cost", "linear_cost",
           "pool_shape"]

Shape = Tuple[int, ...]


@dataclass(frozen=True)
class Cost:
    """Multiply-accumulates, parameters and conv/linear output elements of some layers."""

    flops: int = 0
    params: int = 0
    acts: int = 0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.params + other.params, self.acts + other.acts)


def _numel(shape: Shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def conv_cost(conv: nn.Conv2d, shape: Shape) -> Tuple[Shape, Cost]:
    n, c, h, w = shape
    if c != conv.in_channels:
        raise ValueError(f"{conv} expects {conv.in_channels} input channels, the shape has {c}")
    ho, wo = conv_output_size(h, w, conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    out = (n, conv.out_channels, ho, wo)
    kh, kw = conv.kernel_size
    macs_per_output = kh * kw * conv.in_channels // conv.groups
    params = conv.weight.numel() + (conv.bias.numel() if conv.bias is not None else 0)
    return out, Cost(flops=_numel(out) * macs_per_output, params=params, acts=_numel(out))


def bn_cost(bn: Optional[nn.BatchNorm2d]) -> Cost:
    if bn is None or not bn.affine:
        return Cost()
    return Cost(params=2 * bn.num_features)


def conv_bn_cost(conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d], shape: Shape) -> Tuple[Shape, Cost]:
    out, cost = conv_cost(conv, shape)
    return out, cost + bn_cost(bn)


def pool_shape(shape: Shape, kernel: int, stride: int, padding: int) -> Shape:
    n, c, h, w = shape
    return (n, c, *conv_output_size(h, w, kernel, stride, padding))


def linear_cost(linear: nn.Linear, shape: Shape) -> Tuple[Shape, Cost]:
    n, c = shape
    out = (n, linear.out_features)
    params = linear.weight.numel() + (linear.bias.numel() if linear.bias is not None else 0)
    return out, Cost(flops=n * linear.in_features * linear.out_features, params=params, acts=_numel(out))


def head_cost(fc: nn.Linear, shape: Shape) -> Tuple[Shape, Cost]:
    """Global average pool, flatten, linear."""
    return linear_cost(fc, shape[:2])


@dataclass(frozen=True)
class UnitCost:
    """One unit of a model (stem, block, head): where it sits, its shapes and its cost."""

    name: str
    kind: str
    in_shape: Shape
    out_shape: Shape
    cost: Cost

    @property
    def flops(self) -> int:
        return self.cost.flops

    @property
    def params(self) -> int:
        return self.cost.params

    @property
    def acts(self) -> int:
        return self.cost.acts

    def min_bytes(self, dtype: torch.dtype = torch.float32, param_dtype: Optional[torch.dtype] = None) -> int:
        """Read the input once, the parameters once, write the output once."""
        act = torch.empty((), dtype=dtype).element_size()
        par = torch.empty((), dtype=param_dtype or dtype).element_size()
        return (_numel(self.in_shape) + _numel(self.out_shape)) * act + self.params * par


@dataclass(frozen=True)
class Complexity:
    """Per-unit costs of a model at one input shape, and their totals."""

    input_shape: Shape
    units: Tuple[UnitCost, ...] = field(default_factory=tuple)

    @property
    def flops(self) -> int:
        return sum(u.flops for u in self.units)

    @property
    def params(self) -> int:
        return sum(u.params for u in self.units)

    @property
    def acts(self) -> int:
        return sum(u.acts for u in self.units)

    def min_bytes(self, dtype: torch.dtype = torch.float32, param_dtype: Optional[torch.dtype] = None) -> int:
        return sum(u.min_bytes(dtype, param_dtype) for u in self.units)

    def tflops(self, seconds: float, backward: bool = False) -> float:
        """Achieved TFLOP/s (2 FLOPs per multiply-accumulate) of a forward, or a forward+backward
        (3x the forward's work: the backward computes input and weight gradients) taking `seconds`."""
        return 2 * self.flops * (3 if backward else 1) / seconds / 1e12

    def gbps(self, seconds: float, dtype: torch.dtype = torch.float32,
             param_dtype: Optional[torch.dtype] = None) -> float:
        """Achieved GB/s of a forward taking `seconds`, counting only the minimal bytes moved."""
        return self.min_bytes(dtype, param_dtype) / seconds / 1e9

    def table(self) -> str:
        """A readable per-unit table (MACs in millions, params in thousands)."""
        rows = [f"{'unit':<36}{'kind':<20}{'out shape':<22}{'MMACs':>10}{'Kparams':>10}{'Kacts':>10}"]
        for u in self.units:
            rows.append(f"{u.name:<36}{u.kind:<20}{str(u.out_shape):<22}{u.flops / 1e6:>10.2f}"
                        f"{u.params / 1e3:>10.1f}{u.acts / 1e3:>10.1f}")
        rows.append(f"{'total':<78}{self.flops / 1e6:>10.2f}{self.params / 1e3:>10.1f}{self.acts / 1e3:>10.1f}")
        return "\n".join(rows)


def complexity(model: nn.Module, input_shape: Sequence[int] = (3, 224, 224)) -> Complexity:
    """The complexity of a pyfast model at `input_shape`, (C, H, W) or (N, C, H, W), computed from its
    modules' configuration; nothing runs, so a model built on the meta device works too.

    The model lists its units in order: `model.units()` yields `(name, kind, cost_fn)` with
    `cost_fn(in_shape) -> (out_shape, Cost)`."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4:
        raise ValueError(f"input_shape must be (C, H, W) or (N, C, H, W), got {tuple(input_shape)}")
    if not hasattr(model, "units"):
        raise TypeError(f"{type(model).__name__} does not describe its units; build it with pyfast.models")
    units = []
    for name, kind, cost_fn in model.units():
        out, cost = cost_fn(shape)
        units.append(UnitCost(name, kind, shape, out, cost))
        shape = out
    return Complexity(units[0].in_shape if units else shape, tuple(units))
