"""bn_add_relu: relu(batch_norm(y) + shortcut), the shortcut an identity or its own batch_norm; and
add_relu(a, b) = relu(a + b), the BN-less case.

Forward: the statistics of y (and of the shortcut when it has a BN), then one elementwise pass.
Backward: one reduction pass that recomputes the ReLU mask (sum dz, sum dz*xhat, sum dz*rhat), then
one elementwise pass that writes both input gradients.
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import reference
from ._bn import (BatchNormArgs, acc_dtype, check_activation, check_batch_norm, check_like, reduction_count,
                  running_stats, scale_shift, update_running_stats)
from ._common import like_layout, placeholder, param_grad, unplaceholder
from .backends import BACKENDS, select


def bn_add_relu(y: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], running_mean: Optional[Tensor],
                running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor] = None, training: bool = False,
                momentum: Optional[float] = 0.1, eps: float = 1e-5, shortcut: Optional[Tensor] = None,
                shortcut_bn: Optional[BatchNormArgs] = None, relu: bool = True,
                backend: Optional[str] = None) -> Tensor:
    """relu(F.batch_norm(y, ...) + s) where s = shortcut, or F.batch_norm(shortcut, *shortcut_bn) when
    shortcut_bn (a BatchNormArgs) is given; shortcut=None is a plain BN-ReLU (no addition). Running
    statistics of both BNs update in place in training."""
    check_activation("y", y)
    if shortcut is not None:
        check_activation("shortcut", shortcut)
        y, shortcut = _same_dtype(y, shortcut)
        check_like("shortcut", shortcut, y, "y")
        if shortcut.shape != y.shape:
            raise ValueError(f"shortcut has shape {tuple(shortcut.shape)} but y has {tuple(y.shape)}")
    elif shortcut_bn is not None:
        raise ValueError("shortcut_bn needs a shortcut")
    bn = BatchNormArgs(bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, momentum, eps)
    check_batch_norm("bn_", y.shape, y.device, bn, training)
    if shortcut_bn is not None:
        check_batch_norm("shortcut_bn.", shortcut.shape, y.device, shortcut_bn, training)

    chosen = select("bn_add_relu", y, backend)
    if chosen.name == "reference":
        return reference.bn_add_relu(y, bn, shortcut, shortcut_bn, training, relu)
    sbn = shortcut_bn or BatchNormArgs()
    out, mean, var, s_mean, s_var = torch.ops.pyfast.bn_add_relu(
        y, bn_weight, bn_bias, running_mean, running_var, shortcut, sbn.weight, sbn.bias, sbn.running_mean,
        sbn.running_var, shortcut_bn is not None, training, eps, sbn.eps, relu, chosen.name,
    )
    if training:
        count = reduction_count(y)
        update_running_stats(bn, mean, var, count)
        if shortcut_bn is not None:
            update_running_stats(shortcut_bn, s_mean, s_var, count)
    return out


def add_relu(a: Tensor, b: Tensor, backend: Optional[str] = None) -> Tensor:
    """relu(a + b) in one pass; the backward writes both gradients in one pass."""
    check_activation("a", a)
    check_activation("b", b)
    a, b = _same_dtype(a, b)
    check_like("b", b, a, "a")
    if a.shape != b.shape:
        raise ValueError(f"b has shape {tuple(b.shape)} but a has {tuple(a.shape)}")
    chosen = select("add_relu", a, backend)
    if chosen.name == "reference":
        return reference.add_relu(a, b)
    return torch.ops.pyfast.add_relu(a, like_layout(b, a), chosen.name)


def _same_dtype(a: Tensor, b: Tensor):
    """Under autocast the two branches of a residual block can differ in precision; add in the wider,
    as eager `a + b` would (type promotion)."""
    if a.dtype == b.dtype or not torch.is_autocast_enabled(a.device.type):
        return a, b
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


def _stats(t: Optional[Tensor], has_bn: bool, bn: BatchNormArgs, training: bool, chosen, y: Tensor):
    """The (mean, var) a BN normalizes t with: batch statistics in training, running ones in eval,
    empty tensors for a shortcut without BN (or no shortcut)."""
    if not has_bn:
        empty = y.new_empty(0, dtype=acc_dtype(y.dtype))
        return empty, empty.clone()
    if training:
        return chosen.bn_stats(t)
    return running_stats(bn.running_mean, bn.running_var, acc_dtype(t.dtype))


def _affine(weight, bias, mean, var, eps, present: bool):
    """(scale, shift, invstd) of a BN, or Nones for an identity shortcut."""
    return scale_shift(weight, bias, mean, var, eps) if present else (None, None, None)


# -- pyfast::bn_add_relu ------------------------------------------------------------------------------

@torch.library.custom_op("pyfast::bn_add_relu", mutates_args=())
def _bn_add_relu(y: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], running_mean: Optional[Tensor],
                 running_var: Optional[Tensor], shortcut: Optional[Tensor], s_weight: Optional[Tensor],
                 s_bias: Optional[Tensor], s_running_mean: Optional[Tensor], s_running_var: Optional[Tensor],
                 shortcut_bn: bool, training: bool, eps: float, s_eps: float, relu: bool,
                 backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (out, mean, var, shortcut mean, shortcut var); the statistics are saved for backward
    (empty for an identity shortcut)."""
    chosen = BACKENDS[backend]
    bn = BatchNormArgs(bn_weight, bn_bias, running_mean, running_var)
    s_bn = BatchNormArgs(s_weight, s_bias, s_running_mean, s_running_var)
    mean, var = _stats(y, True, bn, training, chosen, y)
    s_mean, s_var = _stats(shortcut, shortcut_bn, s_bn, training, chosen, y)
    scale, shift, _ = scale_shift(bn_weight, bn_bias, mean, var, eps)
    s_scale, s_shift, _ = _affine(s_weight, s_bias, s_mean, s_var, s_eps, shortcut_bn)
    out = chosen.bn_act_forward(y, scale, shift, _in_layout(shortcut, y), s_scale, s_shift, relu)
    return out, mean, var, s_mean, s_var


