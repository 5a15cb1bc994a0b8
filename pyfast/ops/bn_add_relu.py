"""bn_add_relu: relu(batch_norm(y) + shortcut), the shortcut an identity or its own batch_norm; and
add_relu(a, b) = relu(a + b), the BN-less case.

Forward: the statistics of y (and of the shortcut when it has a BN), one finalize kernel per BN (affine map
and running-statistics update), then one elementwise pass. Backward: one reduction pass that recomputes the
ReLU mask (sum dz, sum dz*xhat, sum dz*rhat: also the BN parameter gradients), then one elementwise pass that
writes both input gradients. add_relu's backward is one pass over the saved output.
"""
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from .._numerics import acc_dtype
from . import reference
from ._autograd import apply, double_backward_unsupported, eager_autograd
from ._bn import (Affine, BatchNormArgs, affine_of, backward_sums, check_activation, check_batch_norm, check_like,
                  eval_affine, reduction_count)
from ._common import bn_memo_tensors, dtype_of as _dtype, like_layout, memoized_call, needs_grad, param_grad
from ._conv import memory_format_of
from .backends import BACKENDS, select


def bn_add_relu(y: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], running_mean: Optional[Tensor],
                running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor] = None, training: bool = False,
                momentum: Optional[float] = 0.1, eps: float = 1e-5, shortcut: Optional[Tensor] = None,
                shortcut_bn: Optional[BatchNormArgs] = None, relu: bool = True,
                backend: Optional[str] = None) -> Tensor:
    """relu(F.batch_norm(y, ...) + s) where s = shortcut, or F.batch_norm(shortcut, *shortcut_bn) when
    shortcut_bn (a BatchNormArgs) is given; shortcut=None is a plain BN-ReLU (no addition). Running
    statistics of both BNs update in place in training."""
    if shortcut_bn is None or isinstance(shortcut_bn, BatchNormArgs):
        sbn = shortcut_bn or BatchNormArgs()
        tensors = (bn_memo_tensors(bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, training)
                   + bn_memo_tensors(*sbn[:5], training))
        arguments = (momentum, eps, shortcut_bn is not None, sbn.momentum, sbn.eps, relu)
        run = memoized_call(training, (y, shortcut), tensors, arguments, backend,
                            lambda: resolve(y, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
                                             training, momentum, eps, shortcut, shortcut_bn, relu, backend))
        if run is not None:
            return run(y, shortcut)
    y, shortcut = _checked_inputs(y, shortcut, shortcut_bn)
    bn = BatchNormArgs(bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, momentum, eps)
    check_batch_norm("bn_", y.shape, y.device, bn, training)
    if shortcut_bn is not None:
        check_batch_norm("shortcut_bn.", shortcut.shape, y.device, shortcut_bn, training)

    chosen = select("bn_add_relu", y, backend)
    if chosen.name != "reference" and not training and not needs_grad(y, bn_weight, bn_bias, shortcut,
                                                                       *(shortcut_bn or BatchNormArgs())[:2]):
        # inference: the cached affine maps and one pass, no autograd node
        return _forward(chosen, y, bn, shortcut, shortcut_bn, training=False, reuse=True, relu=relu)[0]
    return _checked_call(chosen, bn, shortcut_bn, training, relu)(y, shortcut)


def _checked_inputs(y: Tensor, shortcut: Optional[Tensor], shortcut_bn: Optional[BatchNormArgs]):
    """Checks the activations (and the shortcut BN's type); returns them in one dtype (_same_dtype)."""
    check_activation("y", y)
    if shortcut is not None:
        check_activation("shortcut", shortcut)
        y, shortcut = _same_dtype(y, shortcut)
        check_like("shortcut", shortcut, y, "y")
        if shortcut.shape != y.shape:
            raise ValueError(f"shortcut has shape {tuple(shortcut.shape)} but y has {tuple(y.shape)}")
    elif shortcut_bn is not None:
        raise ValueError("shortcut_bn needs a shortcut")
    if shortcut_bn is not None and not isinstance(shortcut_bn, BatchNormArgs):
        raise TypeError(f"shortcut_bn must be a pyfast.ops.BatchNormArgs, got {type(shortcut_bn).__name__}")
    return y, shortcut


