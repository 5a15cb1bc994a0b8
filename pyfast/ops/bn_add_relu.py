"""bn_add_relu: relu(batch_norm(y) + shortcut), the shortcut an identity or its own batch_norm; and
add_relu(a, b) = relu(a + b), the BN-less case.

Forward: the statistics of y (and of the shortcut when it has a BN), one finalize kernel per BN (affine map
and running-statistics update), then one elementwise pass. Backward: one reduction pass that recomputes the
ReLU mask (sum dz, sum dz*xhat, sum dz*rhat: also the BN parameter gradients), then one elementwise pass that
writes both input gradients. add_relu's backward is one pass over the saved output.

conv_bn_add_relu is bn_add_relu with the convolution that produces y (a residual branch's last): in training on
a backend whose convolution takes y's batch statistics in its epilogue (Triton) there is no statistics pass over
y; elsewhere it is that convolution followed by bn_add_relu. In inference the BN is folded into the convolution
and the shortcut added in its epilogue (Triton: one kernel) or in one pass in place on its output.
"""
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from .._numerics import acc_dtype
from . import lean, reference
from ._autograd import apply, double_backward_unsupported, eager_autograd
from ._bn import (Affine, BatchNormArgs, affine_of, bn_act, backward_sums, check_activation, check_batch_norm, check_like,
                  conv_and_affine, eval_affine, folded_conv, reduction_count)
from ._common import (bn_memo_tensors, conv_inputs, conv_memo_tensors, dtype_of as _dtype, like_layout, memoized_call,
                      needs_grad, param_grad)
from ._conv import ConvParams, memory_format_of
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
        return _forward(chosen, y, affine_of(chosen, y, bn, False, True), shortcut, shortcut_bn, training=False,
                        reuse=True, relu=relu)[0]
    return _checked_call(chosen, bn, shortcut_bn, training, relu)(y, shortcut)


def _checked_inputs(y: Tensor, shortcut: Optional[Tensor], shortcut_bn: Optional[BatchNormArgs]):
    """Checks the activations (and the shortcut BN's type); returns them in one dtype (_same_dtype)."""
    check_activation("y", y)
    if shortcut is not None:
        check_activation("shortcut", shortcut)
        y, shortcut = _same_dtype(y, shortcut)
    _check_shortcut(shortcut, shortcut_bn, y, y.shape)
    return y, shortcut


def _check_shortcut(shortcut: Optional[Tensor], shortcut_bn: Optional[BatchNormArgs], like: Tensor, y_shape) -> None:
    """The shortcut (an activation, checked) against y, of shape `y_shape` and `like`'s device and dtype; and the
    shortcut BN's type."""
    if shortcut is not None:
        check_like("shortcut", shortcut, like, "y")
        if shortcut.shape != y_shape:
            raise ValueError(f"shortcut has shape {tuple(shortcut.shape)} but y has {tuple(y_shape)}")
    elif shortcut_bn is not None:
        raise ValueError("shortcut_bn needs a shortcut")
    _check_shortcut_bn_type(shortcut_bn)


def _check_shortcut_bn_type(shortcut_bn) -> None:
    if shortcut_bn is not None and not isinstance(shortcut_bn, BatchNormArgs):
        raise TypeError(f"shortcut_bn must be a pyfast.ops.BatchNormArgs, got {type(shortcut_bn).__name__}")


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
    sbn = shortcut_bn or BatchNormArgs()
    if functions is not None:
        weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps = bn
        return lambda y, shortcut: functions.bn_add_relu(y, weight, bias, running_mean, running_var,
                                                         num_batches_tracked, training, momentum, eps, shortcut, *sbn,
                                                         shortcut_bn is not None, relu)
    config = _Config.of(bn, shortcut_bn, training, relu, chosen.name)
    bn_tensors, s_tensors = bn[:5], sbn[:5]

    def run(y, shortcut):
        records = needs_grad(y, bn.weight, bn.bias, shortcut, sbn.weight, sbn.bias)
        return apply(_BNAddReLU, records, y, *bn_tensors, shortcut, *s_tensors, config)
    return run