@_bn_add_relu.register_fake
def _(y, bn_weight, bn_bias, running_mean, running_var, shortcut, s_weight, s_bias, s_running_mean, s_running_var,
      shortcut_bn, training, eps, s_eps, relu, backend):
    stats = y.new_empty(y.shape[1], dtype=acc_dtype(y.dtype))
    s_stats = stats.new_empty(y.shape[1] if shortcut_bn else 0)
    return torch.empty_like(y), stats, torch.empty_like(stats), s_stats, torch.empty_like(s_stats)


@dataclass(frozen=True)
class _Saved:
    shortcut_bn: bool
    training: bool
    eps: float
    s_eps: float
    relu: bool
    backend: str


def _setup_context(ctx, inputs, output):
    (y, bn_weight, bn_bias, _, _, shortcut, s_weight, s_bias, _, _, shortcut_bn, training, eps, s_eps, relu,
     backend) = inputs
    _, mean, var, s_mean, s_var = output
    ctx.save_for_backward(y, shortcut, bn_weight, bn_bias, s_weight, s_bias, mean, var, s_mean, s_var)
    ctx.saved = _Saved(shortcut_bn, training, eps, s_eps, relu, backend)


def _in_layout(shortcut: Optional[Tensor], y: Tensor) -> Optional[Tensor]:
    return None if shortcut is None else like_layout(shortcut, y)


def _backward(ctx, grad_out, *_stat_grads):
    s: _Saved = ctx.saved
    needs = ctx.needs_input_grad
    wanted = [needs[0], needs[1], needs[2], needs[5], needs[6], needs[7]]
    grads = torch.ops.pyfast.bn_add_relu_backward(grad_out, *ctx.saved_tensors, s.shortcut_bn, s.training, s.eps,
                                                  s.s_eps, s.relu, wanted, s.backend)
    grad_y, grad_w, grad_b, grad_s, grad_sw, grad_sb = unplaceholder(grads, wanted)
    return grad_y, grad_w, grad_b, None, None, grad_s, grad_sw, grad_sb, *([None] * 8)


