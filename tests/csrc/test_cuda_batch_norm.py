"""The CUDA BN primitives (csrc/cuda, docs/ARCHITECTURE.md section 1) against float64 plain PyTorch.

Each case runs `torch.ops.pyfast.<op>` on the GPU and evaluates the same formula in float64 on the CPU,
judged by tests/tolerances.py: float32/float64 by relative error; float16/bfloat16 against 2x (forward) or
3x (backward) eager PyTorch's own error in that dtype. The shapes pick every vector width the kernels use
(16/8/4/2-byte and scalar accesses, NCHW by H*W, channels_last by C), one- and many-block reductions, and the
scalar fallback of storage offset by one element.
"""
import math

import finalize_checks
import pytest
import torch
from tolerances import assert_close

pytestmark = pytest.mark.gpu
DEVICE = "cuda"


def _cuda_kernels_registered():
    try:
        import pyfast  # noqa: F401  (loads pyfast._C, whose static initializers register the ops)
    except ImportError:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("pyfast::bn_stats", "CUDA")
    except RuntimeError:  # the schema itself is not registered
        return False


if torch.cuda.is_available() and not _cuda_kernels_registered():
    pytest.skip("pyfast._C has no CUDA kernels (built without CUDA)", allow_module_level=True)

OPS = torch.ops.pyfast

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (N, C, H, W): odd everything; H*W=16 and C=8 (16-byte vectors); H*W=49 (NCHW scalar) with C=12;
# H*W=196 and C=6 (8/4-byte vectors); a big-enough one for several blocks per channel.
SHAPES = [(2, 5, 3, 7), (3, 8, 4, 4), (2, 12, 7, 7), (2, 6, 14, 14), (8, 4, 64, 64)]
RESIDUALS = ["none", "identity", "bn"]
EPS = 1e-5


def _id(value):
    """Readable test ids: float32, 2x5x3x7, nhwc, relu."""
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return None


over_dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=_id)
over_layouts = pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
over_shapes = pytest.mark.parametrize("shape", SHAPES, ids=_id)
over_residuals = pytest.mark.parametrize("residual", RESIDUALS)
over_relu = pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def rand4d(shape, dtype, channels_last, offset=0, loc=0.0, std=1.0):
    """Random (N, C, H, W) on DEVICE, NCHW or channels_last, its storage starting `offset` elements in."""
    n, c, h, w = shape
    flat = torch.randn(math.prod(shape) + offset, device=DEVICE, dtype=dtype)  # in place: 2^31 elements fit
    if std != 1.0:
        flat.mul_(std)
    if loc != 0.0:
        flat.add_(loc)
    flat = flat[offset:]
    return flat.view(n, h, w, c).permute(0, 3, 1, 2) if channels_last else flat.view(n, c, h, w)


def rand_channels(c, dtype, lo=-1.5, hi=1.5):
    return torch.empty(c, device=DEVICE, dtype=acc_dtype(dtype)).uniform_(lo, hi)


def batch_stats(t):
    """Per-channel (mean, invstd) of t in its accumulation dtype, as the op layer would pass them."""
    var, mean = torch.var_mean(t.double(), dim=(0, 2, 3), unbiased=False)
    acc = acc_dtype(t.dtype)
    return mean.to(acc), (var + EPS).rsqrt().to(acc)


def f64(t):
    return None if t is None else t.detach().to("cpu", torch.float64)


def per_channel(v, dtype=None):
    """A per-channel vector broadcast over (N, C, H, W); cast to `dtype` when given (eager in low precision)."""
    if v is None:
        return None
    return (v if dtype is None else v.to(dtype)).view(1, -1, 1, 1)


def pre_activation(x, scale, shift, residual, res_scale, res_shift):
    """z = x*scale + shift (+ residual*res_scale + res_shift); None terms drop out. Per-channel args 4-D."""
    z = x if scale is None else x * scale
    if shift is not None:
        z = z + shift
    if residual is not None:
        r = residual if res_scale is None else residual * res_scale
        z = z + (r if res_shift is None else r + res_shift)
    return z


