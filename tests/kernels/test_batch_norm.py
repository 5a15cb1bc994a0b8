"""kernels/batch_norm.py against plain PyTorch in float64: under Triton's interpreter on CPU, for real on GPU.

Each launcher of docs/ARCHITECTURE.md section 1 is checked on fresh random inputs over dtypes, memory
formats, odd shapes (partial tiles), ReLU on/off and residual none / identity / BN'd: the full product
of the options, each case on one of three shapes so that every shape meets every option value. The
interpreter runs one 16x32 tile config, so these shapes cover full, partial and many-split paths.
"""
import itertools
from dataclasses import dataclass
from typing import Optional

import finalize_checks
import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_close

from pyfast.kernels import _arrival as arrival
from pyfast.kernels import _bn_common as bn_common
from pyfast.kernels import batch_norm as bn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
f64, f32, bf16, f16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
DTYPES = [f32, bf16, f16]
SHAPES = [(2, 3, 5, 7), (3, 17, 9, 11), (1, 64, 4, 4)]
FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
FORMAT_NAMES = list(FORMATS)
RESIDUALS = ["none", "identity", "bn"]


def _cases(*options):
    """The product of `options`, each case prefixed with a shape that pairs every shape with every value."""
    def name(value):
        return "x".join(map(str, value)) if isinstance(value, tuple) else str(value).replace("torch.", "")

    cases = []
    for index in itertools.product(*(range(len(values)) for values in options)):
        case = (SHAPES[sum(index) % len(SHAPES)], *(values[i] for values, i in zip(options, index)))
        cases.append(pytest.param(*case, id="-".join(map(name, case))))
    return cases


def _col(v):
    return v.view(1, -1, 1, 1)


@dataclass
class Problem:
    """Random inputs of every primitive: tensors in the input dtype, per-channel vectors in acc."""

    x: torch.Tensor
    grad_out: torch.Tensor
    residual: Optional[torch.Tensor]
    scale: Optional[torch.Tensor]
    shift: Optional[torch.Tensor]
    res_scale: Optional[torch.Tensor]
    res_shift: Optional[torch.Tensor]
    mean: torch.Tensor
    invstd: torch.Tensor
    res_mean: Optional[torch.Tensor]
    res_invstd: Optional[torch.Tensor]
    sum_dz: torch.Tensor
    sum_dz_xhat: torch.Tensor
    sum_dz_rhat: Optional[torch.Tensor]
    count: int = 12  # what bn_act_backward_elemt divides the sums by


def _problem(shape, dtype, fmt, residual="bn", affine=True):
    acc = f64 if dtype == f64 else f32
    c = shape[1]

    def tensor():
        return (torch.randn(shape, device=DEVICE, dtype=f64) * 2 + 0.5).to(dtype).contiguous(memory_format=FORMATS[fmt])

    def vector(lo, hi):
        return torch.empty(c, device=DEVICE, dtype=acc).uniform_(lo, hi)

    has_bn = residual == "bn"
    return Problem(
        x=tensor(), grad_out=tensor(), residual=None if residual == "none" else tensor(),
        scale=vector(-1.5, 1.5) if affine else None, shift=vector(-1, 1) if affine else None,
        res_scale=vector(-1.5, 1.5) if has_bn else None, res_shift=vector(-1, 1) if has_bn else None,
        mean=vector(0, 1), invstd=vector(0.5, 2), res_mean=vector(0, 1) if has_bn else None,
        res_invstd=vector(0.5, 2) if has_bn else None, sum_dz=vector(-12, 12), sum_dz_xhat=vector(-12, 12),
        sum_dz_rhat=vector(-12, 12) if has_bn else None,
    )


# ---- plain-PyTorch computations in a given dtype: float64 is the truth, the input dtype is eager's ----


def _v(v, dtype):
    return None if v is None else _col(v.to(dtype))


def _affine(t, scale, shift, dtype):
    t = t.to(dtype)
    if scale is not None:
        t = t * _v(scale, dtype)
    if shift is not None:
        t = t + _v(shift, dtype)
    return t


