"""SyncBatchNorm semantics for the fused modules: batch statistics over every rank of a process group.

Each rank computes its per-channel (mean, biased var) and its element count; one all-gather shares the
three; every rank combines them with Chan's parallel formula (never E[x^2] - E[x]^2):

    n = sum n_i,   mean = sum n_i*mean_i / n,   var = sum n_i*(var_i + (mean_i - mean)^2) / n

then normalizes its own slice. This is a composite: autograd differentiates through the all-gather
(a functional collective whose backward reduce-scatters), which sums every rank's gradient contribution:
the gradients of `nn.SyncBatchNorm`. The fused single-rank kernels are not used on this path (a fused
one would all-reduce between the BN primitives' reduction and elementwise passes, docs/ARCHITECTURE.md
section 1). Unlike nn.SyncBatchNorm it also runs on CPU tensors (gloo).
"""
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..ops import BatchNormArgs
from ..ops._bn import update_running_stats


def process_group_of(bn: Optional[nn.Module]):
    """The process group a BN all-reduces its statistics over in this call, or None (local statistics):
    an nn.SyncBatchNorm, or a pyfast module with `sync_bn=True`, in training mode, under an initialized
    process group of more than one rank (nn.SyncBatchNorm's own rule)."""
    if bn is None or not bn.training:
        return None
    if not (isinstance(bn, nn.SyncBatchNorm) or getattr(bn, "sync_bn", False)):
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = bn.process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def sync_batch_norm(x: Tensor, args: BatchNormArgs, group) -> Tensor:
    """Training-mode F.batch_norm of x with statistics over the whole process group; updates the running
    statistics (and num_batches_tracked) in `args` like nn.SyncBatchNorm."""
    from torch.distributed._functional_collectives import all_gather_single  # differentiable; torch's
    # replacement for the deprecated torch.distributed.nn.functional.all_gather

    if x.dim() < 2:
        raise ValueError(f"expected an (N, C, ...) input, got shape {tuple(x.shape)}")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    channels = x.shape[1]
    count = x.numel() // channels if channels else 0
    per_channel = (1, channels) + (1,) * (x.dim() - 2)
    if count:
        var, mean = torch.var_mean(xf, dim=[0, *range(2, x.dim())], correction=0)
    else:  # an empty local batch contributes nothing
        mean = var = xf.new_zeros(channels)
    local = torch.cat([mean, var, mean.new_full((1,), float(count))])
    stats = all_gather_single(local, 0, group).view(-1, local.numel())  # (world, 2C + 1)
    means, variances, counts = stats[:, :channels], stats[:, channels:2 * channels], stats[:, 2 * channels:]
    total = int(counts.sum().item())
    if total <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got {total} over the process group")
    mean = (counts * means).sum(0) / total
    var = (counts * (variances + (means - mean) ** 2)).sum(0) / total
    update_running_stats(args, mean.detach(), var.detach(), total)

    scale = torch.rsqrt(var + args.eps)
    if args.weight is not None:
        scale = scale * args.weight.to(acc)
    shift = -mean * scale
    if args.bias is not None:
        shift = shift + args.bias.to(acc)
    return (xf * scale.view(per_channel) + shift.view(per_channel)).to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """`nn.SyncBatchNorm.convert_sync_batchnorm` that knows pyfast's modules: a BNAddReLU (itself a
    BatchNorm2d, so torch's converter would replace it with a plain SyncBatchNorm and lose its
    `forward(y, shortcut)`) is switched to `sync_bn=True` instead; every other BatchNorm becomes an
    nn.SyncBatchNorm sharing its parameters and buffers. Works on fused models (`pyfast.fuse`), which
    look their BN modules up by name at every call."""
    if hasattr(module, "sync_bn"):  # BNAddReLU, LazyBNAddReLU
        module.sync_bn, module.process_group = True, process_group
        return module
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    for name, child in list(module.named_children()):
        converted = convert_sync_batchnorm(child, process_group)
        if converted is not child:
            setattr(module, name, converted)
    return module
