"""Sync BN and DDP: two CPU processes over gloo against one process on the concatenated batch.

nn.SyncBatchNorm itself refuses CPU tensors in training, so the reference is what SyncBN means: plain
BatchNorm2d over the whole batch, in float64. Each rank checks its own slice and the gradients."""
import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from nn_checks import check
from nn_models import BasicBlock
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import pyfast.nn
from pyfast.nn import BNAddReLU, BNReLUConv2d, ConvBNReLU2d

WORLD = 2


class Net(nn.Module):
    """The three fused modules, each with sync_bn, plus a BN'd shortcut."""

    def __init__(self, sync: bool):
        super().__init__()
        self.a = ConvBNReLU2d(3, 4, 3, padding=1, sync_bn=sync)
        self.b = BNReLUConv2d(4, 4, 3, padding=1, sync_bn=sync, momentum=None)
        self.c = BNAddReLU(4, sync_bn=sync)
        self.shortcut_bn = nn.SyncBatchNorm(4) if sync else nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.a(x)
        return self.c(self.b(y), y, self.shortcut_bn)


class PlainNet(nn.Module):
    """Net as plain modules, same state_dict keys."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.b = nn.Sequential(nn.BatchNorm2d(4, momentum=None), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, bias=False))
        self.c = nn.BatchNorm2d(4)
        self.shortcut_bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.a(x)
        return torch.relu(self.c(self.b(y)) + self.shortcut_bn(y))


class TinyResNet(nn.Module):
    """A stem and one BasicBlock with a downsample shortcut, torchvision's layout."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        downsample = nn.Sequential(nn.Conv2d(4, 8, 1, 2, bias=False), nn.BatchNorm2d(8))
        self.layer1 = nn.Sequential(BasicBlock(4, 8, 2, downsample))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.layer1(self.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def _compare(rank, model, plain, make_input, grads_averaged, steps=2):
    """Per step: this rank's output slice, input gradient, parameter gradients (summed or averaged over
    ranks) and running statistics against plain (float64) on the whole batch."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=1e-3 / WORLD if grads_averaged else 1e-3)
    for step in range(steps):
        full = make_input()  # the same on every rank (same seed)
        plain.zero_grad()
        local = full.chunk(WORLD)[rank].clone().requires_grad_()
        out = model(local)
        full64 = full.double().requires_grad_()
        expected = plain(full64)
        weight = torch.randn(expected.shape, dtype=torch.float64)
        check(out, expected.chunk(WORLD)[rank], what=f"rank {rank} step {step} output")
        (out * weight.chunk(WORLD)[rank].float()).sum().backward()
        (expected * weight).sum().backward()
        check(local.grad, full64.grad.chunk(WORLD)[rank], kind="backward", what=f"rank {rank} input grad")
        plain_params = dict(plain.named_parameters())
        for name, p in model.named_parameters():
            expected_grad = plain_params[name.removeprefix("module.")].grad
            what = f"rank {rank} step {step} grad of {name}"
            if grads_averaged:  # by DDP
                check(p.grad * WORLD, expected_grad, kind="backward", what=what)
                continue
            # summed here, as DDP would (without its average). A sum over ranks that nearly cancels (a BN
            # weight feeding another BN has a ~0 gradient) is compared relative to its terms.
            terms = p.grad.norm().reshape(1)
            dist.all_reduce(terms)
            dist.all_reduce(p.grad)
            error = (p.grad.double() - expected_grad).norm().item()
            assert error <= 1e-4 * max(expected_grad.norm().item(), terms.item()), f"{what}: error {error:.3e}"
        opt.step()
        opt.zero_grad()
        opt_plain.step()
        plain_state = plain.state_dict()
        for key, value in model.state_dict().items():
            key = key.removeprefix("module.")
            if value.is_floating_point():
                check(value, plain_state[key], kind="backward", what=f"rank {rank} step {step} {key}")
            else:
                assert torch.equal(value, plain_state[key]), key


def _worker(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        # 1. the modules with sync_bn=True (gradients summed over ranks by hand)
        torch.manual_seed(0)
        model = Net(sync=True)
        plain = PlainNet().double()
        plain.load_state_dict(model.state_dict())
        _compare(rank, model, plain, lambda: torch.randn(2 * WORLD, 3, 5, 5), grads_averaged=False)

        # 2. a fused model converted to sync BN (nn.SyncBatchNorm modules, which DDP refuses on CPU)
        torch.manual_seed(1)
        resnet = TinyResNet()
        plain = copy.deepcopy(resnet).double()
        fused, report = pyfast.nn.fuse(nn.SyncBatchNorm.convert_sync_batchnorm(resnet))
        assert [f.kind for f in report.fusions] == ["conv_bn_relu", "conv_bn_relu", "bn_add_relu"], str(report)
        _compare(rank, fused, plain, lambda: torch.randn(2 * WORLD, 3, 8, 8), grads_averaged=False)

        # 3. DDP over a fused model: local BN statistics, gradients averaged, as with the plain model
        torch.manual_seed(2)
        resnet = TinyResNet()
        plains = [copy.deepcopy(resnet).double() for _ in range(WORLD)]
        ddp = DistributedDataParallel(pyfast.nn.fuse(resnet)[0], broadcast_buffers=False)
        full = torch.randn(2 * WORLD, 3, 8, 8)
        weight = torch.randn(2 * WORLD, 3, dtype=torch.float64)
        out = ddp(full.chunk(WORLD)[rank])
        (out * weight.chunk(WORLD)[rank].float()).sum().backward()
        expected = [plain(x.double()) for plain, x in zip(plains, full.chunk(WORLD))]
        for e, w in zip(expected, weight.chunk(WORLD)):
            (e * w).sum().backward()
        check(out, expected[rank], what=f"rank {rank} DDP output")
        for (name, p), *refs in zip(ddp.module.named_parameters(), *(plain.parameters() for plain in plains)):
            check(p.grad * WORLD, sum(r.grad for r in refs), kind="backward", what=f"rank {rank} DDP grad of {name}")
        for key, value in ddp.module.state_dict().items():
            reference = plains[rank].state_dict()[key]
            assert torch.equal(value, reference) if not value.is_floating_point() else torch.allclose(
                value.double(), reference, rtol=1e-4, atol=1e-6), key
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_sync_bn_and_ddp_match_one_process_on_the_whole_batch():
    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD, join=True)
