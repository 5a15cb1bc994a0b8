"""The fused ops over modules: the one place where `nn.Conv2d` / `nn.BatchNorm2d` state becomes op
arguments (docs/ARCHITECTURE.md, section 5).

BatchNorm semantics are exactly `nn.BatchNorm2d.forward`'s:
- batch statistics when `bn.training`, or in eval when the BN keeps no running statistics;
- running statistics passed (and, in training, updated) when `not bn.training or bn.track_running_stats`;
- `num_batches_tracked` passed (and incremented) when `bn.training and bn.track_running_stats`;
  with `momentum=None` the op takes the cumulative average from it.

A BN that synchronizes (an `nn.SyncBatchNorm`, or a module with `sync_bn=True`) in training under an
initialized process group of more than one rank takes the composite path of `pyfast.nn._sync`. So do
inputs the fused ops do not take but eager PyTorch does (a broadcast or type-promoting add, a tensor that
is not 4-D, meta tensors): the result is then exactly the plain modules' own.

torch.jit.trace / torch.jit.script are refused with a clear error: the ops' Python layer reads shapes
and values, which a TorchScript trace would freeze; torch.compile and torch.export take them.
"""
import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .. import ops
from ..ops import BatchNormArgs, lean
from ..ops import reference as _reference
from ..ops._common import bn_memo_tensors, conv_memo_tensors, memoized_call
from .._shapes import conv_output_size
from ..ops.bn_add_relu import resolve as resolve_bn_add_relu, resolve_conv as resolve_conv_bn_add_relu
from ..ops.bn_relu_conv import resolve as resolve_bn_relu_conv
from ..ops.conv_bn_relu import resolve as resolve_conv_bn_relu
from ._sync import process_group_of, sync_batch_norm

__all__ = ["add_relu", "batch_norm_args", "bn_add_relu", "bn_relu", "bn_relu_conv", "conv_args", "conv_bn_add_relu",
           "conv_bn_relu", "lean_scope", "max_pool2d", "resolve_padding"]

lean_scope = lean.scope


# -- module state -> op arguments ---------------------------------------------------------------------

_BN_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@functools.lru_cache(maxsize=None)
def _plain_state(cls: type, names: Tuple[str, ...]) -> bool:
    """Whether instances of `cls` hold the tensors `names` as nn.Module does, in `_parameters`/`_buffers`,
    with no class attribute (a property, a parametrization's) that computes them instead."""
    return not any(hasattr(cls, name) for name in names)


def _module_tensors(module: nn.Module, names: Tuple[str, ...]) -> list:
    """`getattr(module, name)` for each name (None where the module registered None). Read from the
    module's parameter and buffer dicts where they are plain (_plain_state): every fused call reads its
    modules' tensors, and each attribute that way skips a failed instance lookup and Module.__getattr__."""
    if not _plain_state(type(module), names):
        return [getattr(module, name) for name in names]
    params, buffers = module._parameters, module._buffers
    return [params[name] if name in params else buffers.get(name) for name in names]


def batch_norm_args(bn: nn.Module) -> Tuple[BatchNormArgs, bool]:
    """(the op's BatchNormArgs, training) for a BatchNorm2d, as `nn.BatchNorm2d.forward` reads its state."""
    weight, bias, running_mean, running_var, tracked = _module_tensors(bn, _BN_STATE)
    training = bn.training or (running_mean is None and running_var is None)
    use_running = not bn.training or bn.track_running_stats
    counts = bn.training and bn.track_running_stats
    args = BatchNormArgs(weight, bias, running_mean if use_running else None, running_var if use_running else None,
                         tracked if counts else None, bn.momentum, bn.eps)
    return args, training