class Case:
    """Inputs of one BN(+residual)(+ReLU) call: x, its per-channel scale/shift, and an optional residual."""

    def __init__(self, shape, dtype, channels_last, residual="none", offset=0):
        c = shape[1]
        self.dtype = dtype
        self.x = rand4d(shape, dtype, channels_last, offset)
        self.scale = rand_channels(c, dtype)
        self.shift = rand_channels(c, dtype, -0.5, 0.5)
        self.residual = rand4d(shape, dtype, channels_last, offset, loc=0.3) if residual != "none" else None
        self.res_scale = rand_channels(c, dtype) if residual == "bn" else None
        self.res_shift = rand_channels(c, dtype, -0.5, 0.5) if residual == "bn" else None

    def z(self, dtype=None):
        """Pre-activation: float64 on the CPU (dtype None), or eager on the device in `dtype`."""
        if dtype is None:
            t, pc = f64, lambda v: per_channel(f64(v))
        else:
            t, pc = (lambda v: v), lambda v: per_channel(v, dtype)
        return pre_activation(t(self.x), pc(self.scale), pc(self.shift), t(self.residual), pc(self.res_scale),
                              pc(self.res_shift))

    def grad_out(self):
        """A random grad_out, zero where z is too close to 0 for the ReLU mask to be the same in every precision."""
        z = self.z()
        terms = f64(self.x).abs() * per_channel(f64(self.scale)).abs() + per_channel(f64(self.shift)).abs()
        if self.residual is not None:
            terms = terms + f64(self.residual).abs() * (1 if self.res_scale is None else per_channel(
                f64(self.res_scale)).abs()) + (0 if self.res_shift is None else per_channel(f64(self.res_shift)).abs())
        g = rand4d(tuple(self.x.shape), self.dtype, self.x.is_contiguous(memory_format=torch.channels_last)
                   and not self.x.is_contiguous())
        keep = (z.abs() > 0.02 * terms).to(g.device)
        return g * keep.to(g.dtype)


def check(actual, expected, dtype, eager=None, kind="forward", what="output"):
    assert actual.device.type == torch.device(DEVICE).type, f"{what} left the device"
    if dtype in (torch.float16, torch.bfloat16):
        assert_close(actual, expected, dtype, eager=eager, kind=kind, what=what)
    else:
        assert_close(actual, expected, dtype, kind=kind, what=what)


def assert_same_format(out, x):
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        assert out.is_contiguous(memory_format=torch.channels_last), "output lost channels_last"
    else:
        assert out.is_contiguous(), "output is not NCHW-contiguous"


# --- bn_stats --------------------------------------------------------------------------------------------


@over_shapes
@over_layouts
@over_dtypes
def test_bn_stats(dtype, channels_last, shape):
    x = rand4d(shape, dtype, channels_last, loc=0.5, std=2.0)
    mean, var = OPS.bn_stats(x)
    assert mean.dtype == var.dtype == acc_dtype(dtype) and mean.shape == var.shape == (shape[1],)
    ref_var, ref_mean = torch.var_mean(f64(x), dim=(0, 2, 3), unbiased=False)
    check(mean, ref_mean, acc_dtype(dtype), what="mean")
    check(var, ref_var, acc_dtype(dtype), what="var")


@over_layouts
def test_bn_stats_large_mean(channels_last):
    """Mean 1e4, std 1 in float32: a naive E[x^2] - E[x]^2 loses the variance entirely."""
    x = rand4d((16, 3, 32, 32), torch.float32, channels_last, loc=1e4)
    mean, var = OPS.bn_stats(x)
    ref_var, ref_mean = torch.var_mean(f64(x), dim=(0, 2, 3), unbiased=False)
    check(mean, ref_mean, torch.float32, what="mean")
    check(var, ref_var, torch.float32, what="var")  # ~1, to float32's 1e-4


def test_bn_stats_empty_batch():
    mean, var = OPS.bn_stats(torch.empty(0, 3, 4, 4, device=DEVICE))
    assert mean.shape == (3,) and torch.isnan(mean).all() and torch.isnan(var).all()