def _z(p, dtype):
    z = _affine(p.x, p.scale, p.shift, dtype)
    return z if p.residual is None else z + _affine(p.residual, p.res_scale, p.res_shift, dtype)


def _dz(p, relu, dtype):
    """grad_out through the ReLU as torch's threshold_backward passes it (z <= 0 blocks, NaN passes)."""
    g = p.grad_out.to(dtype)
    return torch.where(_z(p, dtype) <= 0, torch.zeros_like(g), g) if relu else g


def _input_grad(dz, v, scale, mean, invstd, sum_dz_v, sum_dz, count, train, dtype):
    grad = dz
    if train:
        mean_dz, mean_dz_v = _v(sum_dz / count, dtype), _v(sum_dz_v / count, dtype)
        grad = dz - mean_dz - (v.to(dtype) - _v(mean, dtype)) * _v(invstd, dtype) * mean_dz_v
    return grad if scale is None else grad * _v(scale, dtype)


def _reference_elemt(p, relu, train, dtype):
    dz = _dz(p, relu, dtype)
    grad_x = _input_grad(dz, p.x, p.scale, p.mean, p.invstd, p.sum_dz_xhat, p.sum_dz, p.count, train, dtype)
    grad_r = None
    if p.residual is not None:
        res_train = train and p.res_mean is not None
        grad_r = _input_grad(dz, p.residual, p.res_scale, p.res_mean, p.res_invstd, p.sum_dz_rhat, p.sum_dz, p.count,
                             res_train, dtype)
    return grad_x, grad_r


def _assert_like(out, x):
    assert out.dtype == x.dtype and out.shape == x.shape
    fmt = torch.channels_last if not x.is_contiguous() else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt), "output must keep the input's memory format"


# ---- bn_stats ----


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_stats(shape, fmt, dtype):
    x = _problem(shape, dtype, fmt).x
    mean, var = bn.bn_stats(x)
    var_ref, mean_ref = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    assert mean.dtype == var.dtype == f32
    assert_close(mean, mean_ref, f32, what="mean")
    assert_close(var, var_ref, f32, what="var")


@pytest.mark.parametrize("fmt", FORMATS)
def test_bn_stats_large_mean_is_stable(fmt):
    """Mean 1e4, std 1 in float32: E[x^2] - E[x]^2 would lose every digit; Chan's combine keeps var ~ 1.
    2x16x32x32 spreads each channel over many partials, so the combine kernel is exercised too."""
    x = (torch.randn(2, 16, 32, 32, device=DEVICE) + 1e4).contiguous(memory_format=FORMATS[fmt])
    mean, var = bn.bn_stats(x)
    var_ref, mean_ref = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    assert (var.double() - var_ref).abs().max() < 1e-3
    assert_close(mean, mean_ref, f32, what="mean")


@pytest.mark.parametrize("fmt", FORMATS)
def test_reductions_combine_in_their_launch_deterministically(fmt):
    """bn_stats and bn_act_backward_reduce merge their partials in the launch that writes them (the program
    completing each channel block, kernels/_arrival.py): 40 channels make three channel blocks and 2x40x12x12
    several partials per block; a repeated call gives the same bits, and every arrival counter is back at 0."""
    p = _problem((2, 40, 12, 12), f32, fmt)
    grad = p.grad_out
    mean, var = bn.bn_stats(p.x)
    var_ref, mean_ref = torch.var_mean(p.x.double(), dim=(0, 2, 3), unbiased=False)
    assert_close(mean, mean_ref, f32, what="mean")
    assert_close(var, var_ref, f32, what="var")
    invstd = torch.rsqrt(var + 1e-5)
    sums = bn.bn_act_backward_reduce(grad, p.x, None, None, mean, invstd, None, None, None, None, None, False)
    xhat = (p.x.double() - mean.double()[:, None, None]) * invstd.double()[:, None, None]
    assert_close(sums[0], grad.double().sum((0, 2, 3)), f32, what="sum_dz")
    assert_close(sums[1], (grad.double() * xhat).sum((0, 2, 3)), f32, what="sum_dz_xhat")
    assert all(torch.equal(a, b) for a, b in zip((mean, var), bn.bn_stats(p.x)))
    again = bn.bn_act_backward_reduce(grad, p.x, None, None, mean, invstd, None, None, None, None, None, False)
    assert all(torch.equal(a, b) for a, b in zip(sums, again))
    assert all(not counters.any() for counters in arrival._COUNTERS.values())


