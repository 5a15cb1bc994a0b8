"""Batch-norm bookkeeping shared by the three fused ops: argument checks and the per-channel affine map
(training: from batch statistics, updating the running ones; eval: from the running ones, cached), with
exactly `nn.BatchNorm2d`'s semantics."""
import math
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .._numerics import acc_dtype
from ._cache import cached


class BatchNormArgs(NamedTuple):
    """The state of one BatchNorm2d, as the fused ops take it (see `pyfast.nn.functional`)."""

    weight: Optional[Tensor] = None
    bias: Optional[Tensor] = None
    running_mean: Optional[Tensor] = None
    running_var: Optional[Tensor] = None
    num_batches_tracked: Optional[Tensor] = None
    momentum: Optional[float] = 0.1
    eps: float = 1e-5


def check_activation(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be a 4-D (N, C, H, W) tensor, got {t.dim()}-D of shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


def check_like(name: str, t: Optional[Tensor], ref: Tensor, ref_name: str, dtype: bool = True) -> None:
    """`t` (when given) must share `ref`'s device and (unless dtype=False) dtype."""
    if t is None:
        return
    if t.device != ref.device:
        raise RuntimeError(f"{name} is on {t.device} but {ref_name} is on {ref.device}: tensors must share a device")
    if dtype and t.dtype != ref.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")


_CHECKED_FIELDS = ("weight", "bias", "running_mean", "running_var")


def check_batch_norm(prefix: str, x_shape, device: torch.device, bn: BatchNormArgs, training: bool) -> None:
    """Checks one BN's arguments against the shape and device of the tensor it normalizes."""
    channels = x_shape[1]
    for field, t in zip(_CHECKED_FIELDS, bn):
        if t is None:
            continue
        if t.device != device:
            raise RuntimeError(f"{prefix}{field} is on {t.device} but the input is on {device}")
        if t.shape != (channels,) or not t.is_floating_point():
            raise ValueError(f"{prefix}{field} must be a floating-point tensor of shape ({channels},), "
                             f"got {t.dtype} {tuple(t.shape)}")
    if (bn.running_mean is None) != (bn.running_var is None):
        raise ValueError(f"{prefix}running_mean and {prefix}running_var must be given together")
    if not training:
        if bn.running_mean is None:
            raise ValueError(f"{prefix}running_mean/{prefix}running_var are required when training=False")
        return
    if bn.momentum is None and bn.running_mean is not None and bn.num_batches_tracked is None:
        raise ValueError(f"{prefix}momentum=None (cumulative average) needs {prefix}num_batches_tracked")
    if not bn.eps > 0:
        raise ValueError(f"{prefix}eps must be positive during training, but got {bn.eps} (as F.batch_norm)")
    if channels and math.prod(x_shape) == channels:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x_shape)}")


class Affine(NamedTuple):
    """One BN as the elementwise kernels apply it: bn(x) = x*scale + shift per channel, with the mean and
    invstd = 1/sqrt(var + eps) its backward needs (all in the accumulation dtype)."""

    scale: Tensor
    shift: Tensor
    mean: Tensor
    invstd: Tensor


def batch_affine(chosen, bn: BatchNormArgs, mean: Tensor, var: Tensor, count: int) -> Affine:
    """Training: the BN of batch statistics (mean, biased var) over `count` values per channel. The same
    finalize kernel updates the running statistics and num_batches_tracked in place."""
    scale, shift, invstd = chosen.bn_finalize(mean, var, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                              bn.num_batches_tracked, count, bn.momentum, bn.eps, True)
    return Affine(scale, shift, mean, invstd)


def eval_affine(chosen, bn: BatchNormArgs, acc: torch.dtype, reuse: bool) -> Affine:
    """Eval: the BN of the running statistics. With `reuse` (inference: the call records no autograd graph)
    it is computed once and reused until a parameter or running statistic changes (pyfast.ops._cache); under
    torch.compile the graph computes it instead."""
    def compute():
        mean = bn.running_mean.to(acc)  # no copy in the usual case: running statistics kept in float32
        scale, shift, invstd = chosen.bn_finalize(mean, bn.running_var.to(acc), bn.weight, bn.bias, None, None, None,
                                                  0, bn.momentum, bn.eps, False)
        return Affine(scale, shift, mean, invstd)

    if not reuse or torch.compiler.is_compiling():
        return compute()
    inputs = (bn.running_mean, bn.running_var, bn.weight, bn.bias)
    return cached(bn.running_var, "affine", inputs, (bn.eps, chosen.name, acc), compute)


