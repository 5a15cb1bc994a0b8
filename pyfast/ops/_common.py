"""Small pieces every fused op's Python layer uses: autocast, argument checks, gradient bookkeeping."""
from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from ._bn import check_activation, check_like
from ._cache import cached, storage_stamp
from ._conv import ConvParams, memory_format_of
from .backends import choice_settings


class ConvOpConfig(NamedTuple):
    """The non-tensor arguments of one call of a convolving op (conv_bn_relu, bn_relu_conv), kept on the
    autograd context by name (a NamedTuple: built on every call, and a frozen dataclass costs several times as
    much to construct)."""

    training: bool
    momentum: Optional[float]
    eps: float
    params: ConvParams
    relu: bool
    backend: str
    reuse: bool  # eval: affine maps may come from the cache (the call records no autograd graph)


def autocast_inputs(*tensors: Optional[Tensor]):
    """Convolution inputs under torch.autocast: cast to the autocast dtype, as F.conv2d would be.
    Custom ops are invisible to autocast, so the op layer applies its rule itself."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def needs_grad(*tensors: Optional[Tensor]) -> bool:
    if not torch.is_grad_enabled():
        return False
    for t in tensors:  # a loop, not any() over a generator: this runs on every call
        if t is not None and t.requires_grad:
            return True
    return False


def like_layout(t: Tensor, ref: Tensor) -> Tensor:
    """`t` in `ref`'s memory format (incoming gradients can be in any layout; kernels read both
    tensors with the same strides)."""
    return t.contiguous(memory_format=memory_format_of(ref))


def dtype_of(t: Optional[Tensor]) -> Optional[torch.dtype]:
    return None if t is None else t.dtype


def param_grad(grad_sum: Optional[Tensor], dtype: Optional[torch.dtype], wanted: bool) -> Optional[Tensor]:
    """A BN parameter's gradient: the per-channel sum a reduction kernel produced, as it is (no copy) unless
    the parameter (of `dtype`; None: no parameter) has another dtype; None when autograd does not want it."""
    if not wanted or grad_sum is None:
        return None
    return grad_sum if dtype is None else grad_sum.to(dtype)


def conv_inputs(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], stride, padding, dilation, groups,
                cast_x: bool = True):
    """Checks a convolving op's input and convolution arguments (after autocast's casts); returns
    (x, weight, bias, ConvParams, output shape). cast_x=False: x is not the convolution's operand
    (bn_relu_conv normalizes it first, and autocast casts only what reaches the convolution)."""
    check_activation("x", x)
    if weight is None:
        raise ValueError("weight is required")
    if cast_x:
        x, weight, bias = autocast_inputs(x, weight, bias)
    else:
        weight, bias = autocast_inputs(weight, bias)
    check_like("weight", weight, x, "x", dtype=cast_x or not torch.is_autocast_enabled(x.device.type))
    check_like("bias", bias, weight, "weight")
    params = ConvParams.of(stride, padding, dilation, groups)
    return x, weight, bias, params, params.check(x, weight)


def memoized_call(training: bool, activations: Sequence[Optional[Tensor]], tensors: Sequence[Optional[Tensor]],
                  arguments: tuple, backend: Optional[str], resolve: Callable[[], Optional[Callable]]
                  ) -> Optional[Callable]:
    """A fused call resolved once and reused: `resolve()` checks the arguments and returns the call as a function
    of the activations (backend chosen; in inference the BN folded or turned into its affine map), or None where
    the op takes its general path. It is reused while each activation (the first a tensor, the others tensors or
    None) has the same dtype, device, shape and strides, the other `arguments` and the backend settings
    (`choice_settings(backend)`) are equal, and each of `tensors` (the parameters and buffers; the first holds
    the entry, None: no call to memoize) is the same tensor
    - in inference (eval BN, no autograd graph), at the same version: the function binds values derived from
      them;
    - in training, with the same storage and shape: the function binds only the tensors and what the checks and
      the backend choice found, so the running statistics' updates and optimizer steps keep it valid.
    A repeated call skips every check and lookup. None (the general path) under torch.compile, which resolves
    once per graph, under autocast, which casts per call, for an eval call that records a graph, and while
    backend choices are recorded."""
    x, settings = activations[0], choice_settings(backend)
    if settings is None or tensors[0] is None or not isinstance(x, Tensor) or torch.compiler.is_compiling():
        return None
    # (autocast on any device: one builtin call, where asking x's device type would build a device object first)
    if torch._C._is_any_autocast_enabled() or (not training and needs_grad(*activations, *tensors)):
        return None
    layouts = [None if a is None else (a.dtype, a.device, a.shape, a.stride()) for a in activations]
    if training:
        return cached(tensors[0], "training call", tensors, (layouts, arguments, settings), resolve, storage_stamp)
    return cached(tensors[0], "inference call", tensors, (layouts, arguments, settings), resolve)


def memoized_conv_call(resolve: Callable, x: Tensor, tensors: tuple, training: bool, momentum, eps, stride, padding,
                       dilation, groups, relu: bool, backend: Optional[str]) -> Optional[Callable]:
    """memoized_call for the convolving ops: `tensors` are (weight, bias, bn_weight, bn_bias, running_mean,
    running_var, num_batches_tracked) (keyed as conv_memo_tensors says), and `resolve` takes the op's arguments in
    that order (x, *tensors, training, momentum, eps, stride, padding, dilation, groups, relu, backend)."""
    return memoized_call(training, (x,), conv_memo_tensors(*tensors, training),
                         (momentum, eps, stride, padding, dilation, groups, relu), backend,
                         lambda: resolve(x, *tensors, training, momentum, eps, stride, padding, dilation, groups, relu,
                                         backend))


def conv_memo_tensors(weight, bias, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
                      training: bool) -> tuple:
    """A convolving op's tensors as a memoized call's key, the convolution's weight (the entry's owner) first;
    num_batches_tracked only in training (an eval call does not read it)."""
    if training:
        return weight, bias, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked
    return weight, bias, bn_weight, bn_bias, running_mean, running_var


def bn_memo_tensors(weight, bias, running_mean, running_var, num_batches_tracked, training: bool) -> tuple:
    """One BN's tensors as a memoized call's key, the owner of its entry first: in eval the running statistics
    (an eval BN has them; num_batches_tracked is not read), in training the weight (usually given)."""
    if training:
        return weight, bias, running_mean, running_var, num_batches_tracked
    return running_mean, running_var, weight, bias
