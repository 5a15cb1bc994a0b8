"""conv_bn_relu: relu(batch_norm(conv2d(x))) in fewer passes over memory.

- inference: BN folded into the convolution's weight and bias; one convolution whose epilogue adds
  the bias and applies the ReLU (`pyfast::conv_bias_relu`);
- training (or eval with gradients): the convolution produces its output y and y's batch statistics
  (one kernel on the Triton backend), one pass applies scale/shift + ReLU. The backward recomputes the
  ReLU mask from y (y is saved, the post-ReLU output is not): one reduction pass (sum dz, sum dz*xhat),
  one elementwise pass, then the convolution backward.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import reference
from ._bn import (BatchNormArgs, acc_dtype, check_batch_norm, reduction_count, running_stats, scale_shift,
                  update_running_stats)
from ._common import ConvOpSaved, conv_inputs, like_layout, needs_grad, placeholder, param_grad, unplaceholder
from ._conv import ConvParams, memory_format_of
from .backends import BACKENDS, select


def conv_bn_relu(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
                 bn_bias: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
                 num_batches_tracked: Optional[Tensor] = None, training: bool = False,
                 momentum: Optional[float] = 0.1, eps: float = 1e-5, stride=1, padding=0, dilation=1,
                 groups: int = 1, relu: bool = True, backend: Optional[str] = None) -> Tensor:
    """relu(F.batch_norm(F.conv2d(x, weight, bias, stride, padding, dilation, groups), running_mean,
    running_var, bn_weight, bn_bias, training, momentum, eps)), with `num_batches_tracked` and
    `momentum=None` as in nn.BatchNorm2d; `relu=False` stops after the BN. Running statistics are
    updated in place in training."""
    x, weight, bias, params = conv_inputs(x, weight, bias, stride, padding, dilation, groups)
    bn = BatchNormArgs(bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, momentum, eps)
    check_batch_norm("bn_", params.output_shape(x, weight), x.device, bn, training)

    chosen = select("conv_bn_relu", x, backend)
    if chosen.name == "reference":
        return reference.conv_bn_relu(x, weight, bias, bn, training, params, relu)
    if not training and not needs_grad(x, weight, bias, bn_weight, bn_bias):
        folded_weight, folded_bias = fold_batch_norm(weight, bias, bn)
        return torch.ops.pyfast.conv_bias_relu(x, folded_weight, folded_bias, *params.as_lists(), relu, chosen.name)
    out, y, mean, var = torch.ops.pyfast.conv_bn_relu(
        x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, eps, *params.as_lists(), relu,
        chosen.name,
    )
    if training:
        update_running_stats(bn, mean, var, reduction_count(y))
    return out


def fold_batch_norm(weight: Tensor, bias: Optional[Tensor], bn: BatchNormArgs) -> Tuple[Tensor, Tensor]:
    """Eval-mode BN folded into the convolution: w*scale and (b - running_mean)*scale + beta, computed
    in float32 (the stored parameters are not touched)."""
    mean, var = running_stats(bn.running_mean, bn.running_var, acc_dtype(weight.dtype))
    scale, shift, _ = scale_shift(bn.weight, bn.bias, mean, var, bn.eps)
    folded_bias = shift if bias is None else shift + bias.to(scale.dtype) * scale
    return (weight * scale.view(-1, 1, 1, 1)).to(weight.dtype), folded_bias.to(weight.dtype)


def conv_layout(x: Tensor, weight: Tensor, backend: str) -> torch.memory_format:
    """The memory format a backend's convolution produces; outputs are pinned to it so that the fake
    implementations (torch.compile) and the real ones agree."""
    if memory_format_of(weight) == torch.channels_last:
        return torch.channels_last  # ATen's convolutions answer a channels_last weight in kind
    return BACKENDS[backend].output_memory_format(x)


def conv_output(x: Tensor, weight: Tensor, params: ConvParams, backend: str) -> Tensor:
    """An empty convolution output as the backend lays it out (for the fake implementations)."""
    return torch.empty(params.output_shape(x, weight), dtype=x.dtype, device=x.device,
                       memory_format=conv_layout(x, weight, backend))


# -- pyfast::conv_bias_relu: inference -----------------------------------------------------------------

@torch.library.custom_op("pyfast::conv_bias_relu", mutates_args=())
def _conv_bias_relu(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int], padding: List[int],
                    dilation: List[int], groups: int, relu: bool, backend: str) -> Tensor:
    params = ConvParams.from_lists(stride, padding, dilation, groups)
    out = BACKENDS[backend].conv_bias_act(x, weight, bias, params, relu)
    return out.contiguous(memory_format=conv_layout(x, weight, backend))


@_conv_bias_relu.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, relu, backend):
    return conv_output(x, weight, ConvParams.from_lists(stride, padding, dilation, groups), backend)


# -- pyfast::conv_bn_relu: training, or eval with gradients -------------------------------------------

@torch.library.custom_op("pyfast::conv_bn_relu", mutates_args=())
def _conv_bn_relu(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
                  bn_bias: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
                  training: bool, eps: float, stride: List[int], padding: List[int], dilation: List[int],
                  groups: int, relu: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (out, y = conv output, mean, biased var); the last three are saved for backward."""
    chosen = BACKENDS[backend]
    params = ConvParams.from_lists(stride, padding, dilation, groups)
    if training:
        y, mean, var = chosen.conv_bn_stats(x, weight, bias, params)
    else:
        y = chosen.conv(x, weight, bias, params)
        mean, var = running_stats(running_mean, running_var, acc_dtype(x.dtype))
    y = y.contiguous(memory_format=conv_layout(x, weight, backend))
    scale, shift, _ = scale_shift(bn_weight, bn_bias, mean, var, eps)
    return chosen.bn_act_forward(y, scale, shift, None, None, None, relu), y, mean, var