def test_bn_stats_float64():
    x = _problem((2, 5, 3, 7), f64, "nhwc").x
    mean, var = bn.bn_stats(x)
    var_ref, mean_ref = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    assert_close(mean, mean_ref, what="mean")
    assert_close(var, var_ref, what="var")


# ---- bn_act_forward ----


@pytest.mark.parametrize("shape,dtype,fmt,residual,relu", _cases(DTYPES, FORMAT_NAMES, RESIDUALS, ["relu", "linear"]))
def test_bn_act_forward(shape, dtype, fmt, residual, relu):
    p, relu = _problem(shape, dtype, fmt, residual), relu == "relu"
    out = bn.bn_act_forward(p.x, p.scale, p.shift, p.residual, p.res_scale, p.res_shift, relu)
    _assert_like(out, p.x)
    expected, eager = (F.relu(_z(p, d)) if relu else _z(p, d) for d in (f64, dtype))
    assert_close(out, expected, dtype, eager=eager)


@pytest.mark.parametrize("fmt,residual", [("nchw", "bn"), ("nhwc", "identity"), ("nhwc", "none")])
def test_bn_act_forward_in_place(fmt, residual):
    """bn_act_forward_ writes bn_act_forward's result into x itself; a strided x it cannot update raises."""
    p = _problem((2, 6, 5, 3), f32, fmt, residual)
    expected = bn.bn_act_forward(p.x, p.scale, p.shift, p.residual, p.res_scale, p.res_shift, True)
    x = p.x.clone()
    assert bn.bn_act_forward_(x, p.scale, p.shift, p.residual, p.res_scale, p.res_shift, True) is x
    assert torch.equal(x, expected)
    with pytest.raises(ValueError, match="in place"):
        bn.bn_act_forward_(p.x[:, :, ::2], p.scale, p.shift, None, None, None, True)


def test_bn_act_forward_without_affine_float64():
    p = _problem((2, 3, 5, 7), f64, "nchw", residual="identity", affine=False)
    out = bn.bn_act_forward(p.x, None, None, p.residual, None, None, True)
    assert_close(out, F.relu(p.x + p.residual))


def test_relu_propagates_nan():
    p = _problem((1, 4, 3, 5), f32, "nhwc", residual="none")
    p.x[0, 1, 2, 3] = float("nan")
    out = bn.bn_act_forward(p.x, p.scale, p.shift, None, None, None, True)
    assert torch.equal(out.isnan(), p.x.isnan())
    grad_x, _ = bn.bn_act_backward_elemt(p.grad_out, p.x, p.scale, p.shift, None, None, None, None, None, None,
                                         None, True, None, None, None, 0)
    assert grad_x[0, 1, 2, 3] == p.grad_out[0, 1, 2, 3] * p.scale[1]  # torch's ReLU lets the gradient pass NaN


# ---- bn_act_backward_reduce ----


