"""csrc/cpu/batch_norm.cpp: the five CPU BN primitives against plain PyTorch in float64.

Every primitive of docs/ARCHITECTURE.md section 1 is checked on fresh random inputs over dtypes,
NCHW / channels_last memory, odd shapes, ReLU on/off and residual none / identity / BN'd; then the
edge cases: a large mean, NaN, empty tensors, mixed or odd strides, other ranks, bad arguments.
Per-channel outputs (statistics, sums) are held to the float32 (float64) bound; tensor outputs in
bf16/fp16 to the multiple of eager PyTorch's own error in that dtype.
"""
import itertools

import finalize_checks
import pytest
import torch
from tolerances import assert_close

pytest.importorskip("pyfast._C")
ops = torch.ops.pyfast

f64, f32, bf16, f16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
DTYPES = [f32, f64, bf16, f16]
# (4, 12, 2, 2): planes and rows shorter than one vector, C between the float and bf16 vector widths of AVX2;
# (2, 20, 4, 4): the same for AVX-512's widths, and planes of whole vectors; the others: lines with a tail
SHAPES = [(3, 5, 7, 9), (1, 16, 1, 1), (8, 32, 13, 11), (4, 12, 2, 2), (2, 20, 4, 4)]
FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
RESIDUALS = ["none", "identity", "bn"]


def acc(dtype):
    return f64 if dtype == f64 else f32


def rand(shape, dtype, fmt="nchw", loc=0.0, scale=1.0):
    return (torch.randn(shape, dtype=f64) * scale + loc).to(dtype).contiguous(memory_format=FORMATS[fmt])


def col(v, ct):
    return v.to(ct).view(1, -1, 1, 1)


def reduce_dims(x):
    return [0] + list(range(2, x.dim()))


class Case:
    """Random inputs of every primitive for one (shape, dtype, format, residual kind)."""

    def __init__(self, shape, dtype, fmt, residual, affine=True):
        c, a = shape[1], acc(dtype)
        self.x, self.grad_out = rand(shape, dtype, fmt), rand(shape, dtype, fmt)
        self.scale = torch.randn(c, dtype=a) if affine else None
        self.shift = torch.randn(c, dtype=a) if affine else None
        self.mean, self.invstd = torch.randn(c, dtype=a), torch.rand(c, dtype=a) + 0.5
        self.residual = rand(shape, dtype, fmt) if residual != "none" else None
        bn = residual == "bn"
        self.res_scale, self.res_shift = (torch.randn(c, dtype=a), torch.randn(c, dtype=a)) if bn else (None, None)
        self.res_mean, self.res_invstd = (torch.randn(c, dtype=a), torch.rand(c, dtype=a) + 0.5) if bn else (None, None)
        self.count = 12  # bn_act_backward_elemt divides the sums by it
        self.sum_dz, self.sum_dz_xhat = torch.randn(c, dtype=a) * 12, torch.randn(c, dtype=a) * 12
        self.sum_dz_rhat = torch.randn(c, dtype=a) * 12 if bn else None

    def act(self):
        return (self.scale, self.shift, self.residual, self.res_scale, self.res_shift)

    # -- the reference, in compute dtype ct (float64: ground truth; the input dtype: eager) --
    def z(self, ct):
        z = self.x.to(ct)
        z = z * col(self.scale, ct) + col(self.shift, ct) if self.scale is not None else z
        if self.residual is not None:
            r = self.residual.to(ct)
            z = z + (r * col(self.res_scale, ct) + col(self.res_shift, ct) if self.res_scale is not None else r)
        return z

    def dz(self, relu, ct):
        g = self.grad_out.to(ct)
        return g * (self.z(ct) > 0) if relu else g

    def hat(self, v, mean, invstd, ct):
        return (v.to(ct) - col(mean, ct)) * col(invstd, ct)

    def bn_grad(self, dz, v, scale, mean, invstd, sum_dz_vhat, ct):
        if sum_dz_vhat is not None:
            mean_dz, mean_dz_vhat = col(self.sum_dz / self.count, ct), col(sum_dz_vhat / self.count, ct)
            dz = dz - mean_dz - self.hat(v, mean, invstd, ct) * mean_dz_vhat
        return dz * col(scale, ct) if scale is not None else dz


def check(actual, expected_fn, dtype, kind="forward", what="output"):
    """actual vs expected_fn(float64); a bf16/fp16 tensor also vs eager expected_fn(dtype)."""
    eager = expected_fn(dtype) if dtype in (bf16, f16) else None
    assert_close(actual, expected_fn(f64), dtype=dtype, eager=eager, kind=kind, what=what)