# --- bn_act_forward --------------------------------------------------------------------------------------


def forward(case, relu, affine=True):
    scale, shift = (case.scale, case.shift) if affine else (None, None)
    return OPS.bn_act_forward(case.x, scale, shift, case.residual, case.res_scale, case.res_shift, relu)


def forward_reference(case, relu, affine=True, dtype=None):
    if not affine:
        case = _without_affine(case)
    z = case.z(dtype)
    return torch.relu(z) if relu else z


def _without_affine(case):
    plain = Case.__new__(Case)
    plain.__dict__.update(case.__dict__, scale=None, shift=None)
    return plain


@over_relu
@over_residuals
@over_shapes
@over_layouts
@over_dtypes
def test_bn_act_forward(dtype, channels_last, shape, residual, relu):
    case = Case(shape, dtype, channels_last, residual)
    out = forward(case, relu)
    assert out.dtype == dtype and out.shape == case.x.shape
    assert_same_format(out, case.x)
    check(out, forward_reference(case, relu), dtype, eager=forward_reference(case, relu, dtype=dtype))


@pytest.mark.parametrize("residual", ["none", "identity"])
@over_layouts
def test_bn_act_forward_without_affine(channels_last, residual):
    """scale/shift None: relu(x [+ residual]), the add_relu case."""
    case = Case((2, 6, 5, 5), torch.bfloat16, channels_last, residual)
    out = forward(case, True, affine=False)
    check(out, forward_reference(case, True, affine=False), torch.bfloat16,
          eager=forward_reference(case, True, affine=False, dtype=torch.bfloat16))


def test_bn_act_forward_keeps_nan():
    case = Case((2, 4, 3, 3), torch.float32, False)
    case.x[0, 1, 1, 1] = float("nan")
    out = forward(case, relu=True)
    ref = forward_reference(case, relu=True)
    assert torch.isnan(out[0, 1, 1, 1]) and torch.equal(torch.isnan(out.cpu()), torch.isnan(ref))
    check(out, ref, torch.float32)
    grad_x, _ = OPS.bn_act_backward_elemt(torch.ones_like(case.x), case.x, *[None] * 9, True, None, None, None, 0)
    assert grad_x[0, 1, 1, 1].item() == 1.0  # a NaN z passes the gradient, as torch.relu's backward


# --- bn_act_backward_reduce ------------------------------------------------------------------------------


def backward_stats(case):
    mean, invstd = batch_stats(case.x)
    res_mean, res_invstd = batch_stats(case.residual) if case.res_scale is not None else (None, None)
    return mean, invstd, res_mean, res_invstd


def reduce_reference(case, g, relu, mean, invstd, res_mean, res_invstd):
    z = case.z()
    g = f64(g)
    dz = torch.where(z > 0, g, torch.zeros_like(g)) if relu else g
    dims = (0, 2, 3)
    xhat = (f64(case.x) - per_channel(f64(mean))) * per_channel(f64(invstd))
    sums = [dz.sum(dims), (dz * xhat).sum(dims)]
    if res_mean is not None:
        rhat = (f64(case.residual) - per_channel(f64(res_mean))) * per_channel(f64(res_invstd))
        sums.append((dz * rhat).sum(dims))
    return sums


@over_relu
@over_residuals
@over_shapes
@over_layouts
@over_dtypes
def test_bn_act_backward_reduce(dtype, channels_last, shape, residual, relu):
    case = Case(shape, dtype, channels_last, residual)
    g = case.grad_out()
    mean, invstd, res_mean, res_invstd = backward_stats(case)
    sums = OPS.bn_act_backward_reduce(g, case.x, case.scale, case.shift, mean, invstd, case.residual,
                                      case.res_scale, case.res_shift, res_mean, res_invstd, relu)
    expected = reduce_reference(case, g, relu, mean, invstd, res_mean, res_invstd)
    acc = acc_dtype(dtype)
    for name, actual, ref in zip(("sum_dz", "sum_dz_xhat", "sum_dz_rhat"), sums, expected):
        assert actual.dtype == acc
        check(actual, ref, acc, what=name)
    if res_mean is None:
        assert sums[2].numel() == 0
    else:  # they become parameter gradients as they are: no views of one buffer
        assert len({t.untyped_storage().data_ptr() for t in sums}) == 3


