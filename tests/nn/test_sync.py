"""Sync BN and DDP: two CPU processes over gloo against one process on the concatenated batch.

nn.SyncBatchNorm itself refuses CPU tensors in training (and DDP refuses nn.SyncBatchNorm on CPU), so the
reference is what SyncBN means: plain BatchNorm2d over the whole batch, in float64. Each rank checks its
own slice and the gradients. Every multi-process test has a hard deadline (`spawn`): a hang fails in
seconds instead of running CI into its limit."""
import copy
import gc
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from nn_checks import check
from nn_models import BasicBlock
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel
from torch.utils._python_dispatch import TorchDispatchMode

import pyfast.nn
from pyfast.nn import BNAddReLU, BNReLUConv2d, ConvBNReLU2d, SyncBatchNorm2d

WORLD = 2
DEADLINE_S = 150  # the whole 2-process run takes ~20 s on a busy 2-core machine


class Net(nn.Module):
    """The three fused modules, each with sync_bn, plus a BN'd shortcut."""

    def __init__(self, sync: bool):
        super().__init__()
        self.a = ConvBNReLU2d(3, 4, 3, padding=1, sync_bn=sync)
        self.b = BNReLUConv2d(4, 4, 3, padding=1, sync_bn=sync, momentum=None)
        self.c = BNAddReLU(4, sync_bn=sync)
        self.shortcut_bn = SyncBatchNorm2d(4) if sync else nn.BatchNorm2d(4)

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


def _recording_allreduce(local_norms, bucket):
    """DDP's own averaging all-reduce, after noting each parameter's local gradient norm."""
    for p, g in zip(bucket.parameters(), bucket.gradients()):
        local_norms[p] = g.norm().reshape(1)
    return default_hooks.allreduce_hook(None, bucket)


def _compare(rank, model, plain, make_input, steps=2):
    """Per step: this rank's output slice, input gradient, parameter gradients (averaged over ranks by
    DDP when `model` is one, else summed here) and running statistics against plain (float64) on the
    whole batch."""
    ddp = isinstance(model, DistributedDataParallel)
    local_norms = {}
    if ddp:
        model.register_comm_hook(local_norms, _recording_allreduce)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=1e-3 / WORLD if ddp else 1e-3)
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
            # A sum over ranks that nearly cancels (a BN weight feeding another BN has a ~0 gradient) is
            # compared relative to its terms, the ranks' own gradients.
            terms = local_norms[p] if ddp else p.grad.norm().reshape(1)
            dist.all_reduce(terms)
            if ddp:
                summed = p.grad * WORLD
            else:
                dist.all_reduce(p.grad)
                summed = p.grad
            error = (summed.double() - expected_grad).norm().item()
            bound = 1e-4 * max(expected_grad.norm().item(), terms.item())
            assert error <= bound, f"rank {rank} step {step} grad of {name}: error {error:.3e}"
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


def _sync_modules_under_ddp(rank):
    """The modules with sync_bn=True, wrapped in DDP on CPU (gradients averaged by DDP)."""
    torch.manual_seed(0)
    model = Net(sync=True)
    plain = PlainNet().double()
    plain.load_state_dict(model.state_dict())
    ddp = DistributedDataParallel(model, broadcast_buffers=False)
    _compare(rank, ddp, plain, lambda: torch.randn(2 * WORLD, 3, 5, 5))


def _converted_fused_model_by_hand(rank):
    """A fused model converted to sync BN, gradients summed over ranks by hand."""
    torch.manual_seed(1)
    resnet = TinyResNet()
    plain = copy.deepcopy(resnet).double()
    fused, report = pyfast.nn.fuse(resnet)
    assert [f.kind for f in report.fusions] == ["conv_bn_relu", "conv_bn_relu", "conv_bn_add_relu"], str(report)
    fused = pyfast.nn.convert_sync_batchnorm(fused)
    assert isinstance(fused.bn1, SyncBatchNorm2d) and not isinstance(fused.bn1, nn.SyncBatchNorm)
    _compare(rank, fused, plain, lambda: torch.randn(2 * WORLD, 3, 8, 8))