GRID = list(itertools.product(SHAPES, DTYPES, FORMATS))


def cases(*options):
    """(shape, dtype, format, *option) over dtypes x formats x options, the shapes taken in turn."""
    combos = itertools.product(DTYPES, FORMATS, *options)
    return [(SHAPES[i % len(SHAPES)], *combo) for i, combo in enumerate(combos)]


@pytest.mark.parametrize("shape,dtype,fmt", GRID)
def test_stats(shape, dtype, fmt):
    x = rand(shape, dtype, fmt, loc=2.0, scale=3.0)
    mean, var = ops.bn_stats(x)
    assert mean.dtype == var.dtype == acc(dtype)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=reduce_dims(x), unbiased=False)
    assert_close(mean, ref_mean, dtype=acc(dtype), what="mean")
    assert_close(var, ref_var, dtype=acc(dtype), what="var")


@pytest.mark.parametrize("fmt", FORMATS)
def test_stats_large_mean_is_stable(fmt):
    x = rand((8, 16, 24, 24), f32, fmt, loc=1e4)
    ref_var = torch.var(x.double(), dim=(0, 2, 3), unbiased=False)
    _, var = ops.bn_stats(x)
    assert ((var.double() - ref_var).abs() / ref_var).max() < 1e-4  # the issue asks ~1e-3


@pytest.mark.parametrize("shape,dtype,fmt,residual,relu", cases(RESIDUALS, [False, True]))
def test_act_forward(shape, dtype, fmt, residual, relu):
    case = Case(shape, dtype, fmt, residual)
    out = ops.bn_act_forward(case.x, *case.act(), relu)
    assert out.dtype == dtype and out.stride() == case.x.stride()
    check(out, lambda ct: torch.relu(case.z(ct)) if relu else case.z(ct), dtype)


@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (2, 20, 4, 4), (2, 40, 3, 3)])
@pytest.mark.parametrize("dtype,fmt,residual", list(itertools.product(DTYPES, FORMATS, RESIDUALS)))
def test_act_forward_in_place(shape, dtype, fmt, residual):
    """bn_act_forward_ writes bn_act_forward's result into x itself (and bumps its version): also where a
    line's tail is a whole vector overlapping the one before (planes of 63, rows of 20 or 40)."""
    case = Case(shape, dtype, fmt, residual)
    expected = ops.bn_act_forward(case.x, *case.act(), True)
    x, version = case.x.clone(), case.x._version
    assert ops.bn_act_forward_(x, *case.act(), True) is x
    assert torch.equal(x, expected) and x._version > version and x.stride() == case.x.stride()
    with pytest.raises(RuntimeError, match="in place"):
        ops.bn_act_forward_(case.x[:, :, ::2], *case.act()[:2], None, None, None, True)


@pytest.mark.parametrize("dtype,fmt", list(itertools.product(DTYPES, FORMATS)))
def test_act_forward_without_scale_and_shift(dtype, fmt):
    case = Case((2, 6, 5, 3), dtype, fmt, "identity", affine=False)
    check(ops.bn_act_forward(case.x, *case.act(), True), lambda ct: torch.relu(case.z(ct)), dtype)


@pytest.mark.parametrize("shape,dtype,fmt,residual,relu", cases(RESIDUALS, [False, True]))
def test_act_backward_reduce(shape, dtype, fmt, residual, relu):
    case = Case(shape, dtype, fmt, residual)
    sums = ops.bn_act_backward_reduce(case.grad_out, case.x, case.scale, case.shift, case.mean, case.invstd,
                                      case.residual, case.res_scale, case.res_shift, case.res_mean,
                                      case.res_invstd, relu)
    dims = reduce_dims(case.x)
    dz = case.dz(relu, f64)
    expected = [dz.sum(dims), (dz * case.hat(case.x, case.mean, case.invstd, f64)).sum(dims)]
    if residual == "bn":
        expected.append((dz * case.hat(case.residual, case.res_mean, case.res_invstd, f64)).sum(dims))
    else:
        assert sums[2].numel() == 0
    for name, actual, ref in zip(["sum_dz", "sum_dz_xhat", "sum_dz_rhat"], sums, expected):
        assert actual.dtype == acc(dtype)
        assert_close(actual, ref, dtype=acc(dtype), what=name)
    if residual == "bn":  # they become parameter gradients as they are: no views of one buffer
        assert len({t.untyped_storage().data_ptr() for t in sums}) == 3