def conv_bn_add_relu(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
                     bn_bias: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
                     num_batches_tracked: Optional[Tensor] = None, training: bool = False,
                     momentum: Optional[float] = 0.1, eps: float = 1e-5, stride=1, padding=0, dilation=1,
                     groups: int = 1, shortcut: Optional[Tensor] = None, shortcut_bn: Optional[BatchNormArgs] = None,
                     relu: bool = True, backend: Optional[str] = None) -> Tensor:
    """bn_add_relu(F.conv2d(x, weight, bias, stride, padding, dilation, groups), bn_weight, ..., shortcut,
    shortcut_bn, relu): a residual branch's last convolution and the branch's end in one call. In training on a
    backend whose convolution produces y's batch statistics in its epilogue (Triton), y is not read again for
    them; elsewhere the call is that convolution followed by bn_add_relu."""
    if shortcut_bn is None or isinstance(shortcut_bn, BatchNormArgs):
        sbn = shortcut_bn or BatchNormArgs()
        tensors = (conv_memo_tensors(weight, bias, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
                                     training) + bn_memo_tensors(*sbn[:5], training))
        arguments = (momentum, eps, stride, padding, dilation, groups, shortcut_bn is not None, sbn.momentum, sbn.eps,
                     relu)
        run = memoized_call(training, (x, shortcut), tensors, arguments, backend,
                            lambda: resolve_conv(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                                                 num_batches_tracked, training, momentum, eps, stride, padding,
                                                 dilation, groups, shortcut, shortcut_bn, relu, backend))
        if run is not None:
            return run(x, shortcut)
    _check_shortcut_bn_type(shortcut_bn)
    x, weight, bias, params, out_shape = conv_inputs(x, weight, bias, stride, padding, dilation, groups)
    chosen = select("conv_bn_add_relu", x, backend, weight=weight, params=params)
    two_precisions = (isinstance(shortcut, Tensor) and shortcut.dtype != x.dtype
                      and torch.is_autocast_enabled(x.device.type))
    if two_precisions or not (training or needs_grad(x, weight, bias, bn_weight, bn_bias, shortcut,
                                                     *(shortcut_bn or BatchNormArgs())[:2])):
        # inference (its cached affine maps; a traced graph computes them), or branches in two precisions under
        # autocast (added in the wider, as eager PyTorch does): the convolution, then bn_add_relu. A convolution
        # that gradients flow through is ATen's (the Triton kernel has no autograd of its own).
        conv = BACKENDS["reference"].conv if needs_grad(x, weight, bias) else chosen.conv
        return bn_add_relu(conv(x, weight, bias, params), bn_weight, bn_bias, running_mean, running_var,
                           num_batches_tracked, training, momentum, eps, shortcut, shortcut_bn, relu, chosen.name)
    bn = BatchNormArgs(bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, momentum, eps)
    return _conv_call(chosen, x, weight, bias, params, out_shape, bn, shortcut, shortcut_bn, training, False,
                      relu)(x, shortcut)


def resolve_conv(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, training,
                 momentum, eps, stride, padding, dilation, groups, shortcut, shortcut_bn, relu, backend):
    """conv_bn_add_relu's call of these arguments, checked, as a function of (x, shortcut) (memoized_call's
    `resolve`; pyfast.nn's memo uses it too)."""
    x, weight, bias, params, out_shape = conv_inputs(x, weight, bias, stride, padding, dilation, groups)
    chosen = select("conv_bn_add_relu", x, backend, weight=weight, params=params)
    bn = BatchNormArgs(bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, momentum, eps)
    return _conv_call(chosen, x, weight, bias, params, out_shape, bn, shortcut, shortcut_bn, training, not training,
                      relu)


def _conv_call(chosen, x: Tensor, weight: Tensor, bias: Optional[Tensor], params: ConvParams, out_shape,
               bn: BatchNormArgs, shortcut: Optional[Tensor], shortcut_bn: Optional[BatchNormArgs], training: bool,
               inference: bool, relu: bool) -> Callable[[Tensor, Optional[Tensor]], Tensor]:
    """conv_bn_add_relu's call as a function of (x, shortcut), its other arguments checked (x's and the
    convolution's already): in `inference` (eval, no autograd graph, eager) the convolution with the BN folded
    into it (cached) and the shortcut added by the backend's inference_conv_add (Triton: in the convolution's
    epilogue; else one pass in place on its output); with the backend's C++ autograd (or the reference
    composite) the convolution and bn_add_relu's call; else (the Python Functions) _ConvBNAddReLU, which takes y's
    statistics from the convolution."""
    if shortcut is not None:
        check_activation("shortcut", shortcut)
    _check_shortcut(shortcut, shortcut_bn, x, out_shape)
    check_batch_norm("bn_", out_shape, x.device, bn, training)
    if shortcut_bn is not None:
        check_batch_norm("shortcut_bn.", shortcut.shape, x.device, shortcut_bn, training)
    if inference and chosen.name != "reference":
        folded_weight, folded_bias = folded_conv(chosen, weight, bias, bn, out_shape)
        s_affine = _NO_AFFINE if shortcut_bn is None else eval_affine(chosen, shortcut_bn, acc_dtype(x.dtype),
                                                                      reuse=True)
        return chosen.inference_conv_add(folded_weight, folded_bias, params, s_affine[0], s_affine[1], relu)
    conv = chosen.conv
    if chosen.name == "reference" or eager_autograd(chosen) is not None:
        after = _checked_call(chosen, bn, shortcut_bn, training, relu)
        return lambda x, shortcut: after(conv(x, weight, bias, params), shortcut)
    sbn = shortcut_bn or BatchNormArgs()
    config = _Config.of(bn, shortcut_bn, training, relu, chosen.name)
    bn_tensors, s_tensors = bn[:5], sbn[:5]

    def run(x, shortcut):
        records = needs_grad(x, weight, bias, bn.weight, bn.bias, shortcut, sbn.weight, sbn.bias)
        return apply(_ConvBNAddReLU, records, x, weight, bias, *bn_tensors, shortcut, *s_tensors, params, config)
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

    @classmethod
    def of(cls, bn: BatchNormArgs, shortcut_bn: Optional[BatchNormArgs], training: bool, relu: bool,
           backend: str) -> "_Config":
        sbn = shortcut_bn or BatchNormArgs()
        return cls(training, bn.momentum, bn.eps, sbn.momentum, sbn.eps, shortcut_bn is not None, relu, backend)