@pytest.mark.parametrize("shape,dtype,fmt,residual,relu", _cases(DTYPES, FORMAT_NAMES, RESIDUALS, ["relu", "linear"]))
def test_bn_act_backward_reduce(shape, dtype, fmt, residual, relu):
    p, relu = _problem(shape, dtype, fmt, residual), relu == "relu"
    sums = bn.bn_act_backward_reduce(p.grad_out, p.x, p.scale, p.shift, p.mean, p.invstd, p.residual, p.res_scale,
                                     p.res_shift, p.res_mean, p.res_invstd, relu)
    assert len({t.untyped_storage().data_ptr() for t in sums if t.numel()}) == len([t for t in sums if t.numel()])
    dz = _dz(p, relu, f64)
    dims = (0, 2, 3)
    assert_close(sums[0], dz.sum(dims), f32, what="sum_dz")
    assert_close(sums[1], (dz * (p.x.double() - _col(p.mean)) * _col(p.invstd)).sum(dims), f32, what="sum_dz_xhat")
    if residual == "bn":
        rhat = (p.residual.double() - _col(p.res_mean)) * _col(p.res_invstd)
        assert_close(sums[2], (dz * rhat).sum(dims), f32, what="sum_dz_rhat")
    else:
        assert sums[2].numel() == 0


# ---- bn_act_backward_elemt ----


@pytest.mark.parametrize("shape,dtype,fmt,residual,relu,train",
                         _cases(DTYPES, FORMAT_NAMES, RESIDUALS, ["relu", "linear"], ["train", "eval"]))
def test_bn_act_backward_elemt(shape, dtype, fmt, residual, relu, train):
    p, relu, train = _problem(shape, dtype, fmt, residual), relu == "relu", train == "train"
    if not train:  # eval: fixed statistics, nothing reduced
        p.mean = p.invstd = p.res_mean = p.res_invstd = p.sum_dz = p.sum_dz_xhat = p.sum_dz_rhat = None
    grad_x, grad_r = bn.bn_act_backward_elemt(
        p.grad_out, p.x, p.scale, p.shift, p.mean, p.invstd, p.residual, p.res_scale, p.res_shift, p.res_mean,
        p.res_invstd, relu, p.sum_dz, p.sum_dz_xhat, p.sum_dz_rhat, p.count)
    expected, eager = (_reference_elemt(p, relu, train, d) for d in (f64, dtype))
    _assert_like(grad_x, p.x)
    assert_close(grad_x, expected[0], dtype, eager=eager[0], kind="backward", what="grad_x")
    if residual == "none":
        assert grad_r.numel() == 0
    else:
        _assert_like(grad_r, p.x)
        assert_close(grad_r, expected[1], dtype, eager=eager[1], kind="backward", what="grad_residual")


# ---- the five together, layouts, offsets ----


@pytest.mark.parametrize("fmt", FORMATS)
def test_primitives_compose_to_batch_norm_training(fmt):
    """relu(bn(y) + bn_r(r)) with batch statistics, forward and backward and the running statistics, against
    torch's autograd and F.batch_norm's update."""
    y, r, grad_out = (torch.randn(3, 6, 5, 7, device=DEVICE, dtype=f64).contiguous(memory_format=FORMATS[fmt])
                      for _ in range(3))
    w, b, w_r, b_r = (torch.randn(6, device=DEVICE, dtype=f64) for _ in range(4))
    running = [torch.rand(6, device=DEVICE, dtype=f64) for _ in range(4)]
    expected_running = [t.clone() for t in running]
    eps, momentum, count = 1e-5, 0.1, y.numel() // y.shape[1]

    def normalize(t, weight, bias, running_mean, running_var):
        mean, var = bn.bn_stats(t)
        scale, shift, invstd = bn.bn_finalize(mean, var, weight, bias, running_mean, running_var, None, count,
                                              momentum, eps, True)
        return scale, shift, mean, invstd

    scale, shift, mean, invstd = normalize(y, w, b, *running[:2])
    res_scale, res_shift, res_mean, res_invstd = normalize(r, w_r, b_r, *running[2:])
    out = bn.bn_act_forward(y, scale, shift, r, res_scale, res_shift, True)
    sums = bn.bn_act_backward_reduce(grad_out, y, scale, shift, mean, invstd, r, res_scale, res_shift, res_mean,
                                     res_invstd, True)
    grad_y, grad_r = bn.bn_act_backward_elemt(grad_out, y, scale, shift, mean, invstd, r, res_scale, res_shift,
                                              res_mean, res_invstd, True, *sums, count)

    leaves = [t.detach().requires_grad_() for t in (y, r)]
    expected = F.relu(F.batch_norm(leaves[0], *expected_running[:2], w, b, True, momentum, eps)
                      + F.batch_norm(leaves[1], *expected_running[2:], w_r, b_r, True, momentum, eps))
    expected.backward(grad_out)
    assert_close(out, expected)
    assert_close(grad_y, leaves[0].grad, what="grad_y")
    assert_close(grad_r, leaves[1].grad, what="grad_residual")
    for actual, reference in zip(running, expected_running):
        assert_close(actual, reference, what="running statistics")


