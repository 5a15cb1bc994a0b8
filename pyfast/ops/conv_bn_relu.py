"""conv_bn_relu: relu(batch_norm(conv2d(x))) in fewer passes over memory.

- inference (no autograd): BN folded into the convolution's weight and bias once (cached until a parameter
  or running statistic changes), then one convolution whose epilogue adds the bias and applies the ReLU;
- training (or eval with gradients): the convolution produces its output y and y's batch statistics (one
  kernel on the Triton backend), one finalize kernel turns them into the per-channel affine map and updates
  the running statistics, one pass applies scale/shift + ReLU. The backward recomputes the ReLU mask from y
  (y is saved, the post-ReLU output is not): one reduction pass (sum dz, sum dz*xhat, which are also the BN
  parameter gradients), one elementwise pass, then the convolution backward.
"""
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from . import lean, reference
from ._autograd import apply, double_backward_unsupported, eager_autograd
from ._bn import Affine, BatchNormArgs, bn_act, bn_act_backward, check_batch_norm, conv_and_affine, fold, folded_conv
from ._common import ConvOpConfig, conv_inputs, dtype_of, like_layout, memoized_conv_call, needs_grad, param_grad
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
    run = memoized_conv_call(resolve, x, (weight, bias, bn_weight, bn_bias, running_mean, running_var,
                                           num_batches_tracked), training, momentum, eps, stride, padding, dilation,
                             groups, relu, backend)
    if run is not None:
        return run(x)
    x, weight, bias, params, out_shape, chosen = _checked_conv(x, weight, bias, stride, padding, dilation, groups,
                                                               backend)
    bn = BatchNormArgs(bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, momentum, eps)
    records = needs_grad(x, weight, bias, bn_weight, bn_bias)
    if not training and not records and chosen.name != "reference":
        folded_weight, folded_bias = folded_conv(chosen, weight, bias, bn, out_shape)
        return chosen.conv_bias_act(x, folded_weight, folded_bias, params, relu)
    check_batch_norm("bn_", out_shape, x.device, bn, training)
    return _checked_call(chosen, weight, bias, bn, training, params, relu)(x)


def _checked_conv(x, weight, bias, stride, padding, dilation, groups, backend):
    """conv_inputs, then the backend for the call."""
    x, weight, bias, params, out_shape = conv_inputs(x, weight, bias, stride, padding, dilation, groups)
    return x, weight, bias, params, out_shape, select("conv_bn_relu", x, backend, weight=weight, params=params)


def resolve(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, training, momentum,
             eps, stride, padding, dilation, groups, relu, backend):
    """The call of these arguments, checked, as a function of x (memoized_call's `resolve`; the memo of
    pyfast.nn's module pairs uses it too): in inference the folded convolution, in training _checked_call's."""
    x, weight, bias, params, out_shape, chosen = _checked_conv(x, weight, bias, stride, padding, dilation, groups,
                                                               backend)
    bn = BatchNormArgs(bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, momentum, eps)
    if not training and chosen.name != "reference":
        folded_weight, folded_bias = folded_conv(chosen, weight, bias, bn, out_shape)
        return chosen.inference_conv(folded_weight, folded_bias, params, relu)
    check_batch_norm("bn_", out_shape, x.device, bn, training)
    return _checked_call(chosen, weight, bias, bn, training, params, relu)


def _checked_call(chosen, weight: Tensor, bias: Optional[Tensor], bn: BatchNormArgs, training: bool, params,
                  relu: bool) -> Callable[[Tensor], Tensor]:
    """The call of checked arguments as a function of x, where BN is not folded: the reference composite, the
    backend's C++ autograd entry, or the Python autograd.Function (which records a graph where x or a
    parameter needs a gradient, asked per call)."""
    if chosen.name == "reference":
        return lambda x: reference.conv_bn_relu(x, weight, bias, bn, training, params, relu)
    functions = eager_autograd(chosen)
    if functions is not None:
        bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, momentum, eps = bn
        stride, padding, dilation, groups = params
        return lambda x: functions.conv_bn_relu(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                                                num_batches_tracked, training, momentum, eps, stride, padding,
                                                dilation, groups, relu)

    bn_tensors = bn[:5]

    def run(x):
        records = needs_grad(x, weight, bias, bn.weight, bn.bias)
        config = ConvOpConfig(training, bn.momentum, bn.eps, params, relu, chosen.name, not records)
        return apply(_ConvBNReLU, records, x, weight, bias, *bn_tensors, config)
    return run


def fold_batch_norm(weight: Tensor, bias: Optional[Tensor], bn: BatchNormArgs, backend: Optional[str] = None
                    ) -> Tuple[Tensor, Tensor]:
    """Eval-mode BN folded into the convolution: (w*scale, (b - running_mean)*scale + beta) in the
    convolution's dtype, computed in float32 (the stored parameters are not touched)."""
    return fold(select("conv_bn_relu", weight, backend), weight, bias, bn)


class _ConvBNReLU(torch.autograd.Function):
    """Training conv_bn_relu (or eval with gradients). One autograd.Function serves eager mode and
    torch.compile (Dynamo traces it; the backend primitives it calls have fake implementations)."""

    @staticmethod
    def forward(ctx, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
                config: ConvOpConfig):
        chosen = BACKENDS[config.backend]
        bn = BatchNormArgs(bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, config.momentum,
                           config.eps)
        y, affine = conv_and_affine(chosen, x, weight, bias, config.params, bn, config.training, config.reuse)
        lean.save_for_backward(ctx, x, weight, y, *affine, activations=(0, 2))
        ctx.config = config
        ctx.param_dtypes = (dtype_of(bn_weight), dtype_of(bn_bias))
        out = chosen.bn_act_forward(y, affine.scale, affine.shift, None, None, None, config.relu)
        lean.register(out, bn_act(chosen, config.relu), y, affine.scale, affine.shift)  # all saved above
        return out

    @staticmethod
    @double_backward_unsupported("conv_bn_relu")
    def backward(ctx, grad_out):
        x, weight, y, *affine = lean.saved_tensors(ctx)
        affine, config = Affine(*affine), ctx.config
        chosen = BACKENDS[config.backend]
        needs = ctx.needs_input_grad
        grad_y, sum_dz, sum_dz_xhat = bn_act_backward(chosen, like_layout(grad_out, y), y, affine, config.relu,
                                                      config.training, needs[3] or needs[4])
        grad_x, grad_weight, grad_bias = chosen.conv_backward(grad_y, x, weight, config.params, needs[:3])
        weight_dtype, bias_dtype = ctx.param_dtypes
        return (grad_x, grad_weight, grad_bias, param_grad(sum_dz_xhat, weight_dtype, needs[3]),
                param_grad(sum_dz, bias_dtype, needs[4]), None, None, None, None)