# --- bn_act_backward_elemt -------------------------------------------------------------------------------


def elemt_inputs(case, relu, training):
    """(grad_out, the per-channel statistics, sum_dz, sum_dz_xhat, sum_dz_rhat, count) of one elemt call."""
    g = case.grad_out()
    mean, invstd, res_mean, res_invstd = backward_stats(case)
    c, dt = case.x.shape[1], case.dtype
    count = case.x.numel() // c
    sum_dz = rand_channels(c, dt, -0.3 * count, 0.3 * count) if training else None
    sum_dz_xhat = rand_channels(c, dt, -0.3 * count, 0.3 * count) if training else None
    sum_dz_rhat = rand_channels(c, dt, -0.3 * count, 0.3 * count) if training and res_mean is not None else None
    return g, mean, invstd, res_mean, res_invstd, sum_dz, sum_dz_xhat, sum_dz_rhat, count


def elemt_reference(case, relu, g, mean, invstd, res_mean, res_invstd, sum_dz, sum_dz_xhat, sum_dz_rhat, count,
                    dtype=None):
    """(grad_x, grad_residual) in float64 on the CPU, or eager on the device in `dtype`."""
    if dtype is None:
        t, pc = f64, lambda v: per_channel(f64(v))
    else:
        t, pc = (lambda v: v), lambda v: per_channel(v, dtype)
    z, g = case.z(dtype), t(g)
    dz = torch.where(z > 0, g, torch.zeros_like(g)) if relu else g

    def grad(scale, x, m, istd, sum_dz_hat):
        if sum_dz is None:
            d = dz
        else:
            d = dz - pc(sum_dz / count) - (t(x) - pc(m)) * pc(istd) * pc(sum_dz_hat / count)
        return d if scale is None else pc(scale) * d

    grad_x = grad(case.scale, case.x, mean, invstd, sum_dz_xhat)
    if case.residual is None:
        return grad_x, None
    if sum_dz is not None and res_mean is not None:
        return grad_x, grad(case.res_scale, case.residual, res_mean, res_invstd, sum_dz_rhat)
    return grad_x, dz if case.res_scale is None else pc(case.res_scale) * dz


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@over_relu
@over_residuals
@over_shapes
@over_layouts
@over_dtypes
def test_bn_act_backward_elemt(dtype, channels_last, shape, residual, relu, training):
    case = Case(shape, dtype, channels_last, residual)
    args = elemt_inputs(case, relu, training)
    g, mean, invstd, res_mean, res_invstd, sum_dz, sum_dz_xhat, sum_dz_rhat, count = args
    grad_x, grad_res = OPS.bn_act_backward_elemt(g, case.x, case.scale, case.shift, mean, invstd, case.residual,
                                                 case.res_scale, case.res_shift, res_mean, res_invstd, relu,
                                                 sum_dz, sum_dz_xhat, sum_dz_rhat, count)
    ref_x, ref_res = elemt_reference(case, relu, *args)
    eager_x, eager_res = elemt_reference(case, relu, *args, dtype=dtype)
    assert_same_format(grad_x, case.x)
    check(grad_x, ref_x, dtype, eager=eager_x, kind="backward", what="grad_x")
    if case.residual is None:
        assert grad_res.numel() == 0
    else:
        assert_same_format(grad_res, case.x)
        check(grad_res, ref_res, dtype, eager=eager_res, kind="backward", what="grad_residual")


# --- bn_finalize (the checks are shared with the CPU and Triton implementations: tests/finalize_checks.py) --------


@pytest.mark.parametrize("stats_dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("param_dtype,affine", [(torch.float32, True), (torch.bfloat16, True), (torch.float32, False)],
                         ids=["float32", "bfloat16", "no-affine"])
def test_bn_finalize_outputs(stats_dtype, param_dtype, affine):
    finalize_checks.check_outputs(OPS.bn_finalize, DEVICE, stats_dtype, param_dtype, affine)