def test_mixed_and_strided_layouts():
    """grad_out in another layout than x, and an x that is neither layout (a slice), still give torch's result."""
    p = _problem((2, 5, 6, 7), f32, "nhwc")
    p.grad_out = p.grad_out.contiguous()
    args = (p.scale, p.shift, p.mean, p.invstd, p.residual, p.res_scale, p.res_shift, p.res_mean, p.res_invstd, True)
    grad_x, _ = bn.bn_act_backward_elemt(p.grad_out, p.x, *args, p.sum_dz, p.sum_dz_xhat, p.sum_dz_rhat, p.count)
    _assert_like(grad_x, p.x)
    assert_close(grad_x, _reference_elemt(p, True, True, f64)[0])
    wide = torch.randn(2, 5, 6, 9, device=DEVICE)
    out = bn.bn_act_forward(wide[..., 1:8], p.scale, None, None, None, None, False)
    assert_close(out, wide[..., 1:8].double() * _col(p.scale))


@pytest.mark.parametrize("fmt", FORMATS)
def test_int64_offsets_give_the_same_result(monkeypatch, fmt):
    """The >= 2**31-element path (int64 index math), forced on a small tensor: bitwise the same results."""
    p = _problem((2, 9, 5, 3), f32, fmt)
    fwd = (p.x, p.scale, p.shift, p.residual, p.res_scale, p.res_shift, True)
    bwd = (p.grad_out, p.x, p.scale, p.shift, p.mean, p.invstd, p.residual, p.res_scale, p.res_shift, p.res_mean,
           p.res_invstd, True)
    calls = [lambda: [bn.bn_act_forward(*fwd)], lambda: bn.bn_stats(p.x), lambda: bn.bn_act_backward_reduce(*bwd),
             lambda: bn.bn_act_backward_elemt(*bwd, p.sum_dz, p.sum_dz_xhat, p.sum_dz_rhat, p.count)]
    int32 = [call() for call in calls]
    monkeypatch.setattr(bn_common, "_MAX_INT32", 0)  # _prepare_input reads it there
    for expected, call in zip(int32, calls):
        for a, b in zip(call(), expected):
            assert torch.equal(a, b)


def test_empty_batch():
    x = torch.randn(0, 3, 4, 4, device=DEVICE)
    assert bn.bn_stats(x)[0].isnan().all()  # like torch.var_mean over nothing
    assert bn.bn_act_forward(x, None, None, None, None, None, True).shape == x.shape
    zero = torch.zeros(3, device=DEVICE)
    sums = bn.bn_act_backward_reduce(x, x, None, None, zero, zero + 1, None, None, None, None, None, True)
    assert all(s.eq(0).all() for s in sums)


# ---- bn_finalize (the checks are shared with the C++ and CUDA implementations: tests/finalize_checks.py) ----


@pytest.mark.parametrize("stats_dtype", [f32, bf16, f16])
@pytest.mark.parametrize("param_dtype,affine", [(f32, True), (bf16, True), (f32, False)])
def test_bn_finalize_outputs(stats_dtype, param_dtype, affine):
    finalize_checks.check_outputs(bn.bn_finalize, DEVICE, stats_dtype, param_dtype, affine)


@pytest.mark.parametrize("running_dtype", [f32, bf16])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_bn_finalize_updates_like_batch_norm(running_dtype, momentum):
    finalize_checks.check_matches_batch_norm(bn.bn_finalize, DEVICE, running_dtype, momentum)