_bn_add_relu.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("pyfast::bn_add_relu_backward", mutates_args=())
def _bn_add_relu_backward(grad_out: Tensor, y: Tensor, shortcut: Optional[Tensor], bn_weight: Optional[Tensor],
                          bn_bias: Optional[Tensor], s_weight: Optional[Tensor], s_bias: Optional[Tensor],
                          mean: Tensor, var: Tensor, s_mean: Tensor, s_var: Tensor, shortcut_bn: bool,
                          training: bool, eps: float, s_eps: float, relu: bool, wanted: List[bool],
                          backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad_y, grad_bn_weight, grad_bn_bias, grad_shortcut, grad_s_weight, grad_s_bias)."""
    chosen = BACKENDS[backend]
    grad_out, shortcut = like_layout(grad_out, y), _in_layout(shortcut, y)
    scale, shift, invstd = scale_shift(bn_weight, bn_bias, mean, var, eps)
    s_scale, s_shift, s_invstd = _affine(s_weight, s_bias, s_mean, s_var, s_eps, shortcut_bn)
    s_mean_arg = s_mean if shortcut_bn else None
    sums = chosen.bn_act_backward_reduce(grad_out, y, scale, shift, mean, invstd, shortcut, s_scale, s_shift,
                                         s_mean_arg, s_invstd, relu)
    sum_dz, sum_dz_xhat, sum_dz_rhat = sums
    count = reduction_count(y)
    means = [s / count for s in sums] if training else [None, None, None]
    if not shortcut_bn:
        means[2] = None
    grad_y, grad_shortcut = chosen.bn_act_backward_elemt(grad_out, y, scale, shift, mean, invstd, shortcut,
                                                         s_scale, s_shift, s_mean_arg, s_invstd, relu, *means)
    grads = (grad_y, param_grad(sum_dz_xhat, bn_weight), param_grad(sum_dz, bn_bias), grad_shortcut,
             param_grad(sum_dz_rhat, s_weight), param_grad(sum_dz, s_bias))
    return tuple(g if want else placeholder(y) for g, want in zip(grads, wanted))


@_bn_add_relu_backward.register_fake
def _(grad_out, y, shortcut, bn_weight, bn_bias, s_weight, s_bias, mean, var, s_mean, s_var, shortcut_bn, training,
      eps, s_eps, relu, wanted, backend):
    def vector(param):
        return mean.new_empty(y.shape[1], dtype=mean.dtype if param is None else param.dtype)

    grads = (torch.empty_like(y), vector(bn_weight), vector(bn_bias), torch.empty_like(y), vector(s_weight),
             vector(s_bias))
    return tuple(g if want else placeholder(y) for g, want in zip(grads, wanted))


# -- pyfast::add_relu ---------------------------------------------------------------------------------

@torch.library.custom_op("pyfast::add_relu", mutates_args=())
def _add_relu(a: Tensor, b: Tensor, backend: str) -> Tensor:
    return BACKENDS[backend].bn_act_forward(a, None, None, b, None, None, True)


@_add_relu.register_fake
def _(a, b, backend):
    return torch.empty_like(a)


def _add_relu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.backend = inputs[2]


def _add_relu_backward(ctx, grad_out):
    a, b = ctx.saved_tensors
    grad_a, grad_b = torch.ops.pyfast.add_relu_backward(grad_out, a, b, ctx.backend)
    return grad_a, grad_b, None


_add_relu.register_autograd(_add_relu_backward, setup_context=_add_relu_setup)


@torch.library.custom_op("pyfast::add_relu_backward", mutates_args=())
def _add_relu_backward_op(grad_out: Tensor, a: Tensor, b: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    """Both gradients are grad_out where a + b > 0: one pass that recomputes the mask."""
    return BACKENDS[backend].bn_act_backward_elemt(like_layout(grad_out, a), a, None, None, None, None, b, None,
                                                   None, None, None, True, None, None, None)


@_add_relu_backward_op.register_fake
def _(grad_out, a, b, backend):
    return torch.empty_like(a), torch.empty_like(a)
