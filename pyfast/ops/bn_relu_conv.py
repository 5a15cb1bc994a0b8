"""bn_relu_conv: conv2d(relu(batch_norm(x))), the pre-activation unit of He et al. 2016, "Identity
Mappings in Deep Residual Networks".

Forward: x's statistics, then a convolution whose operand loader applies scale/shift + ReLU (a fused
prologue on the Triton backend), so the normalized activation is never stored. Backward recomputes that
activation for the weight gradient, then one reduction and one elementwise BN pass.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import reference
from ._bn import (BatchNormArgs, acc_dtype, check_batch_norm, reduction_count, running_stats, scale_shift,
                  update_running_stats)
from ._common import ConvOpSaved, conv_inputs, like_layout, placeholder, param_grad, unplaceholder
from ._conv import ConvParams
from .backends import BACKENDS, select
from .conv_bn_relu import conv_layout, conv_output


def bn_relu_conv(x: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], running_mean: Optional[Tensor],
                 running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor] = None,
                 training: bool = False, momentum: Optional[float] = 0.1, eps: float = 1e-5,
                 weight: Tensor = None, bias: Optional[Tensor] = None, stride=1, padding=0, dilation=1,
                 groups: int = 1, relu: bool = True, backend: Optional[str] = None) -> Tensor:
    """F.conv2d(relu(F.batch_norm(x, running_mean, running_var, bn_weight, bn_bias, training, momentum,
    eps)), weight, bias, stride, padding, dilation, groups); `relu=False` drops the ReLU."""
    x, weight, bias, params = conv_inputs(x, weight, bias, stride, padding, dilation, groups)
    bn = BatchNormArgs(bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, momentum, eps)
    check_batch_norm("bn_", x.shape, x.device, bn, training)

    chosen = select("bn_relu_conv", x, backend)
    if chosen.name == "reference":
        return reference.bn_relu_conv(x, bn, training, weight, bias, params, relu)
    out, mean, var = torch.ops.pyfast.bn_relu_conv(x, bn_weight, bn_bias, running_mean, running_var, weight, bias,
                                                   training, eps, *params.as_lists(), relu, chosen.name)
    if training:
        update_running_stats(bn, mean, var, reduction_count(x))
    return out


@torch.library.custom_op("pyfast::bn_relu_conv", mutates_args=())
def _bn_relu_conv(x: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], running_mean: Optional[Tensor],
                  running_var: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], training: bool, eps: float,
                  stride: List[int], padding: List[int], dilation: List[int], groups: int, relu: bool,
                  backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns (out, mean, biased var of x); the statistics are saved for backward."""
    chosen = BACKENDS[backend]
    params = ConvParams.from_lists(stride, padding, dilation, groups)
    if training:
        mean, var = chosen.bn_stats(x)
    else:
        mean, var = running_stats(running_mean, running_var, acc_dtype(x.dtype))
    scale, shift, _ = scale_shift(bn_weight, bn_bias, mean, var, eps)
    out = chosen.bn_act_conv(x, scale, shift, relu, weight, bias, params)
    return out.contiguous(memory_format=conv_layout(x, weight, backend)), mean, var


@_bn_relu_conv.register_fake
def _(x, bn_weight, bn_bias, running_mean, running_var, weight, bias, training, eps, stride, padding, dilation, groups,
      relu, backend):
    stats = x.new_empty(x.shape[1], dtype=acc_dtype(x.dtype))
    out = conv_output(x, weight, ConvParams.from_lists(stride, padding, dilation, groups), backend)
    return out, stats, torch.empty_like(stats)



def _setup_context(ctx, inputs, output):
    x, bn_weight, bn_bias, _, _, weight, bias, training, eps, stride, padding, dilation, groups, relu, backend = inputs
    _, mean, var = output
    ctx.save_for_backward(x, bn_weight, bn_bias, weight, mean, var)
    ctx.has_bias = bias is not None
    ctx.saved = ConvOpSaved(training, eps, ConvParams.from_lists(stride, padding, dilation, groups), relu, backend)


def _backward(ctx, grad_out, _grad_mean, _grad_var):
    s: ConvOpSaved = ctx.saved
    needs = ctx.needs_input_grad
    wanted = [needs[0], needs[1], needs[2], needs[5], needs[6] and ctx.has_bias]
    grads = torch.ops.pyfast.bn_relu_conv_backward(grad_out, *ctx.saved_tensors, s.training, s.eps,
                                                   *s.params.as_lists(), s.relu, wanted, s.backend)
    grad_x, grad_bn_weight, grad_bn_bias, grad_weight, grad_bias = unplaceholder(grads, wanted)
    return grad_x, grad_bn_weight, grad_bn_bias, None, None, grad_weight, grad_bias, *([None] * 8)


_bn_relu_conv.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("pyfast::bn_relu_conv_backward", mutates_args=())
def _bn_relu_conv_backward(grad_out: Tensor, x: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                           weight: Tensor, mean: Tensor, var: Tensor, training: bool, eps: float, stride: List[int],
                           padding: List[int], dilation: List[int], groups: int, relu: bool, wanted: List[bool],
                           backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_bn_weight, grad_bn_bias, grad_weight, grad_bias); placeholders where not wanted."""
    chosen = BACKENDS[backend]
    params = ConvParams.from_lists(stride, padding, dilation, groups)
    scale, shift, invstd = scale_shift(bn_weight, bn_bias, mean, var, eps)
    # The normalized activation was never stored: recompute it for the convolution's weight gradient.
    activation = chosen.bn_act_forward(x, scale, shift, None, None, None, relu)
    grad_out = like_layout(grad_out, activation)
    grad_a, grad_weight, grad_bias = chosen.conv_backward(grad_out, activation, weight, params,
                                                          [True, wanted[3], wanted[4]])
    grad_a = like_layout(grad_a, x)
    sum_dz, sum_dz_xhat, _ = chosen.bn_act_backward_reduce(grad_a, x, scale, shift, mean, invstd,
                                                           None, None, None, None, None, relu)
    count = reduction_count(x)
    mean_dz, mean_dz_xhat = (sum_dz / count, sum_dz_xhat / count) if training else (None, None)
    grad_x, _ = chosen.bn_act_backward_elemt(grad_a, x, scale, shift, mean, invstd, None, None, None, None, None,
                                             relu, mean_dz, mean_dz_xhat, None)
    grads = (grad_x, param_grad(sum_dz_xhat, bn_weight), param_grad(sum_dz, bn_bias), grad_weight,
             grad_bias)
    return tuple(g if want else placeholder(x) for g, want in zip(grads, wanted))


@_bn_relu_conv_backward.register_fake
def _(grad_out, x, bn_weight, bn_bias, weight, mean, var, training, eps, stride, padding, dilation, groups, relu,
      wanted, backend):
    def vector(param, channels):
        return mean.new_empty(channels, dtype=mean.dtype if param is None else param.dtype)

    grads = (torch.empty_like(x), vector(bn_weight, x.shape[1]), vector(bn_bias, x.shape[1]),
             torch.empty_like(weight), weight.new_empty(weight.shape[0]))
    return tuple(g if want else placeholder(x) for g, want in zip(grads, wanted))
