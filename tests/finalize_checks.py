"""bn_finalize's contract (docs/ARCHITECTURE.md, section 1), checked alike for every implementation.

Each check takes `finalize`, a callable with bn_finalize's signature (torch.ops.pyfast.bn_finalize on CPU or
CUDA, kernels/batch_norm.py's launcher), and the device to run on: the CPU, CUDA and Triton test files call
them, so the three implementations meet one set of expectations. The ground truth is nn.BatchNorm2d itself
(its running-statistics update and its training output) and float64 arithmetic for scale/shift/invstd.
"""
import pytest
import torch
from torch import nn

from tolerances import assert_close

f64, f32, bf16, f16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
EPS = 1e-5


def acc(dtype):
    return f64 if dtype == f64 else f32


def _vector(c, dtype, device, lo=-1.5, hi=1.5):
    return torch.empty(c, dtype=f64).uniform_(lo, hi).to(device, dtype)


def check_outputs(finalize, device, stats_dtype, param_dtype, affine):
    """scale, shift, invstd against float64 for mean/var of `stats_dtype` (eval passes the running statistics,
    any dtype) and weight/bias of `param_dtype`; without update nothing is written."""
    c = 37
    mean, var = _vector(c, stats_dtype, device), _vector(c, stats_dtype, device, 0.1, 3.0)
    weight, bias = (_vector(c, param_dtype, device), _vector(c, param_dtype, device)) if affine else (None, None)
    running = [_vector(c, f32, device), _vector(c, f32, device, 0.5, 2.0), torch.tensor(7, device=device)]
    before = [t.clone() for t in running]
    scale, shift, invstd = finalize(mean, var, weight, bias, *running, 64, 0.1, EPS, False)
    invstd_ref = 1 / torch.sqrt(var.cpu().double() + EPS)
    scale_ref = invstd_ref * (weight.cpu().double() if affine else 1)
    shift_ref = (bias.cpu().double() if affine else 0) - mean.cpu().double() * scale_ref
    for name, actual, expected in (("invstd", invstd, invstd_ref), ("scale", scale, scale_ref),
                                   ("shift", shift, shift_ref)):
        assert actual.dtype == acc(stats_dtype) and actual.shape == (c,) and actual.is_contiguous(), name
        assert actual.device == mean.device, name
        assert_close(actual, expected, acc(stats_dtype), what=name)
    assert len({t.data_ptr() for t in (scale, shift, invstd)}) == 3, "outputs must be three separate tensors"
    for t, b in zip(running, before):
        assert torch.equal(t, b), "update=False must leave the running statistics alone"


def _batch_norm_pair(c, device, dtype, momentum, nbt):
    """An nn.BatchNorm2d in `dtype` with random parameters and running statistics, and copies of its state."""
    module = nn.BatchNorm2d(c, momentum=momentum, eps=EPS).to(device, dtype)
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.5, 0.5)
        module.running_mean.uniform_(-1, 1)
        module.running_var.uniform_(0.5, 2)
        module.num_batches_tracked.fill_(nbt)
    state = [module.running_mean.clone(), module.running_var.clone(), module.num_batches_tracked.clone()]
    return module, state


def _tolerance(dtype):
    """Allowed difference from nn.BatchNorm2d's stored statistics: a few float32 roundings, or two steps of the
    running statistics' own dtype (the same value computed in another order may round the other way, and
    Triton's interpreter truncates instead of rounding when it stores a bfloat16)."""
    step = {f64: 1e-12, f32: 2e-6, bf16: 2**-6, f16: 2**-9}[dtype]
    return dict(rtol=step, atol=step)


def check_matches_batch_norm(finalize, device, running_dtype, momentum, steps=3, channels=6):
    """Several training steps of nn.BatchNorm2d (momentum 0.1 or None, statistics in `running_dtype`): the
    running statistics and num_batches_tracked after bn_finalize(update=True) are the module's, and
    x*scale + shift is the module's training output."""
    c, shape = channels, (4, channels, 5, 3)
    module, (running_mean, running_var, tracked) = _batch_norm_pair(c, device, running_dtype, momentum, nbt=2)
    for _ in range(steps):
        x = (torch.randn(shape, dtype=f64) * 2 + 0.5).to(device, running_dtype)
        expected = module.train()(x)
        var, mean = torch.var_mean(x.to(acc(running_dtype)), dim=(0, 2, 3), unbiased=False)
        count = x.numel() // c
        scale, shift, _ = finalize(mean, var, module.weight.detach(), module.bias.detach(), running_mean,
                                   running_var, tracked, count, momentum, EPS, True)
        assert torch.equal(tracked, module.num_batches_tracked)
        torch.testing.assert_close(running_mean, module.running_mean, **_tolerance(running_dtype))
        torch.testing.assert_close(running_var, module.running_var, **_tolerance(running_dtype))
        out = x.to(acc(running_dtype)) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        assert_close(out.to(running_dtype), expected.detach(), running_dtype, what="x*scale + shift")