def _converted_fused_model_under_ddp(rank):
    torch.manual_seed(3)
    resnet = TinyResNet()
    plain = copy.deepcopy(resnet).double()
    ddp = DistributedDataParallel(pyfast.nn.convert_sync_batchnorm(pyfast.nn.fuse(resnet)[0]),
                                  broadcast_buffers=False)
    _compare(rank, ddp, plain, lambda: torch.randn(2 * WORLD, 3, 8, 8))


def _ddp_with_local_statistics(rank):
    """DDP over a fused model: local BN statistics, gradients averaged, as with the plain model."""
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


def teardown_process_group():
    """Safe teardown (what a user's DDP script needs too). Collectives issued during backward (DDP's
    bucket all-reduces, sync BN's) capture the thread-local state, which then holds a Python object: the
    `contextvars.Context` that torch.autograd.backward stashes there for the duration of the backward.
    The Work keeps it until the gloo worker thread drops the Work. If the last reference to the process
    group goes away while the GIL is held (a DDP model freed after destroy_process_group), ~ProcessGroupGloo
    joins that worker thread while the worker waits for the GIL to free the Context: a deadlock. So: free
    every DDP model (they hold the group) while the group is alive, wait until every rank's work is done,
    then destroy the group."""
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def _worker(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    # each part in its own function: its DDP model is freed when it returns, while the group is alive
    _sync_modules_under_ddp(rank)
    _converted_fused_model_by_hand(rank)
    _converted_fused_model_under_ddp(rank)
    _ddp_with_local_statistics(rank)
    teardown_process_group()


def spawn(fn, nprocs: int, deadline_s: float = DEADLINE_S):
    """mp.spawn with a hard deadline: past it every process is killed and the test fails."""
    context = mp.start_processes(fn, args=(_free_port(),), nprocs=nprocs, join=False, start_method="spawn")
    end = time.monotonic() + deadline_s
    while not context.join(timeout=max(end - time.monotonic(), 0.1)):
        if time.monotonic() >= end:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {nprocs}-process run did not end within {deadline_s} s (a hang)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hangs(rank, port):
    time.sleep(3600)


@pytest.mark.timeout(DEADLINE_S + 30)
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_sync_bn_and_ddp_match_one_process_on_the_whole_batch():
    spawn(_worker, nprocs=WORLD)


@pytest.mark.timeout(60)
def test_a_hanging_multi_process_run_fails_at_its_deadline():
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="did not end within 2"):
        spawn(_hangs, nprocs=2, deadline_s=2)
    assert time.monotonic() - start < 30


@pytest.fixture
def one_rank_group():
    """A gloo process group of this process alone (sync_batch_norm's collectives run, trivially)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


class _ScalarReads(TorchDispatchMode):
    """Counts reads of a tensor's value on the host (`.item()`, `int(t)`, `bool(t)`)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_sync_batch_norm_uses_collectives_torch_2_11_has_and_no_host_sync(one_rank_group, monkeypatch):
    """torch 2.11 has no all_gather_single (functional or not); the statistics never visit the host."""
    import torch.distributed._functional_collectives as functional_collectives

    from pyfast.nn import _sync
    from pyfast.nn.functional import batch_norm_args

    monkeypatch.delattr(functional_collectives, "all_gather_single", raising=False)
    monkeypatch.delattr(dist, "all_gather_single", raising=False)
    bn, plain = nn.BatchNorm2d(3, momentum=None), nn.BatchNorm2d(3, momentum=None).double()
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    reads = _ScalarReads()
    with reads:
        out = _sync.sync_batch_norm(x, batch_norm_args(bn)[0], one_rank_group)
    assert reads.count == 0
    expected = plain(x64)
    check(out, expected)
    weight = torch.randn(expected.shape, dtype=torch.float64)
    (out * weight.float()).sum().backward()
    (expected * weight).sum().backward()
    check(x.grad, x64.grad, kind="backward")
    for key, value in bn.state_dict().items():
        assert torch.allclose(value.to(plain.state_dict()[key].dtype), plain.state_dict()[key]), key