_NO_AFFINE = (None, None, None, None)


def _forward(chosen, y: Tensor, affine: Affine, shortcut: Optional[Tensor], s_bn: Optional[BatchNormArgs],
             training: bool, reuse: bool, relu: bool):
    """The forward pass after y's BN: (out, the shortcut in y's layout, y's affine map, the shortcut's or
    _NO_AFFINE)."""
    s_affine = _NO_AFFINE
    if shortcut is not None:
        shortcut = like_layout(shortcut, y)
    if s_bn is not None:
        s_affine = affine_of(chosen, shortcut, s_bn, training, reuse)
    out = chosen.bn_act_forward(y, affine.scale, affine.shift, shortcut, s_affine[0], s_affine[1], relu)
    # (a training forward keeps y, the shortcut and both maps: a lean one rebuilds out from them)
    lean.register(out, bn_act(chosen, relu), y, affine.scale, affine.shift, shortcut, s_affine[0], s_affine[1])
    return out, shortcut, affine, s_affine


def _shortcut_bn(config: _Config, weight, bias, running_mean, running_var, num_batches_tracked):
    """The shortcut's BatchNormArgs inside a Function (None: the shortcut is added as it is)."""
    if not config.shortcut_bn:
        return None
    return BatchNormArgs(weight, bias, running_mean, running_var, num_batches_tracked, config.s_momentum,
                         config.s_eps)


def _save(ctx, config: _Config, inputs: tuple, y: Tensor, shortcut, affine: Affine, s_affine, bn_weight, bn_bias,
          s_weight, s_bias) -> None:
    """What _add_backward needs, after the Function's own `inputs` (the convolution's operands, or none)."""
    activations = ((0,) if inputs else ()) + (len(inputs), len(inputs) + 1)  # x (convolving), y, the shortcut
    lean.save_for_backward(ctx, *inputs, y, shortcut, *affine, *s_affine, activations=activations)
    ctx.config = config
    ctx.param_dtypes = (_dtype(bn_weight), _dtype(bn_bias), _dtype(s_weight), _dtype(s_bias))


class _Wanted(NamedTuple):
    """Which gradients besides y's autograd asks for (y's is always computed: it is the elementwise pass)."""

    bn_weight: bool
    bn_bias: bool
    shortcut: bool
    s_weight: bool
    s_bias: bool


class _AddGrads(NamedTuple):
    y: Tensor
    bn_weight: Optional[Tensor]
    bn_bias: Optional[Tensor]
    shortcut: Optional[Tensor]
    s_weight: Optional[Tensor]
    s_bias: Optional[Tensor]