def resolve(y, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, training, momentum, eps,
             shortcut, shortcut_bn, relu, backend):
    """The call of these arguments, checked, as a function of (y, shortcut) (memoized_call's `resolve`; the
    memo of pyfast.nn's BN modules uses it too): in inference one elementwise pass with the cached affine maps,
    in training _checked_call's."""
    y, shortcut = _checked_inputs(y, shortcut, shortcut_bn)  # no autocast here: nothing is cast
    bn = BatchNormArgs(bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, momentum, eps)
    check_batch_norm("bn_", y.shape, y.device, bn, training)
    if shortcut_bn is not None:
        check_batch_norm("shortcut_bn.", shortcut.shape, y.device, shortcut_bn, training)
    chosen = select("bn_add_relu", y, backend)
    if training or chosen.name == "reference":
        return _checked_call(chosen, bn, shortcut_bn, training, relu)
    affine = eval_affine(chosen, bn, acc_dtype(y.dtype), reuse=True)
    s_affine = _NO_AFFINE if shortcut_bn is None else eval_affine(chosen, shortcut_bn, acc_dtype(y.dtype), reuse=True)
    run = chosen.inference_bn_act(affine.scale, affine.shift, s_affine[0], s_affine[1], relu)
    if shortcut is None or memory_format_of(shortcut) == memory_format_of(y):
        return run
    return lambda y, shortcut: run(y, like_layout(shortcut, y))


def _checked_call(chosen, bn: BatchNormArgs, shortcut_bn: Optional[BatchNormArgs], training: bool, relu: bool
                  ) -> Callable[[Tensor, Optional[Tensor]], Tensor]:
    """The call of checked arguments as a function of (y, shortcut), where the affine maps are not cached: the
    reference composite, the backend's C++ autograd entry, or the Python autograd.Function (which records a graph
    where an input needs a gradient, asked per call)."""
    if chosen.name == "reference":
        return lambda y, shortcut: reference.bn_add_relu(y, bn, shortcut, shortcut_bn, training, relu)
    functions = eager_autograd(chosen)
    sbn, has_shortcut_bn = shortcut_bn or BatchNormArgs(), shortcut_bn is not None
    if functions is not None:
        weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps = bn
        return lambda y, shortcut: functions.bn_add_relu(y, weight, bias, running_mean, running_var,
                                                         num_batches_tracked, training, momentum, eps, shortcut, *sbn,
                                                         has_shortcut_bn, relu)
    config = _Config(training, bn.momentum, bn.eps, sbn.momentum, sbn.eps, has_shortcut_bn, relu, chosen.name)
    bn_tensors, s_tensors = bn[:5], sbn[:5]

    def run(y, shortcut):
        records = needs_grad(y, bn.weight, bn.bias, shortcut, sbn.weight, sbn.bias)
        return apply(_BNAddReLU, records, y, *bn_tensors, shortcut, *s_tensors, config)
    return run


def add_relu(a: Tensor, b: Tensor, backend: Optional[str] = None) -> Tensor:
    """relu(a + b) in one pass; the backward writes both gradients in one pass."""
    a, b = _checked_pair(a, b)
    chosen = select("add_relu", a, backend)
    if chosen.name == "reference":
        return reference.add_relu(a, b)
    functions = eager_autograd(chosen)
    if functions is not None:  # its kernel reads b in a's memory order itself (a copy only where they differ)
        return functions.add_relu(a, b)
    return apply(_AddReLU, needs_grad(a, b), a, like_layout(b, a), chosen.name)


def _checked_pair(a: Tensor, b: Tensor):
    """add_relu's checks, in one function (they run on every call, and its kernel costs ~2 us on small inputs):
    two 4-D floating tensors of one shape and device, in one dtype (_same_dtype)."""
    if not (isinstance(a, Tensor) and isinstance(b, Tensor) and a.dim() == 4 and b.dim() == 4
            and a.is_floating_point() and b.is_floating_point()):  # check_activation's rule, tested inline
        check_activation("a", a)
        check_activation("b", b)
    if a.dtype != b.dtype:
        a, b = _same_dtype(a, b)
    if a.shape != b.shape:
        raise ValueError(f"b has shape {tuple(b.shape)} but a has {tuple(a.shape)}")
    check_like("b", b, a, "a")
    return a, b


def _same_dtype(a: Tensor, b: Tensor):
    """Under autocast the two branches of a residual block can differ in precision; add in the wider,
    as eager `a + b` would (type promotion)."""
    if a.dtype == b.dtype or not torch.is_autocast_enabled(a.device.type):
        return a, b
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


class _Config(NamedTuple):
    """The non-tensor arguments of one call, kept on the autograd context by name (a NamedTuple: built on
    every call, and a frozen dataclass costs several times as much to construct)."""

    training: bool
    momentum: Optional[float]
    eps: float
    s_momentum: Optional[float]
    s_eps: float
    shortcut_bn: bool
    relu: bool
    backend: str