def folded_conv(chosen, weight: Tensor, bias: Optional[Tensor], bn: BatchNormArgs, out_shape) -> Tuple[Tensor, Tensor]:
    """fold_batch_norm, computed once per change of the weights or statistics (pyfast.ops._cache), with the
    check of the BN's arguments against the convolution's output (of shape `out_shape`): a cached fold is of the
    same tensors at the same versions, already checked against the same weight."""
    def checked_fold():
        check_batch_norm("bn_", out_shape, weight.device, bn, False)
        return fold(chosen, weight, bias, bn)

    if torch.compiler.is_compiling():
        return checked_fold()
    inputs = (weight, bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    return cached(weight, "fold", inputs, (bn.eps, chosen.name), checked_fold)


def fold(chosen, weight: Tensor, bias: Optional[Tensor], bn: BatchNormArgs) -> Tuple[Tensor, Tensor]:
    """Eval-mode BN folded into the convolution before it (pyfast.ops.fold_batch_norm's rule)."""
    affine = eval_affine(chosen, bn, acc_dtype(weight.dtype), reuse=False)  # the fold is what is cached
    folded_bias = affine.shift if bias is None else affine.shift + bias.to(affine.scale.dtype) * affine.scale
    folded_weight = weight * affine.scale.to(weight.dtype).view(-1, 1, 1, 1)
    return folded_weight, folded_bias.to(weight.dtype)


def affine_of(chosen, t: Tensor, bn: BatchNormArgs, training: bool, reuse: bool) -> Affine:
    """The affine map of the BN of t, in t's accumulation dtype: from t's batch statistics in training (the
    running ones updated), from the running ones in eval."""
    if training:
        return batch_affine(chosen, bn, *chosen.bn_stats(t), reduction_count(t))
    return eval_affine(chosen, bn, acc_dtype(t.dtype), reuse)


def conv_and_affine(chosen, x: Tensor, weight: Tensor, bias: Optional[Tensor], params, bn: BatchNormArgs,
                    training: bool, reuse: bool) -> Tuple[Tensor, Affine]:
    """(y = conv(x), the affine map of y's BN): in training y's batch statistics come with y (one kernel where
    the backend's convolution takes them in its epilogue) and the running ones are updated; in eval they are
    the running ones (cached with `reuse`)."""
    if training:
        y, mean, var = chosen.conv_bn_stats(x, weight, bias, params)
        return y, batch_affine(chosen, bn, mean, var, reduction_count(y))
    y = chosen.conv(x, weight, bias, params)
    return y, eval_affine(chosen, bn, acc_dtype(y.dtype), reuse)


def update_running_stats(bn: BatchNormArgs, mean: Tensor, var: Tensor, count: int) -> None:
    """The running-statistics update as ATen ops, for composite paths that have no finalize kernel (sync BN
    over a process group). nn.BatchNorm2d's update after a training step: num_batches_tracked += 1, then an exponential
    (momentum) or cumulative (momentum=None: weight 1/num_batches_tracked) average with the unbiased
    batch variance. Device-side arithmetic only: no host sync, nothing that breaks a torch.compile
    graph or a CUDA graph capture."""
    with torch.no_grad():
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
        if bn.running_mean is None or count == 0:
            return
        unbiased = var * (count / max(count - 1, 1))
        for running, batch in ((bn.running_mean, mean), (bn.running_var, unbiased)):
            weight = bn.momentum
            if weight is None:
                weight = 1.0 / bn.num_batches_tracked.to(running.dtype)
            running.lerp_(batch.to(running.dtype), weight)


def backward_sums(chosen, *args) -> Tuple[Tensor, Tensor, Tensor]:
    """bn_act_backward_reduce(*args): (sum dz, sum dz*xhat, sum dz*rhat), which are also the BN parameter
    gradients. An empty batch gives zeros, as PyTorch's BN does (the kernels' sum of nothing would be scaled
    by the NaN invstd of no values)."""
    sums = chosen.bn_act_backward_reduce(*args)
    if args[1].numel() == 0:
        return tuple(torch.zeros_like(s) for s in sums)
    return sums


def bn_act_backward(chosen, grad_out: Tensor, x: Tensor, affine: Affine, relu: bool, training: bool,
                    param_grads: bool):
    """The backward of act(bn(x)) without a residual, in its two passes: (grad_x, sum dz, sum dz*xhat). The
    reduction runs when the batch statistics need it (training) or a BN parameter gradient is wanted;
    otherwise the sums are None and grad_x is scale * dz."""
    sum_dz = sum_dz_xhat = None
    if training or param_grads:
        sum_dz, sum_dz_xhat, _ = backward_sums(chosen, grad_out, x, affine.scale, affine.shift, affine.mean,
                                               affine.invstd, None, None, None, None, None, relu)
    batch = (sum_dz, sum_dz_xhat) if training else (None, None)
    grad_x, _ = chosen.bn_act_backward_elemt(grad_out, x, affine.scale, affine.shift, affine.mean, affine.invstd,
                                             None, None, None, None, None, relu, *batch, None, reduction_count(x))
    return grad_x, sum_dz, sum_dz_xhat


def bn_act(chosen, relu: bool):
    """act(x*scale + shift [+ residual*res_scale + res_shift]) as a function of its tensors: the forward pass
    of the fused ops, and what pyfast.ops.lean rebuilds their outputs with (the same kernel: bit-identical)."""
    def compute(x, scale, shift, residual=None, res_scale=None, res_shift=None):
        return chosen.bn_act_forward(x, scale, shift, residual, res_scale, res_shift, relu)
    return compute


def reduction_count(x: Tensor) -> int:
    """How many values each channel's statistics are taken over."""
    return x.numel() // x.shape[1] if x.shape[1] else 0
