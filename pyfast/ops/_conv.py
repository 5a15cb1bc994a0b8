"""Convolution arguments shared by the ops that convolve: normalization, checks, output shape."""
import functools
from typing import NamedTuple, Sequence, Tuple, Union

import torch
from torch import Tensor

from .._shapes import conv_output_size, pair

IntPair = Union[int, Sequence[int]]


def _pair(name: str, value: IntPair, minimum: int) -> Tuple[int, int]:
    if isinstance(value, str):
        raise ValueError(f"{name}={value!r}: pass explicit integers (pyfast.nn resolves 'same'/'valid')")
    return pair(value, name, minimum)


class ConvParams(NamedTuple):
    """A convolution's stride, padding, dilation and groups, checked. A NamedTuple: it is hashed on every call
    (memoized shape rules, caches), which a frozen dataclass does in Python."""

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

    def check(self, x: Tensor, weight: Tensor, x_name: str = "x"):
        """Raises for arguments that do not convolve; returns the output shape."""
        return _checked_output_shape(self, x.shape, weight.shape, x_name)


@functools.lru_cache(maxsize=1024)
def _checked_output_shape(params: ConvParams, x_shape: torch.Size, w_shape: torch.Size, x_name: str):
    """ConvParams.check on shapes, memoized: it runs on every call, with the few shapes a network has (a
    failing check raises again on every call: errors are not cached)."""
    if len(w_shape) != 4:
        raise ValueError(f"weight must be 4-D (C_out, C_in/groups, KH, KW), got shape {tuple(w_shape)}")
    channels, out_channels = x_shape[1], w_shape[0]
    if channels % params.groups or out_channels % params.groups:
        raise ValueError(
            f"groups={params.groups} must divide the input channels ({channels}) and the weight's "
            f"output channels ({out_channels})"
        )
    if w_shape[1] * params.groups != channels:
        raise ValueError(
            f"weight of shape {tuple(w_shape)} with groups={params.groups} expects {x_name} to have "
            f"{w_shape[1] * params.groups} channels, got {channels}"
        )
    height, width = conv_output_size(x_shape[2], x_shape[3], w_shape[2:], params.stride, params.padding,
                                     params.dilation)
    if height < 1 or width < 1:
        raise ValueError(f"{x_name} of spatial size {tuple(x_shape[2:])} is smaller than the kernel")
    return (x_shape[0], out_channels, height, width)


@functools.lru_cache(maxsize=256)
def _checked_params(stride, padding, dilation, groups) -> ConvParams:
    return ConvParams._check(stride, padding, dilation, groups)


def memory_format_of(x: Tensor) -> torch.memory_format:
    """channels_last for a 4-D NHWC-strided tensor, else contiguous (a tensor that is both, like a
    1x1 image, counts as contiguous)."""
    nhwc = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if nhwc else torch.contiguous_format
