"""Convolution arguments shared by the ops that convolve: normalization, checks, output shape."""
import functools
from dataclasses import dataclass
from typing import Sequence, Tuple, Union

import torch
from torch import Tensor

IntPair = Union[int, Sequence[int]]


def _pair(name: str, value: IntPair) -> Tuple[int, int]:
    if isinstance(value, str):
        raise ValueError(f"{name}={value!r}: pass explicit integers (pyfast.nn resolves 'same'/'valid')")
    pair = (value, value) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair


@dataclass(frozen=True)
class ConvParams:
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (0, 0)
    dilation: Tuple[int, int] = (1, 1)
    groups: int = 1

    @classmethod
    def of(cls, stride: IntPair, padding: IntPair, dilation: IntPair, groups: int) -> "ConvParams":
        """Checked parameters; memoized, since a network passes the same few settings on every call."""
        try:
            return _checked_params(stride, padding, dilation, groups)
        except TypeError:  # unhashable: lists
            return _checked_params(*(tuple(v) if isinstance(v, list) else v for v in (stride, padding, dilation)),
                                   groups)

    @classmethod
    def _check(cls, stride: IntPair, padding: IntPair, dilation: IntPair, groups: int) -> "ConvParams":
        params = cls(_pair("stride", stride), _pair("padding", padding), _pair("dilation", dilation), int(groups))
        if min(params.stride) < 1 or min(params.dilation) < 1 or min(params.padding) < 0:
            raise ValueError(f"stride and dilation must be >= 1 and padding >= 0, got {params}")
        if params.groups < 1:
            raise ValueError(f"groups must be >= 1, got {groups}")
        return params

    @classmethod
    def from_lists(cls, stride, padding, dilation, groups: int) -> "ConvParams":
        """From the flat form the torch.library schemas take (already checked by `of`)."""
        return cls(tuple(stride), tuple(padding), tuple(dilation), groups)

    def as_lists(self):
        """The flat form the torch.library schemas take."""
        return list(self.stride), list(self.padding), list(self.dilation), self.groups

    def output_shape(self, x: Tensor, weight: Tensor):
        height, width = x.shape[2:]
        kh, kw = weight.shape[2:]
        out_h = (height + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        out_w = (width + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        return (x.shape[0], weight.shape[0], out_h, out_w)

    def check(self, x: Tensor, weight: Tensor, x_name: str = "x"):
        """Raises for arguments that do not convolve; returns the output shape."""
        if weight.dim() != 4:
            raise ValueError(f"weight must be 4-D (C_out, C_in/groups, KH, KW), got shape {tuple(weight.shape)}")
        channels, out_channels = x.shape[1], weight.shape[0]
        if channels % self.groups or out_channels % self.groups:
            raise ValueError(
                f"groups={self.groups} must divide the input channels ({channels}) and the weight's "
                f"output channels ({out_channels})"
            )
        if weight.shape[1] * self.groups != channels:
            raise ValueError(
                f"weight of shape {tuple(weight.shape)} with groups={self.groups} expects {x_name} to have "
                f"{weight.shape[1] * self.groups} channels, got {channels}"
            )
        shape = self.output_shape(x, weight)
        if shape[2] < 1 or shape[3] < 1:
            raise ValueError(f"{x_name} of spatial size {tuple(x.shape[2:])} is smaller than the kernel")
        return shape


@functools.lru_cache(maxsize=256)
def _checked_params(stride, padding, dilation, groups) -> ConvParams:
    return ConvParams._check(stride, padding, dilation, groups)


def memory_format_of(x: Tensor) -> torch.memory_format:
    """channels_last for a 4-D NHWC-strided tensor, else contiguous (a tensor that is both, like a
    1x1 image, counts as contiguous)."""
    nhwc = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if nhwc else torch.contiguous_format