@pytest.mark.parametrize("shape,dtype,fmt,residual,relu_training",
                         cases(RESIDUALS, [(False, True), (True, True), (True, False)]))
def test_act_backward_elemt(shape, dtype, fmt, residual, relu_training):
    relu, training = relu_training
    case = Case(shape, dtype, fmt, residual)
    grad_x, grad_r = ops.bn_act_backward_elemt(
        case.grad_out, case.x, case.scale, case.shift, case.mean if training else None,
        case.invstd if training else None, case.residual, case.res_scale, case.res_shift, case.res_mean,
        case.res_invstd, relu, case.sum_dz if training else None, case.sum_dz_xhat if training else None,
        case.sum_dz_rhat if training else None, case.count)
    assert grad_x.stride() == case.x.stride()
    check(grad_x, lambda ct: case.bn_grad(case.dz(relu, ct), case.x, case.scale, case.mean, case.invstd,
                                          case.sum_dz_xhat if training else None, ct), dtype, "backward", "grad_x")
    if residual == "none":
        assert grad_r.numel() == 0
        return
    assert grad_r.stride() == case.x.stride()
    check(grad_r, lambda ct: case.bn_grad(case.dz(relu, ct), case.residual, case.res_scale, case.res_mean,
                                          case.res_invstd, case.sum_dz_rhat if training else None, ct),
          dtype, "backward", "grad_residual")


def test_nan_propagates_like_torch():
    x = rand((2, 4, 5, 5), f32)
    x[0, 1, 2, 3] = float("nan")
    for fmt in FORMATS.values():
        xf = x.contiguous(memory_format=fmt)
        mean, var = ops.bn_stats(xf)
        assert torch.isnan(mean).tolist() == torch.isnan(var).tolist() == [False, True, False, False]
        for relu in (False, True):
            out = ops.bn_act_forward(xf, None, None, None, None, None, relu)
            assert torch.equal(torch.isnan(out), torch.isnan(x))  # relu(NaN) = NaN
            grad_x, _ = ops.bn_act_backward_elemt(torch.ones_like(xf), xf, *[None] * 9, relu, None, None, None, 0)
            assert grad_x[0, 1, 2, 3].item() == 1.0  # a NaN z passes the gradient, as torch.relu's backward


def test_empty_batch():
    x = torch.randn(0, 3, 4, 4)
    mean, var = ops.bn_stats(x)
    assert mean.shape == var.shape == (3,) and torch.isnan(mean).all() and torch.isnan(var).all()
    assert ops.bn_act_forward(x, None, None, x, None, None, True).shape == x.shape
    sums = ops.bn_act_backward_reduce(x, x, None, None, torch.zeros(3), torch.ones(3), None, None, None, None,
                                      None, True)
    assert torch.equal(sums[0], torch.zeros(3)) and torch.equal(sums[1], torch.zeros(3))
    grad_x, grad_r = ops.bn_act_backward_elemt(x, x, *[None] * 4, x, *[None] * 4, True, None, None, None, 0)
    assert grad_x.shape == grad_r.shape == x.shape
    grad_x, _ = ops.bn_act_backward_elemt(x, x, None, None, C3, C3 + 1, *[None] * 5, True, C3, C3, None, 0)
    assert grad_x.shape == x.shape  # count 0 with sums: nothing to divide


def test_mixed_formats_and_odd_strides_match_contiguous():
    case = Case((4, 8, 6, 5), f32, "nhwc", "bn")
    expected = ops.bn_act_forward(case.x.contiguous(), *case.act(), True)
    residual_nchw = case.residual.contiguous()
    actual = ops.bn_act_forward(case.x, case.scale, case.shift, residual_nchw, case.res_scale, case.res_shift, True)
    assert actual.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    rest = (case.scale, case.shift, case.mean, case.invstd, residual_nchw, case.res_scale, case.res_shift,
            case.res_mean, case.res_invstd, True)
    for a, b in zip(ops.bn_act_backward_reduce(case.grad_out.contiguous(), case.x, *rest),
                    ops.bn_act_backward_reduce(case.grad_out, case.x, *rest)):
        assert torch.equal(a, b)
    sliced = torch.randn(4, 8, 6, 10)[..., ::2]
    _, var = ops.bn_stats(sliced)
    torch.testing.assert_close(var, sliced.var(dim=(0, 2, 3), unbiased=False))