def resolve_padding(padding, kernel_size, dilation, name: str = "padding") -> Tuple[int, int]:
    """nn.Conv2d's padding as two ints: 'valid' is 0, 'same' is dilation*(kernel-1)/2 per side. The fused
    kernels pad symmetrically, so 'same' with an even effective kernel (which nn.Conv2d pads one more on
    the right/bottom) is a ValueError."""
    if not isinstance(padding, str):
        return (padding, padding) if isinstance(padding, int) else tuple(int(p) for p in padding)
    if padding == "valid":
        return (0, 0)
    if padding != "same":
        raise ValueError(f"{name}={padding!r}: expected 'same', 'valid' or ints")
    kernel_size = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    dilation = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
    total = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
    if any(t % 2 for t in total):
        raise ValueError(
            f"{name}='same' with kernel_size={kernel_size} and dilation={dilation} needs asymmetric padding, "
            "which the fused kernels do not do: use an odd kernel size or explicit integer padding"
        )
    return (total[0] // 2, total[1] // 2)


_CONV_ARGS = ("weight", "bias", "stride", "padding", "dilation", "groups")


def conv_args(conv: nn.Module) -> dict:
    """weight, bias, stride, padding (ints), dilation and groups of a zero-padded nn.Conv2d."""
    return dict(zip(_CONV_ARGS, _conv_state(conv)))


def _conv_state(conv: nn.Module) -> tuple:
    """conv_args as a tuple in F.conv2d's order (every fused call reads its convolution's)."""
    if conv.padding_mode != "zeros":
        raise ValueError(
            f"padding_mode={conv.padding_mode!r} is not supported: the fused kernels pad with zeros "
            "(use padding_mode='zeros', or keep this convolution unfused)"
        )
    weight, bias = _module_tensors(conv, _CONV_ARGS[:2])
    return (weight, bias, conv.stride, _resolved_padding(conv.padding, conv.kernel_size, conv.dilation),
            conv.dilation, conv.groups)


def _resolved_padding(padding, kernel_size, dilation) -> Tuple[int, int]:
    """resolve_padding, memoized for the hashable settings nn.Conv2d keeps (every fused call resolves its
    convolution's)."""
    try:
        return _memoized_padding(padding, kernel_size, dilation)
    except TypeError:  # unhashable: lists
        return resolve_padding(padding, kernel_size, dilation)


_memoized_padding = functools.lru_cache(maxsize=256)(resolve_padding)


def _eager_batch_norm(x: Tensor, bn: nn.Module) -> Tensor:
    """BatchNorm2d.forward as a function of its state (all-reduced statistics for a syncing BN)."""
    group = process_group_of(bn)
    if group is not None:
        return sync_batch_norm(x, batch_norm_args(bn)[0], group)
    args, training = batch_norm_args(bn)
    return _reference.batch_norm(x, args, training)


def _on_meta(*tensors: Optional[Tensor]) -> bool:
    """Meta tensors (shape inference, `torch.device("meta")` models): eager PyTorch's composite handles
    them; the fused ops are for real data."""
    for t in tensors:  # a loop, not any(): this runs on every fused call
        if isinstance(t, Tensor) and t.is_meta:
            return True
    return False


def _check_bn_module(name: str, bn) -> None:
    if bn is not None and not isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        raise TypeError(f"{name} must be an nn.BatchNorm2d module (or None), got {type(bn).__name__}")


def _fusable_pair(a: Tensor, b: Tensor) -> bool:
    """Whether the fused add takes (a, b): 4-D floating tensors of one shape and device, one dtype (or
    two that autocast lets the op promote). Anything else goes to eager PyTorch, which broadcasts."""
    return isinstance(a, Tensor) and _fusable_with(a, a.shape, b)


def _fusable_with(a: Tensor, shape, b: Tensor) -> bool:
    """_fusable_pair's rule for b and the tensor of `shape` whose device and dtype are a's (a itself, or the
    input of the convolution that computes it)."""
    if not isinstance(b, Tensor) or _on_meta(a, b):
        return False
    return (a.dim() == 4 and b.shape == shape and a.device == b.device and a.is_floating_point()
            and b.is_floating_point() and (a.dtype == b.dtype or torch.is_autocast_enabled(a.device.type)))


def _fusable_conv_add(x: Tensor, conv_state: tuple, shortcut: Tensor) -> bool:
    """Whether conv_bn_add_relu's fused op takes (x, shortcut): the shortcut _fusable_pair's partner of conv(x)."""
    weight, _, stride, padding, dilation, _ = conv_state
    if not (isinstance(x, Tensor) and x.dim() == 4 and weight.dim() == 4) or _on_meta(weight):
        return False
    shape = (x.shape[0], weight.shape[0],
             *conv_output_size(x.shape[2], x.shape[3], weight.shape[2:], stride, padding, dilation))
    return _fusable_with(x, shape, shortcut)


# -- the fused calls ----------------------------------------------------------------------------------

def _one_fx_node(fn):
    """Under torch.fx symbolic tracing the call is recorded as one call_function node (its modules become
    get_attr nodes) instead of being traced through, however it is reached: fused models and pyfast.models'
    blocks stay traceable (pyfast.fuse, feature extraction). Eager and torch.compile calls are unaffected."""

    @functools.wraps(fn)
    def call(x, *args, **kwargs):
        if isinstance(x, fx.Proxy):
            return x.tracer.create_proxy("call_function", call, (x, *args), kwargs)
        if torch.jit.is_tracing():
            raise RuntimeError(f"pyfast.nn.functional.{fn.__name__} does not support torch.jit.trace (the trace "
                               "would freeze shape-dependent Python code): use torch.compile or torch.export, "
                               "or trace the plain model")
        return fn(x, *args, **kwargs)

    return call


@_one_fx_node
def conv_bn_relu(x: Tensor, conv: nn.Module, bn: nn.Module, relu: bool = True,
                 backend: Optional[str] = None) -> Tensor:
    """relu(bn(conv(x))) (`relu=False`: bn(conv(x))) with the modules' parameters and BN state."""
    run = _memoized(resolve_conv_bn_relu, x, conv, bn, relu, backend)
    if run is not None:
        return run(x)
    weight, bias, stride, padding, dilation, groups = c = _conv_state(conv)
    if process_group_of(bn) is not None or _on_meta(x, weight):
        y = _eager_batch_norm(F.conv2d(x, *c), bn)
        return F.relu(y) if relu else y
    args, training = batch_norm_args(bn)
    # positional: keyword matching of 16 arguments is a measurable part of a small call's host time
    return ops.conv_bn_relu(x, weight, bias, *args[:5], training, args.momentum, args.eps, stride, padding, dilation,
                            groups, relu, backend)


def _memoized(resolve_op, x: Tensor, conv: nn.Module, bn: nn.Module, relu: bool, backend: Optional[str]):
    """The call of a convolving op (conv_bn_relu or bn_relu_conv, `resolve_op` its pyfast.ops resolve) memoized
    on the modules themselves (pyfast.ops' memoized_call, keyed on their tensors and on the settings as the
    modules hold them): a repeated call reads no more state than the key. None where the general path runs (a
    module whose tensors are computed, a BN that synchronizes, no memo)."""
    if not (_plain_state(type(conv), _CONV_ARGS[:2]) and _plain_state(type(bn), _BN_STATE)):
        return None
    training = bn.training
    if training and process_group_of(bn) is not None:
        return None
    conv_params, bn_params, bn_buffers = conv._parameters, bn._parameters, bn._buffers
    tensors = conv_memo_tensors(conv_params.get("weight"), conv_params.get("bias"), bn_params.get("weight"),
                                bn_params.get("bias"), bn_buffers.get("running_mean"), bn_buffers.get("running_var"),
                                bn_buffers.get("num_batches_tracked"), training)
    settings = (resolve_op, conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode, bn.eps,
                bn.momentum, bn.track_running_stats, relu)
    return memoized_call(training, (x,), tensors, settings, backend,
                         lambda: _resolve(resolve_op, x, conv, bn, relu, backend))


def _resolve(resolve_op, x: Tensor, conv: nn.Module, bn: nn.Module, relu: bool, backend: Optional[str]):
    """The modules' state as the general path reads it, resolved by pyfast.ops (None: the general path)."""
    weight, bias, stride, padding, dilation, groups = _conv_state(conv)
    if _on_meta(x, weight):
        return None
    args, training = batch_norm_args(bn)
    if training != bn.training:  # eval without running statistics: batch statistics, the general path
        return None
    return resolve_op(x, weight, bias, *args[:5], training, args.momentum, args.eps, stride, padding, dilation,
                      groups, relu, backend)


@_one_fx_node
def bn_relu_conv(x: Tensor, bn: nn.Module, conv: nn.Module, relu: bool = True,
                 backend: Optional[str] = None) -> Tensor:
    """conv(relu(bn(x))) (`relu=False`: conv(bn(x))), the pre-activation unit."""
    run = _memoized(resolve_bn_relu_conv, x, conv, bn, relu, backend)
    if run is not None:
        return run(x)
    c = conv_args(conv)
    if process_group_of(bn) is not None or _on_meta(x, c["weight"]):
        a = _eager_batch_norm(x, bn)
        return F.conv2d(F.relu(a) if relu else a, **c)
    args, training = batch_norm_args(bn)
    return ops.bn_relu_conv(x, args.weight, args.bias, args.running_mean, args.running_var, args.num_batches_tracked,
                            training=training, momentum=args.momentum, eps=args.eps, weight=c["weight"],
                            bias=c["bias"], stride=c["stride"], padding=c["padding"], dilation=c["dilation"],
                            groups=c["groups"], relu=relu, backend=backend)


@_one_fx_node
def bn_add_relu(y: Tensor, bn: nn.Module, shortcut: Tensor, shortcut_bn: Optional[nn.Module] = None,
                relu: bool = True, backend: Optional[str] = None) -> Tensor:
    """relu(bn(y) + shortcut), or relu(bn(y) + shortcut_bn(shortcut)) for a BN'd (downsample) shortcut;
    `relu=False` stops after the add."""
    run = _memoized_add(y, bn, shortcut, shortcut_bn, relu, backend)
    if run is not None:
        return run(y, shortcut)
    args, s_args, training = _add_state(bn, shortcut_bn)
    if training is None or not _fusable_pair(y, shortcut) or _on_meta(args.weight):
        s = shortcut if shortcut_bn is None else _eager_batch_norm(shortcut, shortcut_bn)
        z = _eager_batch_norm(y, bn) + s
        return F.relu(z) if relu else z
    return ops.bn_add_relu(y, *args[:5], training, args.momentum, args.eps, shortcut, s_args, relu, backend)


def _add_state(bn: nn.Module, shortcut_bn: Optional[nn.Module]):
    """(bn's args, the shortcut BN's or None, training) for the fused add; training is None where the add is not
    fused: a BN that synchronizes, or the two BNs in different modes."""
    _check_bn_module("shortcut_bn", shortcut_bn)
    args, training = batch_norm_args(bn)
    s_args, s_training = batch_norm_args(shortcut_bn) if shortcut_bn is not None else (None, training)
    syncs = process_group_of(bn) is not None or (shortcut_bn is not None and process_group_of(shortcut_bn) is not None)
    return args, s_args, None if syncs or s_training != training else training


@_one_fx_node
def conv_bn_add_relu(x: Tensor, conv: nn.Module, bn: nn.Module, shortcut: Tensor,
                     shortcut_bn: Optional[nn.Module] = None, relu: bool = True,
                     backend: Optional[str] = None) -> Tensor:
    """bn_add_relu(conv(x), bn, shortcut, shortcut_bn, relu) as one call: a residual branch's last convolution and
    the branch's end, so that a backend whose convolution takes y's batch statistics in its epilogue (Triton) does
    so in training (pyfast.ops.conv_bn_add_relu)."""
    run = _memoized_add(x, bn, shortcut, shortcut_bn, relu, backend, conv)
    if run is not None:
        return run(x, shortcut)
    c = _conv_state(conv)
    args, s_args, training = _add_state(bn, shortcut_bn)
    if training is None or not _fusable_conv_add(x, c, shortcut) or _on_meta(args.weight):
        return bn_add_relu(F.conv2d(x, *c), bn, shortcut, shortcut_bn, relu, backend)  # with its own fallbacks
    weight, bias, stride, padding, dilation, groups = c
    return ops.conv_bn_add_relu(x, weight, bias, *args[:5], training, args.momentum, args.eps, stride, padding,
                                dilation, groups, shortcut, s_args, relu, backend)


def _memoized_add(y: Tensor, bn: nn.Module, shortcut: Tensor, shortcut_bn: Optional[nn.Module], relu: bool,
                  backend: Optional[str], conv: Optional[nn.Module] = None):
    """bn_add_relu's call (bn_relu's: no shortcut; conv_bn_add_relu's: with `conv`, y then being its input)
    memoized on the modules themselves, as _memoized does for the convolving ops; None where the general path
    runs (also: the two BNs in different modes, a shortcut_bn that is no BN module)."""
    training = bn.training
    if (shortcut is not None and not isinstance(shortcut, Tensor)) or not _plain_state(type(bn), _BN_STATE):
        return None
    if shortcut_bn is not None and not (isinstance(shortcut_bn, (nn.BatchNorm2d, nn.SyncBatchNorm))
                                        and shortcut_bn.training == training
                                        and _plain_state(type(shortcut_bn), _BN_STATE)):
        return None
    if training and (process_group_of(bn) is not None or process_group_of(shortcut_bn) is not None):
        return None
    tensors = _bn_tensors(bn, training)
    if shortcut_bn is not None:
        tensors += _bn_tensors(shortcut_bn, training)
    settings = (bn.eps, bn.momentum, bn.track_running_stats, relu) + (
        () if shortcut_bn is None else (shortcut_bn.eps, shortcut_bn.momentum, shortcut_bn.track_running_stats))
    if conv is None:
        return memoized_call(training, (y, shortcut), tensors, settings, backend,
                             lambda: _resolve_add(y, bn, shortcut, shortcut_bn, relu, backend))
    if not _plain_state(type(conv), _CONV_ARGS[:2]):
        return None
    conv_params = conv._parameters
    tensors = (conv_params.get("weight"), conv_params.get("bias")) + tensors  # the weight holds the entry
    settings += (conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode)
    return memoized_call(training, (y, shortcut), tensors, settings, backend,
                         lambda: _resolve_conv_add(y, conv, bn, shortcut, shortcut_bn, relu, backend))


def _bn_tensors(bn: nn.Module, training: bool) -> tuple:
    """A BN module's tensors as a memo's key (bn_memo_tensors' order), read from its dicts."""
    params, buffers = bn._parameters, bn._buffers
    return bn_memo_tensors(params.get("weight"), params.get("bias"), buffers.get("running_mean"),
                           buffers.get("running_var"), buffers.get("num_batches_tracked"), training)


def _resolve_add(y: Tensor, bn: nn.Module, shortcut: Tensor, shortcut_bn: Optional[nn.Module], relu: bool,
                 backend: Optional[str]):
    """The modules' state as the general path reads it, resolved by pyfast.ops (None: the general path)."""
    args, s_args, training = _memo_state(bn, shortcut_bn)
    fusable = _fusable_pair(y, shortcut) if shortcut is not None else isinstance(y, Tensor) and y.dim() == 4
    if training is None or not fusable or _on_meta(y, args.weight):
        return None
    return resolve_bn_add_relu(y, *args[:5], training, args.momentum, args.eps, shortcut, s_args, relu, backend)


def _memo_state(bn: nn.Module, shortcut_bn: Optional[nn.Module]):
    """(bn's args, the shortcut BN's or None, training) for a memoized add; training is None where the general path
    runs: an eval BN without running statistics (batch statistics), or the two BNs in different modes."""
    args, training = batch_norm_args(bn)
    s_args, s_training = batch_norm_args(shortcut_bn) if shortcut_bn is not None else (None, training)
    return args, s_args, None if training != bn.training or s_training != training else training


def _resolve_conv_add(x: Tensor, conv: nn.Module, bn: nn.Module, shortcut: Tensor, shortcut_bn: Optional[nn.Module],
                      relu: bool, backend: Optional[str]):
    """_resolve_add with the convolution: the modules' state resolved by pyfast.ops (None: the general path)."""
    c = _conv_state(conv)
    args, s_args, training = _memo_state(bn, shortcut_bn)
    if training is None or not _fusable_conv_add(x, c, shortcut) or _on_meta(args.weight):
        return None
    weight, bias, stride, padding, dilation, groups = c
    return resolve_conv_bn_add_relu(x, weight, bias, *args[:5], training, args.momentum, args.eps, stride, padding,
                                    dilation, groups, shortcut, s_args, relu, backend)


@_one_fx_node
def bn_relu(x: Tensor, bn: nn.Module, relu: bool = True, backend: Optional[str] = None) -> Tensor:
    """relu(bn(x)) as one elementwise pass after the statistics: bn_add_relu without a shortcut (for a
    pre-activation shared by two convolutions, where bn_relu_conv would normalize twice)."""
    run = _memoized_add(x, bn, None, None, relu, backend)
    if run is not None:
        return run(x, None)
    if process_group_of(bn) is not None or not (isinstance(x, Tensor) and x.dim() == 4) or _on_meta(x, bn.weight):
        z = _eager_batch_norm(x, bn)
        return F.relu(z) if relu else z
    args, training = batch_norm_args(bn)
    return ops.bn_add_relu(x, args.weight, args.bias, args.running_mean, args.running_var, args.num_batches_tracked,
                           training=training, momentum=args.momentum, eps=args.eps, relu=relu, backend=backend)


@_one_fx_node
def add_relu(a: Tensor, b: Tensor, backend: Optional[str] = None) -> Tensor:
    """relu(a + b) in one pass (eager `torch.relu(a + b)` where the inputs broadcast or are not 4-D)."""
    if not _fusable_pair(a, b):
        return torch.relu(a + b)
    return ops.add_relu(a, b, backend=backend)


@_one_fx_node
def max_pool2d(x: Tensor, pool: nn.Module) -> Tensor:
    """pool(x) for an nn.MaxPool2d; in a lean training forward (pyfast.ops.lean) a pool that keeps no indices
    and, after a fused op (a stem's conv-BN-ReLU), not its input either."""
    if not (lean.active() and type(pool) is nn.MaxPool2d and not pool.return_indices and isinstance(x, Tensor)
            and x.dim() == 4):
        return pool(x)
    return lean.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)