def test_bn_finalize_count_edge_cases():
    finalize_checks.check_empty_batch(bn.bn_finalize, DEVICE)
    finalize_checks.check_one_value_per_channel(bn.bn_finalize, DEVICE)
    finalize_checks.check_without_running_statistics(bn.bn_finalize, DEVICE)


def test_bn_finalize_walks_channels_in_several_steps(monkeypatch):
    """More channels than one step of the single program: every step uses the one increment's weight."""
    monkeypatch.setattr(bn, "_FINALIZE_BLOCK_C", 16)
    finalize_checks.check_matches_batch_norm(bn.bn_finalize, DEVICE, f32, None, steps=2, channels=40)


@pytest.mark.parametrize("name", finalize_checks.BAD_CALLS)
def test_bn_finalize_bad_arguments(name):
    finalize_checks.check_bad_call(bn.bn_finalize, DEVICE, name)


# ---- bad input ----


def _forward_args(**change):
    x = torch.randn(2, 3, 4, 5, device=DEVICE)
    v = torch.ones(3, device=DEVICE)
    args = dict(x=x, scale=v, shift=v, residual=torch.randn_like(x), res_scale=v, res_shift=v, relu=True)
    return {**args, **change}


@pytest.mark.parametrize("change,message", [
    (dict(x=torch.randn(2, 3, 4)), "x must be 4-D"),
    (dict(x=torch.ones(2, 3, 4, 5, dtype=torch.int32)), "x must be float16"),
    (dict(x=[1.0]), "x must be a Tensor"),
    (dict(scale=torch.ones(4)), "scale must be 1-D of length C=3"),
    (dict(shift=torch.ones(3, 1)), "shift must be 1-D of length C=3"),
    (dict(res_shift=torch.ones(3, dtype=f64)), "res_shift must be torch.float32"),
    (dict(res_scale=torch.ones(3, device="meta")), "res_scale must be on x's device"),
    (dict(residual=torch.randn(2, 3, 5, 4)), "residual must have x's shape"),
    (dict(residual=torch.randn(2, 3, 4, 5, dtype=f64)), "residual must have x's dtype"),
    (dict(residual=torch.randn(2, 3, 4, 5, device="meta")), "residual must be on x's device"),
    (dict(residual=None), "res_scale/res_shift given without residual"),
])
def test_bad_input_names_the_argument(change, message):
    args = _forward_args(**change)
    for name in ("x", "residual", "scale", "shift", "res_scale", "res_shift"):  # the test's own tensors to DEVICE
        if isinstance(args[name], torch.Tensor) and args[name].device.type == "cpu":
            args[name] = args[name].to(DEVICE)
    with pytest.raises(ValueError, match=message):
        bn.bn_act_forward(**args)


def test_bad_backward_input_names_the_argument():
    p = _problem((2, 3, 4, 5), f32, "nchw", residual="identity")
    with pytest.raises(ValueError, match="sum_dz needs mean"):
        bn.bn_act_backward_elemt(p.grad_out, p.x, p.scale, p.shift, None, None, p.residual, None, None, None, None,
                                 True, p.sum_dz, p.sum_dz_xhat, None, p.count)
    with pytest.raises(ValueError, match="count must be positive"):
        bn.bn_act_backward_elemt(p.grad_out, p.x, p.scale, p.shift, p.mean, p.invstd, p.residual, None, None, None,
                                 None, True, p.sum_dz, p.sum_dz_xhat, None, 0)
    with pytest.raises(ValueError, match="res_mean needs residual and res_invstd"):
        bn.bn_act_backward_reduce(p.grad_out, p.x, p.scale, p.shift, p.mean, p.invstd, p.residual, None, None,
                                  p.mean, None, True)
    with pytest.raises(ValueError, match="grad_out must have x's shape"):
        bn.bn_act_backward_reduce(p.grad_out[:1], p.x, None, None, p.mean, p.invstd, None, None, None, None, None,
                                  False)