@pytest.mark.parametrize("running_dtype", [torch.float32, torch.bfloat16, torch.float64], ids=_id)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_bn_finalize_updates_like_batch_norm(running_dtype, momentum):
    finalize_checks.check_matches_batch_norm(OPS.bn_finalize, DEVICE, running_dtype, momentum)


def test_bn_finalize_count_edge_cases():
    finalize_checks.check_empty_batch(OPS.bn_finalize, DEVICE)
    finalize_checks.check_one_value_per_channel(OPS.bn_finalize, DEVICE)
    finalize_checks.check_without_running_statistics(OPS.bn_finalize, DEVICE)


def test_bn_finalize_many_channels_grid_stride():
    """More channels than one block (with num_batches_tracked) or one wave of blocks (without) covers."""
    finalize_checks.check_matches_batch_norm(OPS.bn_finalize, DEVICE, torch.float32, None, steps=2, channels=3000)
    finalize_checks.check_matches_batch_norm(OPS.bn_finalize, DEVICE, torch.float32, 0.1, steps=1, channels=300_000)


def test_bn_finalize_replays_in_a_cuda_graph():
    """No host sync: the call captures into a CUDA graph, and each replay counts one more batch on the device."""
    c = 8
    mean, var = rand_channels(c, torch.float32), rand_channels(c, torch.float32, 0.5, 2.0)
    running_mean, running_var = torch.zeros(c, device=DEVICE), torch.ones(c, device=DEVICE)
    tracked = torch.zeros((), dtype=torch.int64, device=DEVICE)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # a host sync inside would make the capture fail
        OPS.bn_finalize(mean, var, None, None, running_mean, running_var, tracked, 16, None, EPS, True)
    assert tracked.item() == 0  # capturing runs nothing
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert tracked.item() == 3
    expected_mean, expected_var = torch.zeros(c, device=DEVICE), torch.ones(c, device=DEVICE)
    for n in (1, 2, 3):  # the cumulative average: weight 1/n at the n-th batch
        expected_mean += (mean - expected_mean) / n
        expected_var += (var * 16 / 15 - expected_var) / n
    torch.testing.assert_close(running_mean, expected_mean)
    torch.testing.assert_close(running_var, expected_var)


@pytest.mark.parametrize("name", finalize_checks.BAD_CALLS)
def test_bn_finalize_bad_arguments(name):
    finalize_checks.check_bad_call(OPS.bn_finalize, DEVICE, name)


# --- storage offsets, grid limits, large tensors ---------------------------------------------------------


@pytest.mark.parametrize("offset", [1, 2, 3])
@over_layouts
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
def test_misaligned_storage(dtype, channels_last, offset):
    """Tensors starting 1-3 elements into their storage take the narrower/scalar paths, with the same results."""
    case = Case((4, 8, 8, 8), dtype, channels_last, "bn", offset=offset)
    assert case.x.data_ptr() % 16 != 0
    check(forward(case, True), forward_reference(case, True), dtype, eager=forward_reference(case, True, dtype=dtype))
    mean, var = OPS.bn_stats(case.x)
    ref_var, ref_mean = torch.var_mean(f64(case.x), dim=(0, 2, 3), unbiased=False)
    check(mean, ref_mean, torch.float32, what="mean")
    check(var, ref_var, torch.float32, what="var")
    args = elemt_inputs(case, True, True)
    g, mean, invstd, res_mean, res_invstd, sum_dz, sum_dz_xhat, sum_dz_rhat, count = args
    sums = OPS.bn_act_backward_reduce(g, case.x, case.scale, case.shift, mean, invstd, case.residual,
                                      case.res_scale, case.res_shift, res_mean, res_invstd, True)
    for name, actual, ref in zip(("sum_dz", "sum_dz_xhat", "sum_dz_rhat"), sums,
                                 reduce_reference(case, g, True, mean, invstd, res_mean, res_invstd)):
        check(actual, ref, torch.float32, what=name)
    grads = OPS.bn_act_backward_elemt(g, case.x, case.scale, case.shift, mean, invstd, case.residual,
                                      case.res_scale, case.res_shift, res_mean, res_invstd, True, sum_dz,
                                      sum_dz_xhat, sum_dz_rhat, count)
    for name, actual, ref, eager in zip(("grad_x", "grad_residual"), grads, elemt_reference(case, True, *args),
                                        elemt_reference(case, True, *args, dtype=dtype)):
        check(actual, ref, dtype, eager=eager, kind="backward", what=name)


