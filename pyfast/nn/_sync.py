"""SyncBatchNorm semantics for the fused modules: batch statistics over every rank of a process group.

Each rank computes its per-channel (mean, biased var) and its element count; one all-gather shares the
three; every rank combines them with Chan's parallel formula (never E[x^2] - E[x]^2):

    n = sum n_i,   mean = sum n_i*mean_i / n,   var = sum n_i*(var_i + (mean_i - mean)^2) / n

then normalizes its own slice. This is a composite: autograd differentiates through the all-gather
(`_AllGather`, whose backward all-reduces the gathered gradient and keeps this rank's slice), which sums
every rank's gradient contribution: the gradients of `nn.SyncBatchNorm`. The fused single-rank kernels are
not used on this path (a fused one would all-reduce between the BN primitives' reduction and elementwise
passes, docs/ARCHITECTURE.md section 1). Unlike nn.SyncBatchNorm it also runs on CPU tensors (gloo), and
`SyncBatchNorm2d` is a BatchNorm2d, which DistributedDataParallel accepts on CPU.

The element count stays on the device: no host sync on this path.
"""
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..ops import BatchNormArgs
from .._numerics import acc_dtype
from ..ops._bn import update_running_stats
from ..ops.backends import BACKENDS

__all__ = ["SyncBatchNorm2d", "convert_sync_batchnorm", "process_group_of", "sync_batch_norm"]


def process_group_of(bn: Optional[nn.Module]):
    """The process group a BN all-reduces its statistics over in this call, or None (local statistics):
    an nn.SyncBatchNorm, or a module with `sync_bn=True` (SyncBatchNorm2d, BNAddReLU), in training mode,
    under an initialized process group of more than one rank (nn.SyncBatchNorm's own rule)."""
    # The cheap tests first: a missing attribute costs a plain BatchNorm2d a failed Module.__getattr__.
    if bn is None or not bn.training or not (dist.is_available() and dist.is_initialized()):
        return None
    if not (isinstance(bn, nn.SyncBatchNorm) or getattr(bn, "sync_bn", False)):
        return None
    group = bn.process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


class _AllGather(torch.autograd.Function):
    """Differentiable all-gather along dim 0 with torch.distributed's public collectives (the same on
    torch 2.11 and 2.13+, gloo and nccl): the gradient of the gathered tensor is summed over ranks and
    each rank keeps its own slice."""

    @staticmethod
    def forward(ctx, local: Tensor, group) -> Tensor:
        ctx.group = group
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        rank = dist.get_rank(ctx.group)
        return grad.chunk(dist.get_world_size(ctx.group))[rank], None


def sync_batch_norm(x: Tensor, args: BatchNormArgs, group) -> Tensor:
    """Training-mode F.batch_norm of x with statistics over the whole process group; updates the running
    statistics (and num_batches_tracked) in `args` like nn.SyncBatchNorm."""
    if x.dim() < 2:
        raise ValueError(f"expected an (N, C, ...) input, got shape {tuple(x.shape)}")
    acc = acc_dtype(x.dtype)
    xf = x.to(acc)
    channels = x.shape[1]
    count = x.numel() // channels if channels else 0
    per_channel = (1, channels) + (1,) * (x.dim() - 2)
    if count:
        var, mean = torch.var_mean(xf, dim=[0, *range(2, x.dim())], correction=0)
    else:  # an empty local batch contributes nothing
        mean = var = xf.new_zeros(channels)
    local = torch.cat([mean, var, mean.new_full((1,), float(count))]).unsqueeze(0)
    stats = _AllGather.apply(local, group)  # (world, 2C + 1)
    means, variances, counts = stats[:, :channels], stats[:, channels:2 * channels], stats[:, 2 * channels:]
    total = counts.sum()  # a device tensor: no host sync
    mean = (counts * means).sum(0) / total
    var = (counts * (variances + (means - mean) ** 2)).sum(0) / total
    # update_running_stats applies Bessel's correction count/(count-1) from a host int; the total is on
    # the device, so the corrected variance goes in with count=1 (correction factor 1).
    unbiased = var.detach() * (total / (total - 1).clamp(min=1))
    update_running_stats(args, mean.detach(), unbiased, 1)

    # BN's affine map by its one definition (the composite bn_finalize), differentiable through the gather
    scale, shift, _ = BACKENDS["reference"].bn_finalize(mean, var, args.weight, args.bias, None, None, None, 0, None,
                                                        args.eps, False)
    return (xf * scale.view(per_channel) + shift.view(per_channel)).to(x.dtype)


class SyncBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d with nn.SyncBatchNorm's training statistics over `process_group` (default: the
    whole world), on CPU (gloo) and CUDA (nccl) tensors alike. Same parameters, buffers and state_dict as
    nn.BatchNorm2d / nn.SyncBatchNorm; not an nn.SyncBatchNorm, which DistributedDataParallel refuses on
    CPU. The fused modules' `sync_bn=True` and `pyfast.nn.convert_sync_batchnorm` make these."""

    sync_bn = True

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    @classmethod
    def from_batch_norm(cls, bn: nn.BatchNorm2d, process_group=None) -> "SyncBatchNorm2d":
        """A SyncBatchNorm2d holding bn's very parameters and buffers (shared, not copied)."""
        synced = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, process_group,
                     device="meta")
        for name, tensor in [*bn.named_parameters(recurse=False), *bn.named_buffers(recurse=False)]:
            setattr(synced, name, tensor)
        synced.train(bn.training)
        return synced

    def forward(self, x: Tensor) -> Tensor:
        group = process_group_of(self)
        if group is None:
            return super().forward(x)
        self._check_input_dim(x)
        from .functional import batch_norm_args  # functional imports this module

        return sync_batch_norm(x, batch_norm_args(self)[0], group)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """`nn.SyncBatchNorm.convert_sync_batchnorm` that DistributedDataParallel accepts on CPU and that
    knows pyfast's modules: every nn.BatchNorm2d becomes a `SyncBatchNorm2d` sharing its parameters and
    buffers; a BNAddReLU (itself a BatchNorm2d with `forward(y, shortcut)`) is switched to `sync_bn=True`
    instead; BatchNorm1d/3d become torch's nn.SyncBatchNorm. Works on fused models (`pyfast.fuse`),
    which look their BN modules up by name at every call."""
    if hasattr(module, "sync_bn"):  # BNAddReLU, LazyBNAddReLU, SyncBatchNorm2d
        module.sync_bn, module.process_group = True, process_group
        return module
    if type(module) is nn.BatchNorm2d:
        return SyncBatchNorm2d.from_batch_norm(module, process_group)
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm3d)):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    for name, child in list(module.named_children()):
        converted = convert_sync_batchnorm(child, process_group)
        if converted is not child:
            setattr(module, name, converted)
    return module