@_conv_bn_relu.register_fake
def _(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, eps, stride, padding, dilation,
      groups, relu, backend):
    y = conv_output(x, weight, ConvParams.from_lists(stride, padding, dilation, groups), backend)
    stats = x.new_empty(weight.shape[0], dtype=acc_dtype(x.dtype))
    return torch.empty_like(y), y, stats, torch.empty_like(stats)



def _setup_context(ctx, inputs, output):
    x, weight, bias, bn_weight, bn_bias, _, _, training, eps, stride, padding, dilation, groups, relu, backend = inputs
    _, y, mean, var = output
    ctx.save_for_backward(x, weight, y, mean, var, bn_weight, bn_bias)
    ctx.saved = ConvOpSaved(training, eps, ConvParams.from_lists(stride, padding, dilation, groups), relu, backend)


def _backward(ctx, grad_out, _grad_y, _grad_mean, _grad_var):
    x, weight, y, mean, var, bn_weight, bn_bias = ctx.saved_tensors
    s: ConvOpSaved = ctx.saved
    wanted = list(ctx.needs_input_grad[:5])
    grads = torch.ops.pyfast.conv_bn_relu_backward(
        grad_out, x, weight, y, mean, var, bn_weight, bn_bias, s.training, s.eps, *s.params.as_lists(), s.relu,
        wanted, s.backend,
    )
    return (*unplaceholder(grads, wanted), *([None] * 10))


_conv_bn_relu.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("pyfast::conv_bn_relu_backward", mutates_args=())
def _conv_bn_relu_backward(grad_out: Tensor, x: Tensor, weight: Tensor, y: Tensor, mean: Tensor, var: Tensor,
                           bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], training: bool, eps: float,
                           stride: List[int], padding: List[int], dilation: List[int], groups: int, relu: bool,
                           wanted: List[bool], backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias); placeholders where not wanted."""
    chosen = BACKENDS[backend]
    params = ConvParams.from_lists(stride, padding, dilation, groups)
    grad_out = like_layout(grad_out, y)
    scale, shift, invstd = scale_shift(bn_weight, bn_bias, mean, var, eps)
    sum_dz, sum_dz_xhat, _ = chosen.bn_act_backward_reduce(grad_out, y, scale, shift, mean, invstd,
                                                           None, None, None, None, None, relu)
    count = reduction_count(y)
    mean_dz, mean_dz_xhat = (sum_dz / count, sum_dz_xhat / count) if training else (None, None)
    grad_y, _ = chosen.bn_act_backward_elemt(grad_out, y, scale, shift, mean, invstd, None, None, None, None, None,
                                             relu, mean_dz, mean_dz_xhat, None)
    grad_x, grad_weight, grad_bias = chosen.conv_backward(grad_y, x, weight, params, wanted[:3])
    grads = (grad_x, grad_weight, grad_bias, param_grad(sum_dz_xhat, bn_weight), param_grad(sum_dz, bn_bias))
    return tuple(g if want else placeholder(x) for g, want in zip(grads, wanted))


@_conv_bn_relu_backward.register_fake
def _(grad_out, x, weight, y, mean, var, bn_weight, bn_bias, training, eps, stride, padding, dilation, groups,
      relu, wanted, backend):
    channels = weight.shape[0]
    grads = (torch.empty_like(x), torch.empty_like(weight), weight.new_empty(channels),
             mean.new_empty(channels, dtype=mean.dtype if bn_weight is None else bn_weight.dtype),
             mean.new_empty(channels, dtype=mean.dtype if bn_bias is None else bn_bias.dtype))
    return tuple(g if want else placeholder(x) for g, want in zip(grads, wanted))