@pytest.mark.parametrize("shape", [(6, 10), (2, 3, 17), (2, 3, 4, 5, 6)])
def test_other_ranks(shape):
    x = rand(shape, f32, loc=1.0)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=reduce_dims(x), unbiased=False)
    mean, var = ops.bn_stats(x)
    assert_close(mean, ref_mean, what="mean")
    assert_close(var, ref_var, what="var")
    scale = torch.randn(shape[1])
    out = ops.bn_act_forward(x, scale, None, None, None, None, True)
    assert_close(out, torch.relu(x.double() * scale.double().view(1, -1, *[1] * (x.dim() - 2))))


# planes of many vectors; planes of two vectors, split into tasks of several channels; and into tasks that
# cross from one block of planes into the next (4096 planes of 16 elements to a block)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(8, 32, 13, 11), (64, 64, 4, 4), (8193, 3, 4, 4)])
def test_results_do_not_depend_on_thread_count(fmt, shape):
    case = Case(shape, f32, fmt, "bn")
    args = (case.grad_out, case.x, case.scale, case.shift, case.mean, case.invstd, case.residual,
            case.res_scale, case.res_shift, case.res_mean, case.res_invstd, True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = ops.bn_stats(case.x) + ops.bn_act_backward_reduce(*args)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(serial, ops.bn_stats(case.x) + ops.bn_act_backward_reduce(*args)):
        assert torch.equal(a, b)


X = torch.zeros(2, 3, 4, 4)
C3 = torch.zeros(3)
BAD = {
    "x rank": (lambda: ops.bn_stats(torch.zeros(3)), "x must have shape"),
    "x dtype": (lambda: ops.bn_stats(X.int()), "x must be float32"),
    "scale length": (lambda: ops.bn_act_forward(X, torch.zeros(4), None, None, None, None, True), "scale"),
    "shift dtype": (lambda: ops.bn_act_forward(X, None, C3.double(), None, None, None, True), "shift must be Float"),
    "residual shape": (lambda: ops.bn_act_forward(X, None, None, X[:1], None, None, True), "residual"),
    "residual dtype": (lambda: ops.bn_act_forward(X, None, None, X.double(), None, None, True), "residual"),
    "res_scale alone": (lambda: ops.bn_act_forward(X, None, None, None, C3, None, True), "res_scale"),
    "grad_out dtype": (lambda: ops.bn_act_backward_reduce(X.half(), X, None, None, C3, C3, *[None] * 5, True),
                       "grad_out"),
    "invstd dtype": (lambda: ops.bn_act_backward_reduce(X, X, None, None, C3, C3.double(), *[None] * 5, True),
                     "invstd"),
    "res_invstd missing": (lambda: ops.bn_act_backward_reduce(X, X, None, None, C3, C3, X, None, None, C3, None,
                                                              True), "res_invstd"),
    "mean missing": (lambda: ops.bn_act_backward_elemt(X, X, *[None] * 9, True, C3, C3, None, 32),
                     "mean is required"),
    "sum_dz missing": (lambda: ops.bn_act_backward_elemt(X, X, *[None] * 9, True, None, C3, None, 32), "sum_dz"),
    "count zero": (lambda: ops.bn_act_backward_elemt(X, X, None, None, C3, C3, *[None] * 5, True, C3, C3, None, 0),
                   "count must be positive"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_arguments_raise_naming_them(name):
    call, message = BAD[name]
    with pytest.raises(RuntimeError, match=message):
        call()


# -- bn_finalize (the checks are shared with the CUDA and Triton implementations: tests/finalize_checks.py) --


@pytest.mark.parametrize("stats_dtype", DTYPES)
@pytest.mark.parametrize("param_dtype,affine", [(f32, True), (bf16, True), (f32, False)])
def test_finalize_outputs(stats_dtype, param_dtype, affine):
    finalize_checks.check_outputs(ops.bn_finalize, "cpu", stats_dtype, param_dtype, affine)


@pytest.mark.parametrize("running_dtype", [f32, bf16, f64])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_finalize_updates_like_batch_norm(running_dtype, momentum):
    finalize_checks.check_matches_batch_norm(ops.bn_finalize, "cpu", running_dtype, momentum)


def test_finalize_count_edge_cases():
    finalize_checks.check_empty_batch(ops.bn_finalize, "cpu")
    finalize_checks.check_one_value_per_channel(ops.bn_finalize, "cpu")
    finalize_checks.check_without_running_statistics(ops.bn_finalize, "cpu")


@pytest.mark.parametrize("name", finalize_checks.BAD_CALLS)
def test_finalize_bad_arguments(name):
    finalize_checks.check_bad_call(ops.bn_finalize, "cpu", name)