_NO_AFFINE = (None, None, None, None)


def _forward(chosen, y: Tensor, bn: BatchNormArgs, shortcut: Optional[Tensor], s_bn: Optional[BatchNormArgs],
             training: bool, reuse: bool, relu: bool):
    """The forward pass: (out, the shortcut in y's layout, y's affine map, the shortcut's or _NO_AFFINE)."""
    affine = affine_of(chosen, y, bn, training, reuse)
    s_affine = _NO_AFFINE
    if shortcut is not None:
        shortcut = like_layout(shortcut, y)
    if s_bn is not None:
        s_affine = affine_of(chosen, shortcut, s_bn, training, reuse)
    out = chosen.bn_act_forward(y, affine.scale, affine.shift, shortcut, s_affine[0], s_affine[1], relu)
    return out, shortcut, affine, s_affine


class _BNAddReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, shortcut, s_weight,
                s_bias, s_running_mean, s_running_var, s_num_batches_tracked, config: _Config):
        bn = BatchNormArgs(bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, config.momentum,
                           config.eps)
        s_bn = None
        if config.shortcut_bn:
            s_bn = BatchNormArgs(s_weight, s_bias, s_running_mean, s_running_var, s_num_batches_tracked,
                                 config.s_momentum, config.s_eps)
        # reuse=False: a call that reaches the Function records a graph, or trains (batch statistics)
        out, shortcut, affine, s_affine = _forward(BACKENDS[config.backend], y, bn, shortcut, s_bn, config.training,
                                                   reuse=False, relu=config.relu)
        ctx.save_for_backward(y, shortcut, *affine, *s_affine)
        ctx.config = config
        ctx.param_dtypes = (_dtype(bn_weight), _dtype(bn_bias), _dtype(s_weight), _dtype(s_bias))
        return out

    @staticmethod
    @double_backward_unsupported("bn_add_relu")
    def backward(ctx, grad_out):
        y, shortcut, *saved = ctx.saved_tensors
        affine, (s_scale, s_shift, s_mean, s_invstd) = Affine(*saved[:4]), saved[4:]
        config = ctx.config
        chosen = BACKENDS[config.backend]
        needs = ctx.needs_input_grad
        grad_out = like_layout(grad_out, y)
        residual = (shortcut, s_scale, s_shift, s_mean, s_invstd)
        sums = (None, None, None)
        if config.training or any(needs[i] for i in (1, 2, 7, 8)):
            sums = backward_sums(chosen, grad_out, y, affine.scale, affine.shift, affine.mean, affine.invstd,
                                 *residual, config.relu)
        sum_dz, sum_dz_xhat, sum_dz_rhat = sums
        batch = (sum_dz, sum_dz_xhat, sum_dz_rhat if config.shortcut_bn else None) if config.training \
            else (None, None, None)
        grad_y, grad_shortcut = chosen.bn_act_backward_elemt(grad_out, y, affine.scale, affine.shift, affine.mean,
                                                             affine.invstd, *residual, config.relu, *batch,
                                                             reduction_count(y))
        w_dtype, b_dtype, sw_dtype, sb_dtype = ctx.param_dtypes
        grad_s_bias = param_grad(sum_dz, sb_dtype, needs[8])
        if grad_s_bias is sum_dz and needs[2]:
            grad_s_bias = sum_dz.clone()  # both BN biases get sum dz: two parameters must not share one .grad
        return (grad_y, param_grad(sum_dz_xhat, w_dtype, needs[1]), param_grad(sum_dz, b_dtype, needs[2]), None,
                None, None, grad_shortcut if needs[6] else None, param_grad(sum_dz_rhat, sw_dtype, needs[7]),
                grad_s_bias, None, None, None, None)


class _AddReLU(torch.autograd.Function):
    """relu(a + b). The backward needs only the mask, which the output itself gives (out > 0 exactly
    where a + b > 0, NaN included): it saves out, not the inputs, as torch.relu does."""

    @staticmethod
    def forward(ctx, a, b, backend: str):
        out = BACKENDS[backend].bn_act_forward(a, None, None, b, None, None, True)
        ctx.save_for_backward(out)
        ctx.backend = backend
        return out

    @staticmethod
    @double_backward_unsupported("add_relu")
    def backward(ctx, grad_out):
        (out,) = ctx.saved_tensors
        grad, _ = BACKENDS[ctx.backend].bn_act_backward_elemt(like_layout(grad_out, out), out, None, None, None,
                                                              None, None, None, None, None, None, True, None, None,
                                                              None, reduction_count(out))
        return grad, grad, None