# ---- GPU: real sizes ----


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,fmt", [(bf16, "nhwc"), (f32, "nchw"), (f16, "nhwc")])
def test_real_size(dtype, fmt):
    """A ResNet stage-2 activation: all four primitives against float64, and the reduction is deterministic."""
    p = _problem((128, 256, 28, 28), dtype, fmt)
    mean, var = bn.bn_stats(p.x)
    var_ref, mean_ref = torch.var_mean(p.x.double(), dim=(0, 2, 3), unbiased=False)
    assert_close(mean, mean_ref, f32, what="mean")
    assert_close(var, var_ref, f32, what="var")
    out = bn.bn_act_forward(p.x, p.scale, p.shift, p.residual, p.res_scale, p.res_shift, True)
    assert_close(out, F.relu(_z(p, f64)), dtype, eager=F.relu(_z(p, dtype)))
    bwd = (p.grad_out, p.x, p.scale, p.shift, p.mean, p.invstd, p.residual, p.res_scale, p.res_shift, p.res_mean,
           p.res_invstd, True)
    sums = bn.bn_act_backward_reduce(*bwd)
    assert all(torch.equal(a, b) for a, b in zip(sums, bn.bn_act_backward_reduce(*bwd)))
    assert_close(sums[0], _dz(p, True, f64).sum((0, 2, 3)), f32, what="sum_dz")
    grad_x, grad_r = bn.bn_act_backward_elemt(*bwd, p.sum_dz, p.sum_dz_xhat, p.sum_dz_rhat, p.count)
    expected, eager = (_reference_elemt(p, True, True, d) for d in (f64, dtype))
    assert_close(grad_x, expected[0], dtype, eager=eager[0], kind="backward", what="grad_x")
    assert_close(grad_r, expected[1], dtype, eager=eager[1], kind="backward", what="grad_residual")


@pytest.mark.gpu
def test_forward_beyond_2_to_the_31_elements():
    """33x64x1024x1024 bf16 channels_last (2.2e9 elements, ~9 GB with the output): the last image is right."""
    x = torch.randn(33, 1024, 1024, 64, device="cuda", dtype=bf16).permute(0, 3, 1, 2)
    scale, shift = torch.rand(64, device="cuda") + 0.5, torch.randn(64, device="cuda")
    out = bn.bn_act_forward(x, scale, shift, None, None, None, True)
    _assert_like(out, x)
    last = x[-1:].double() * _col(scale) + _col(shift)
    assert_close(out[-1:], F.relu(last), bf16, eager=F.relu(x[-1:] * _col(scale.to(bf16)) + _col(shift.to(bf16))))


def test_every_launch_runs_with_x_device_current(monkeypatch):
    """Triton launches on the current device and its stream, the arrival counters are those of x's device: each
    launcher makes x's device current around its launch (kernels/_arrival.py's launch_device)."""
    current, launched = [], []

    class Guard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            current.append(self.device)

        def __exit__(self, *exc):
            current.pop()

    class Kernel:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append((self.name, list(current)))

    monkeypatch.setattr(bn, "launch_device", Guard)
    names = ["_bn_stats_kernel", "_bn_act_forward_kernel", "_bn_act_backward_reduce_kernel",
             "_bn_act_backward_elemt_kernel", "_bn_finalize_kernel"]
    for name in names:
        monkeypatch.setattr(bn, name, Kernel(name))
    p = _problem((2, 3, 4, 4), f32, "nhwc", residual="none")
    bn.bn_stats(p.x)
    bn.bn_act_forward(p.x, p.scale, p.shift, None, None, None, True)
    bwd = (p.grad_out, p.x, p.scale, p.shift, p.mean, p.invstd, None, None, None, None, None, True)
    bn.bn_act_backward_reduce(*bwd)
    bn.bn_act_backward_elemt(*bwd, p.sum_dz, p.sum_dz_xhat, None, p.count)
    bn.bn_finalize(p.mean, p.invstd, None, None, None, None, None, p.count, 0.1, 1e-5, False)
    assert launched == [(name, [p.x.device]) for name in names]