def _add_backward(ctx, grad_out: Tensor, saved, wanted: _Wanted) -> _AddGrads:
    """The backward of relu(bn(y) + s) from what _save kept (`saved`: from y on): one reduction pass (when the
    batch statistics or a BN parameter gradient need it), one elementwise pass writing y's and the shortcut's
    gradients."""
    y, shortcut, *saved = saved
    affine, (s_scale, s_shift, s_mean, s_invstd) = Affine(*saved[:4]), saved[4:]
    config = ctx.config
    chosen = BACKENDS[config.backend]
    grad_out = like_layout(grad_out, y)
    residual = (shortcut, s_scale, s_shift, s_mean, s_invstd)
    sums = (None, None, None)
    if config.training or wanted.bn_weight or wanted.bn_bias or wanted.s_weight or wanted.s_bias:
        sums = backward_sums(chosen, grad_out, y, affine.scale, affine.shift, affine.mean, affine.invstd, *residual,
                             config.relu)
    sum_dz, sum_dz_xhat, sum_dz_rhat = sums
    batch = (sum_dz, sum_dz_xhat, sum_dz_rhat if config.shortcut_bn else None) if config.training \
        else (None, None, None)
    grad_y, grad_shortcut = chosen.bn_act_backward_elemt(grad_out, y, affine.scale, affine.shift, affine.mean,
                                                         affine.invstd, *residual, config.relu, *batch,
                                                         reduction_count(y))
    w_dtype, b_dtype, sw_dtype, sb_dtype = ctx.param_dtypes
    grad_s_bias = param_grad(sum_dz, sb_dtype, wanted.s_bias)
    if grad_s_bias is sum_dz and wanted.bn_bias:
        grad_s_bias = sum_dz.clone()  # both BN biases get sum dz: two parameters must not share one .grad
    return _AddGrads(grad_y, param_grad(sum_dz_xhat, w_dtype, wanted.bn_weight),
                     param_grad(sum_dz, b_dtype, wanted.bn_bias), grad_shortcut if wanted.shortcut else None,
                     param_grad(sum_dz_rhat, sw_dtype, wanted.s_weight), grad_s_bias)


class _BNAddReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, shortcut, s_weight,
                s_bias, s_running_mean, s_running_var, s_num_batches_tracked, config: _Config):
        chosen = BACKENDS[config.backend]
        bn = BatchNormArgs(bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, config.momentum,
                           config.eps)
        s_bn = _shortcut_bn(config, s_weight, s_bias, s_running_mean, s_running_var, s_num_batches_tracked)
        # reuse=False: a call that reaches the Function records a graph, or trains (batch statistics)
        affine = affine_of(chosen, y, bn, config.training, reuse=False)
        out, shortcut, affine, s_affine = _forward(chosen, y, affine, shortcut, s_bn, config.training, reuse=False,
                                                   relu=config.relu)
        _save(ctx, config, (), y, shortcut, affine, s_affine, bn_weight, bn_bias, s_weight, s_bias)
        return out

    @staticmethod
    @double_backward_unsupported("bn_add_relu")
    def backward(ctx, grad_out):
        needs = ctx.needs_input_grad
        grads = _add_backward(ctx, grad_out, lean.saved_tensors(ctx), _Wanted(*(needs[i] for i in (1, 2, 6, 7, 8))))
        return (grads.y, grads.bn_weight, grads.bn_bias, None, None, None, grads.shortcut, grads.s_weight,
                grads.s_bias, None, None, None, None)


class _ConvBNAddReLU(torch.autograd.Function):
    """conv_bn_add_relu where the Python Functions run (Triton; every backend under torch.compile): y and, in
    training, its batch statistics from one convolution call; the backward is bn_add_relu's, then the
    convolution's."""

    @staticmethod
    def forward(ctx, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, shortcut,
                s_weight, s_bias, s_running_mean, s_running_var, s_num_batches_tracked, params: ConvParams,
                config: _Config):
        chosen = BACKENDS[config.backend]
        bn = BatchNormArgs(bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, config.momentum,
                           config.eps)
        s_bn = _shortcut_bn(config, s_weight, s_bias, s_running_mean, s_running_var, s_num_batches_tracked)
        y, affine = conv_and_affine(chosen, x, weight, bias, params, bn, config.training, reuse=False)
        out, shortcut, affine, s_affine = _forward(chosen, y, affine, shortcut, s_bn, config.training, reuse=False,
                                                   relu=config.relu)
        _save(ctx, config, (x, weight), y, shortcut, affine, s_affine, bn_weight, bn_bias, s_weight, s_bias)
        ctx.params = params
        return out

    @staticmethod
    @double_backward_unsupported("conv_bn_add_relu")
    def backward(ctx, grad_out):
        x, weight, *saved = lean.saved_tensors(ctx)
        needs = ctx.needs_input_grad
        grads = _add_backward(ctx, grad_out, saved, _Wanted(*(needs[i] for i in (3, 4, 8, 9, 10))))
        grad_x, grad_weight, grad_bias = BACKENDS[ctx.config.backend].conv_backward(grads.y, x, weight, ctx.params,
                                                                                    needs[:3])
        return (grad_x, grad_weight, grad_bias, grads.bn_weight, grads.bn_bias, None, None, None, grads.shortcut,
                grads.s_weight, grads.s_bias, None, None, None, None, None)


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
