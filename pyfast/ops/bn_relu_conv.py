"""bn_relu_conv: conv2d(relu(batch_norm(x))), the pre-activation unit of He et al. 2016, "Identity
Mappings in Deep Residual Networks".

Forward: x's statistics, one finalize kernel (affine map, running-statistics update), then a convolution of
the activation: on the Triton backend its operand loader applies scale/shift + ReLU (a fused prologue), so the
activation is never stored and the backward recomputes it; the other backends write the activation once and
keep it for the backward, as eager PyTorch does. Backward: the convolution backward, then one reduction and
one elementwise BN pass.
"""
from typing import Callable, Optional

import torch
from torch import Tensor

from .._numerics import acc_dtype
from . import lean, reference
from ._autograd import apply, double_backward_unsupported, eager_autograd
from ._bn import Affine, BatchNormArgs, affine_of, bn_act_backward, check_batch_norm, eval_affine
from ._common import ConvOpConfig, conv_inputs, dtype_of, like_layout, memoized_conv_call, needs_grad, param_grad
from .backends import BACKENDS, select


def bn_relu_conv(x: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], running_mean: Optional[Tensor],
                 running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor] = None,
                 training: bool = False, momentum: Optional[float] = 0.1, eps: float = 1e-5,
                 weight: Tensor = None, bias: Optional[Tensor] = None, stride=1, padding=0, dilation=1,
                 groups: int = 1, relu: bool = True, backend: Optional[str] = None) -> Tensor:
    """F.conv2d(relu(F.batch_norm(x, running_mean, running_var, bn_weight, bn_bias, training, momentum,
    eps)), weight, bias, stride, padding, dilation, groups); `relu=False` drops the ReLU. Under autocast the
    BN runs in x's dtype and only the convolution in the autocast dtype, as in eager PyTorch."""
    run = memoized_conv_call(resolve, x, (weight, bias, bn_weight, bn_bias, running_mean, running_var,
                                           num_batches_tracked), training, momentum, eps, stride, padding, dilation,
                             groups, relu, backend)
    if run is not None:
        return run(x)
    x, weight, bias, params, bn, chosen = _checked(x, bn_weight, bn_bias, running_mean, running_var,
                                                   num_batches_tracked, training, momentum, eps, weight, bias, stride,
                                                   padding, dilation, groups, backend)
    return _checked_call(chosen, bn, training, weight, bias, params, relu)(x)


def _checked(x, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, training, momentum, eps, weight,
             bias, stride, padding, dilation, groups, backend):
    """The checked arguments (x, weight, bias, ConvParams, BatchNormArgs) and the backend for the call."""
    x, weight, bias, params, _ = conv_inputs(x, weight, bias, stride, padding, dilation, groups, cast_x=False)
    bn = BatchNormArgs(bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, momentum, eps)
    check_batch_norm("bn_", x.shape, x.device, bn, training)
    return x, weight, bias, params, bn, select("bn_relu_conv", x, backend, weight=weight, params=params)


def resolve(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, training, momentum,
             eps, stride, padding, dilation, groups, relu, backend):
    """The call of these arguments, checked, as a function of x (memoized_call's `resolve`; the memo of
    pyfast.nn's module pairs uses it too): in inference the BN's cached affine map and the convolution, in
    training _checked_call's."""
    x, weight, bias, params, bn, chosen = _checked(x, bn_weight, bn_bias, running_mean, running_var,
                                                   num_batches_tracked, training, momentum, eps, weight, bias, stride,
                                                   padding, dilation, groups, backend)
    if training or chosen.name == "reference":
        return _checked_call(chosen, bn, training, weight, bias, params, relu)
    affine = eval_affine(chosen, bn, acc_dtype(x.dtype), reuse=True)
    return lambda x: chosen.bn_act_conv(x, affine.scale, affine.shift, relu, weight, bias, params)[0]


def _checked_call(chosen, bn: BatchNormArgs, training: bool, weight: Tensor, bias: Optional[Tensor], params,
                  relu: bool) -> Callable[[Tensor], Tensor]:
    """The call of checked arguments as a function of x: the reference composite, the backend's C++ autograd
    entry (training, or eval recording a graph), or the Python autograd.Function (whether the call records a
    graph, and so which of them runs in eval, asked per call)."""
    if chosen.name == "reference":
        return lambda x: reference.bn_relu_conv(x, bn, training, weight, bias, params, relu)
    functions = eager_autograd(chosen)
    bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, momentum, eps = bn
    stride, padding, dilation, groups = params

    def entry(x):
        return functions.bn_relu_conv(x, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, training,
                                      momentum, eps, weight, bias, stride, padding, dilation, groups, relu)
    if functions is not None and training:
        return entry

    def run(x):
        records = needs_grad(x, bn_weight, bn_bias, weight, bias)
        if functions is not None and records:
            return entry(x)
        config = ConvOpConfig(training, momentum, eps, params, relu, chosen.name, not records)
        return apply(_BNReLUConv, records, x, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
                     weight, bias, config)
    return run


class _BNReLUConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, weight, bias,
                config: ConvOpConfig):
        chosen = BACKENDS[config.backend]
        bn = BatchNormArgs(bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, config.momentum,
                           config.eps)
        affine = affine_of(chosen, x, bn, config.training, config.reuse)
        out, activation = chosen.bn_act_conv(x, affine.scale, affine.shift, config.relu, weight, bias, config.params)
        if lean.active():  # rebuilt in the backward, as where the prologue fused it (conv_operand: the same pass)
            activation = None
        lean.save_for_backward(ctx, x, weight, activation, *affine, activations=(0, 2))
        ctx.config = config
        ctx.param_dtypes = (dtype_of(bn_weight), dtype_of(bn_bias))
        return out

    @staticmethod
    @double_backward_unsupported("bn_relu_conv")
    def backward(ctx, grad_out):
        x, weight, activation, *affine = lean.saved_tensors(ctx)
        affine, config = Affine(*affine), ctx.config
        chosen = BACKENDS[config.backend]
        needs = ctx.needs_input_grad
        if activation is None:  # fused prologue: the activation was never stored
            activation = chosen.conv_operand(x, affine.scale, affine.shift, config.relu, weight.dtype)
        grad_a, grad_weight, grad_bias = chosen.conv_backward(like_layout(grad_out, activation), activation, weight,
                                                              config.params, [True, needs[6], needs[7]])
        grad_x, sum_dz, sum_dz_xhat = bn_act_backward(chosen, like_layout(grad_a.to(x.dtype), x), x, affine,
                                                      config.relu, config.training, needs[1] or needs[2])
        w_dtype, b_dtype = ctx.param_dtypes
        return (grad_x, param_grad(sum_dz_xhat, w_dtype, needs[1]), param_grad(sum_dz, b_dtype, needs[2]), None,
                None, None, grad_weight, grad_bias, None)