@over_layouts
def test_more_channel_tiles_than_grid_y(channels_last):
    """More than 65535 channel tiles: NCHW has one tile per channel, channels_last one per 32 channels (odd C:
    scalar path), so both loop over grid.y."""
    shape = (2, 65535 * 32 + 1, 1, 2) if channels_last else (1, 70001, 1, 3)
    case = Case(shape, torch.float32, channels_last, "bn")
    check(forward(case, True), forward_reference(case, True), torch.float32)
    mean, var = OPS.bn_stats(case.x)
    ref_var, ref_mean = torch.var_mean(f64(case.x), dim=(0, 2, 3), unbiased=False)
    check(mean, ref_mean, torch.float32, what="mean")
    check(var, ref_var, torch.float32, what="var")
    g = case.grad_out()
    mean, invstd, res_mean, res_invstd = backward_stats(case)
    sums = OPS.bn_act_backward_reduce(g, case.x, case.scale, case.shift, mean, invstd, case.residual,
                                      case.res_scale, case.res_shift, res_mean, res_invstd, True)
    for name, actual, ref in zip(("sum_dz", "sum_dz_xhat", "sum_dz_rhat"), sums,
                                 reduce_reference(case, g, True, mean, invstd, res_mean, res_invstd)):
        check(actual, ref, torch.float32, what=name)


# Beyond 2^31 elements: NCHW with odd H*W (scalar, element indices past 2^31), NCHW with 16-byte vectors, and
# channels_last with odd C (scalar). bfloat16: x and out are ~4.3 GB each.
LARGE_SHAPES = [((1, 8, 2**14 + 1, 2**14 + 1), False), ((1, 8, 2**14, 2**14 + 8), False),
                ((1, 9, 2**14, 14564), True)]


