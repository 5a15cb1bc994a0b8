"""Convolution arguments shared by the ops that convolve: normalization, checks, output shape."""
import functools
from dataclasses import dataclass
from typing import Sequence, Tuple, Union

import torch
from torch import Tensor

from .._shapes import conv_output_size, pair

IntPair = Union[int, Sequence[int]]


def _pair(name: str, value: IntPair, minimum: int) -> Tuple[int, int]:
    if isinstance(value, str):
        raise ValueError(f"{name}={value!r}: pass explicit integers (pyfast.nn resolves 'same'/'valid')")
    return pair(value, name, minimum)


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
        params = cls(_pair("stride", stride, 1), _pair("padding", padding, 0), _pair("dilation", dilation, 1),
                     int(groups))
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
        return (x.shape[0], weight.shape[0], *_output_size(self, *x.shape[2:], *weight.shape[2:]))

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


@functools.lru_cache(maxsize=1024)
def _output_size(params: ConvParams, height: int, width: int, kh: int, kw: int) -> Tuple[int, int]:
    """pyfast._shapes' rule, memoized: it runs on every call, with the few shapes a network has."""
    return conv_output_size(height, width, (kh, kw), params.stride, params.padding, params.dilation)


@functools.lru_cache(maxsize=256)
def _checked_params(stride, padding, dilation, groups) -> ConvParams:
    return ConvParams._check(stride, padding, dilation, groups)


def memory_format_of(x: Tensor) -> torch.memory_format:
    """channels_last for a 4-D NHWC-strided tensor, else contiguous (a tensor that is both, like a
    1x1 image, counts as contiguous)."""
    nhwc = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if nhwc else torch.contiguous_format