def check_empty_batch(finalize, device):
    """count 0 (an empty batch): like nn.BatchNorm2d, num_batches_tracked still counts it, the running
    statistics stay as they are."""
    module, (running_mean, running_var, tracked) = _batch_norm_pair(3, device, f32, None, nbt=4)
    x = torch.empty(0, 3, 4, 4, device=device)
    module.train()(x)
    nan = torch.full((3,), float("nan"), device=device)  # bn_stats' statistics of nothing
    finalize(nan, nan, module.weight.detach(), module.bias.detach(), running_mean, running_var, tracked, 0, None,
             EPS, True)
    assert torch.equal(tracked, module.num_batches_tracked)
    assert torch.equal(running_mean, module.running_mean) and torch.equal(running_var, module.running_var)


def check_one_value_per_channel(finalize, device):
    """count 1, which nn.BatchNorm2d refuses in training: the batch variance is taken as unbiased with a
    divisor of max(count - 1, 1), i.e. as it is."""
    running_mean, running_var = torch.zeros(2, device=device), torch.ones(2, device=device)
    mean, var = torch.tensor([1.0, -2.0], device=device), torch.tensor([0.0, 0.5], device=device)
    finalize(mean, var, None, None, running_mean, running_var, None, 1, 0.25, EPS, True)
    torch.testing.assert_close(running_mean, 0.25 * mean)
    torch.testing.assert_close(running_var, 0.75 + 0.25 * var)


def check_without_running_statistics(finalize, device):
    """update=True with no running statistics (track_running_stats=False): only num_batches_tracked counts;
    with neither given nothing is written at all."""
    mean, var = _vector(5, f32, device), _vector(5, f32, device, 0.5, 2.0)
    tracked = torch.tensor(0, device=device)
    finalize(mean, var, None, None, None, None, tracked, 10, None, EPS, True)
    assert tracked.item() == 1
    scale, shift, invstd = finalize(mean, var, None, None, None, None, None, 10, 0.1, EPS, True)
    assert torch.equal(scale, invstd)
    assert_close(shift, -mean.double() * invstd.double(), what="shift")


# name -> (the arguments that differ from a valid call on `device`, what the error must say)
BAD_CALLS = {
    "mean rank": (lambda d: dict(mean=torch.zeros(3, 1, device=d)), "mean must be 1-D"),
    "mean dtype": (lambda d: dict(mean=torch.zeros(3, device=d, dtype=torch.int32)), "mean must be float"),
    "var dtype": (lambda d: dict(var=torch.ones(3, device=d, dtype=f64)), "var must have"),
    "weight length": (lambda d: dict(weight=torch.ones(4, device=d)), "weight must be 1-D of length C"),
    "running_var missing": (lambda d: dict(running_var=None), "running_mean and running_var must be given together"),
    "running_mean strided": (lambda d: dict(running_mean=torch.zeros(6, device=d)[::2]),
                             "running_mean must be contiguous"),
    "cumulative without a count": (lambda d: dict(momentum=None, num_batches_tracked=None),
                                   "needs num_batches_tracked"),
    "num_batches_tracked dtype": (lambda d: dict(num_batches_tracked=torch.zeros((), device=d)),
                                  "num_batches_tracked must be"),
    "negative count": (lambda d: dict(count=-1), "count must be >= 0"),
}


def check_bad_call(finalize, device, name):
    change, message = BAD_CALLS[name]
    args = dict(mean=torch.zeros(3, device=device), var=torch.ones(3, device=device), weight=None, bias=None,
                running_mean=torch.zeros(3, device=device), running_var=torch.ones(3, device=device),
                num_batches_tracked=torch.zeros((), dtype=torch.int64, device=device), count=8, momentum=0.1,
                eps=EPS, update=True)
    args.update(change(device))
    with pytest.raises((RuntimeError, ValueError), match=message):
        finalize(*args.values())