@pytest.mark.parametrize("shape,channels_last", LARGE_SHAPES, ids=["nchw-scalar", "nchw-vec16B", "nhwc-scalar"])
def test_beyond_2_31_elements(shape, channels_last):
    assert math.prod(shape) > 2**31
    free, _ = torch.cuda.mem_get_info()
    if free < 16 * 2**30:
        pytest.skip(f"needs 16 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    c = shape[1]
    x = rand4d(shape, torch.bfloat16, channels_last, loc=1.0)
    scale, shift = rand_channels(c, torch.bfloat16), rand_channels(c, torch.bfloat16, -0.5, 0.5)
    out = OPS.bn_act_forward(x, scale, shift, None, None, None, True)
    assert_same_format(out, x)
    for ch in range(c):  # one plane at a time, in float32 on the GPU
        expected = torch.relu(x[:, ch].float() * scale[ch] + shift[ch]).to(torch.bfloat16).float()
        actual = out[:, ch].float()
        # float32 FMA vs separate multiply-add: at most one bfloat16 rounding step apart
        bad = (actual - expected).abs() > 2**-7 * expected.abs() + 1e-6
        assert not bad.any(), f"channel {ch}: {int(bad.sum())} mismatches, first at {bad.nonzero()[0].tolist()}"
        del expected, actual, bad
    del out
    mean, var = OPS.bn_stats(x)
    for ch in range(c):
        ref_var, ref_mean = torch.var_mean(x[:, ch].double(), unbiased=False)
        assert abs(mean[ch].item() - ref_mean.item()) <= 1e-5 * abs(ref_mean.item()) + 1e-6, f"mean[{ch}]"
        assert abs(var[ch].item() - ref_var.item()) <= 1e-4 * ref_var.item(), f"var[{ch}]"


# --- other ranks, argument checks -----------------------------------------------------------------------


@pytest.mark.parametrize("shape,memory_format", [((6, 5), None), ((3, 4, 7), None), ((2, 3, 2, 3, 4), None),
                                                 ((2, 3, 2, 3, 4), torch.channels_last_3d)],
                         ids=["2d", "3d", "5d", "5d-channels_last_3d"])
def test_any_rank_from_two(shape, memory_format):
    """(N, C, *) like the CPU kernels: the trailing sizes act as H*W; channels_last_3d stays channels-innermost."""
    x = torch.randn(shape, device=DEVICE)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    c, dims, view = shape[1], [0] + list(range(2, len(shape))), (1, -1) + (1,) * (len(shape) - 2)
    scale, shift = rand_channels(c, torch.float32), rand_channels(c, torch.float32)
    out = OPS.bn_act_forward(x, scale, shift, x, None, None, True)
    ref = torch.relu(f64(x) * f64(scale).view(view) + f64(shift).view(view) + f64(x))
    check(out, ref, torch.float32)
    if memory_format is not None:
        assert out.is_contiguous(memory_format=memory_format)
    mean, var = OPS.bn_stats(x)
    ref_var, ref_mean = torch.var_mean(f64(x), dim=dims, unbiased=False)
    check(mean, ref_mean, torch.float32, what="mean")
    check(var, ref_var, torch.float32, what="var")


def _bad_calls():
    """The CPU tests' table (tests/csrc/test_cpu_batch_norm.py): the CUDA kernels fail alike."""
    x, c3 = torch.zeros(2, 3, 4, 4, device=DEVICE), torch.zeros(3, device=DEVICE)
    return {
        "x rank": (lambda: OPS.bn_stats(torch.zeros(3, device=DEVICE)), "x must have shape"),
        "x dtype": (lambda: OPS.bn_stats(x.int()), "x must be float32"),
        "scale length": (lambda: OPS.bn_act_forward(x, torch.zeros(4, device=DEVICE), None, None, None, None, True),
                         "scale"),
        "shift dtype": (lambda: OPS.bn_act_forward(x, None, c3.double(), None, None, None, True),
                        "shift must be Float"),
        "residual shape": (lambda: OPS.bn_act_forward(x, None, None, x[:1], None, None, True), "residual"),
        "residual dtype": (lambda: OPS.bn_act_forward(x, None, None, x.double(), None, None, True), "residual"),
        "res_scale alone": (lambda: OPS.bn_act_forward(x, None, None, None, c3, None, True), "res_scale"),
        "grad_out dtype": (lambda: OPS.bn_act_backward_reduce(x.half(), x, None, None, c3, c3, *[None] * 5, True),
                           "grad_out"),
        "invstd dtype": (lambda: OPS.bn_act_backward_reduce(x, x, None, None, c3, c3.double(), *[None] * 5, True),
                         "invstd"),
        "res_invstd missing": (lambda: OPS.bn_act_backward_reduce(x, x, None, None, c3, c3, x, None, None, c3, None,
                                                                  True), "res_invstd"),
        "mean missing": (lambda: OPS.bn_act_backward_elemt(x, x, *[None] * 9, True, c3, c3, None, 32),
                         "mean is required"),
        "sum_dz missing": (lambda: OPS.bn_act_backward_elemt(x, x, *[None] * 9, True, None, c3, None, 32), "sum_dz"),
        "count zero": (lambda: OPS.bn_act_backward_elemt(x, x, None, None, c3, c3, *[None] * 5, True, c3, c3, None,
                                                         0), "count must be positive"),
        "device": (lambda: OPS.bn_act_forward(x, c3.cpu(), None, None, None, None, True), "device"),
    }


BAD_CALLS = ["x rank", "x dtype", "scale length", "shift dtype", "residual shape", "residual dtype",
             "res_scale alone", "grad_out dtype", "invstd dtype", "res_invstd missing", "mean missing",
             "sum_dz missing", "count zero", "device"]


@pytest.mark.parametrize("name", BAD_CALLS)
def test_bad_arguments_raise_naming_them(name):
    call, message = _bad_calls()[name]
    with pytest.raises(RuntimeError, match=message):
        call()
