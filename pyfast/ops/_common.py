"""Small pieces every fused op's Python layer uses: autocast, grad bookkeeping, placeholders."""
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from ._bn import check_activation, check_like
from ._conv import ConvParams, memory_format_of


@dataclass(frozen=True)
class ConvOpSaved:
    """What the backward of a convolving op needs besides tensors (kept as a small dataclass on ctx
    rather than a long positional tuple)."""

    training: bool
    eps: float
    params: ConvParams
    relu: bool
    backend: str


def autocast_inputs(*tensors: Optional[Tensor]):
    """Convolution inputs under torch.autocast: cast to the autocast dtype, as F.conv2d would be.
    Custom ops are invisible to autocast, so the op layer applies its rule itself."""
    device_type = next(t for t in tensors if t is not None).device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def needs_grad(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def placeholder(like: Tensor) -> Tensor:
    """What a custom op returns in place of a gradient nobody asked for (ops cannot return None)."""
    return like.new_empty(0)


def unplaceholder(grads: Sequence[Tensor], wanted: Sequence[bool]):
    """Turns placeholders back into the Nones autograd expects."""
    return tuple(g if want else None for g, want in zip(grads, wanted))


def like_layout(t: Tensor, ref: Tensor) -> Tensor:
    """`t` in `ref`'s memory format (incoming gradients can be in any layout; kernels read both
    tensors with the same strides)."""
    return t.contiguous(memory_format=memory_format_of(ref))


def param_grad(grad: Tensor, param: Optional[Tensor]) -> Tensor:
    """A BN parameter's gradient from a per-channel sum, in the parameter's dtype. Always a fresh
    C-length tensor: a custom op's outputs may not alias each other (kernels may return the sums as
    views of one buffer, and bn_add_relu hands sum dz to both BNs)."""
    return grad.to(grad.dtype if param is None else param.dtype, copy=True)


def conv_inputs(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], stride, padding, dilation, groups):
    """Checks a convolving op's input and convolution arguments (after autocast's casts); returns
    (x, weight, bias, ConvParams)."""
    check_activation("x", x)
    if weight is None:
        raise ValueError("weight is required")
    x, weight, bias = autocast_inputs(x, weight, bias)
    check_like("weight", weight, x, "x")
    check_like("bias", bias, x, "x")
    params = ConvParams.of(stride, padding, dilation, groups)
    params.check(x, weight)
    return x, weight, bias, params
