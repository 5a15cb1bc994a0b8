"""The reference backend: each fused op as the plain PyTorch sequence it replaces.

Three roles at once: the ground truth of the tests, the fallback where no faster backend can run, and
the eager baseline of the benchmarks. Autograd is PyTorch's own.
"""
from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from ._bn import BatchNormArgs
from ._conv import ConvParams


def batch_norm(x: Tensor, bn: BatchNormArgs, training: bool) -> Tensor:
    """`nn.BatchNorm2d.forward`, as a function of its state."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if training and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            factor = 1.0 / float(bn.num_batches_tracked)
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training, factor, bn.eps)


def conv_bn_relu(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn: BatchNormArgs, training: bool,
                 params: ConvParams, relu: bool) -> Tensor:
    y = F.conv2d(x, weight, bias, params.stride, params.padding, params.dilation, params.groups)
    y = batch_norm(y, bn, training)
    return F.relu(y) if relu else y


def bn_add_relu(y: Tensor, bn: BatchNormArgs, shortcut: Optional[Tensor], shortcut_bn: Optional[BatchNormArgs],
                training: bool, relu: bool) -> Tensor:
    if shortcut_bn is not None:
        shortcut = batch_norm(shortcut, shortcut_bn, training)
    z = batch_norm(y, bn, training)
    z = z if shortcut is None else z + shortcut
    return F.relu(z) if relu else z


def add_relu(a: Tensor, b: Tensor) -> Tensor:
    return F.relu(a + b)


def bn_relu_conv(x: Tensor, bn: BatchNormArgs, training: bool, weight: Tensor, bias: Optional[Tensor],
                 params: ConvParams, relu: bool) -> Tensor:
    a = batch_norm(x, bn, training)
    a = F.relu(a) if relu else a
    return F.conv2d(a, weight, bias, params.stride, params.padding, params.dilation, params.groups)
