"""kernels/conv.py against torch's float64 convolution: under Triton's interpreter on CPU, for real on GPU.

Shapes are tiny (the interpreter is slow) and odd, so pixel and channel tiles are partial; the case
table covers every path pairwise (dot / direct, groups, kernel sizes, stride, padding, dilation,
dtypes, input layouts) instead of taking the full product.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_close

from pyfast.kernels import _arrival as arrival
from pyfast.kernels import conv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16

# N, C_in, C_out, (H, W), kernel, stride, padding, dilation, groups, dtype, channels_last input
CASES = {
    "dense3x3-dot": (2, 16, 16, (7, 9), 3, 1, 1, 1, 1, f32, False),
    "dense1x1-stride2-bf16": (2, 32, 24, (9, 7), 1, 2, 0, 1, 1, bf16, True),
    "k-tail-dot": (2, 24, 20, (5, 5), 3, 1, 1, 1, 1, f32, True),
    "group-width16-bf16": (2, 32, 32, (5, 7), 3, 1, 1, 1, 2, bf16, True),
    "narrow-cout-dot": (2, 32, 4, (5, 7), 3, 2, 1, 1, 2, f32, False),
    "dilation2-f16": (2, 16, 16, (9, 9), 3, 1, 2, 2, 1, f16, True),
    "groups2-direct": (2, 8, 12, (7, 7), 3, 2, 1, 1, 2, f32, True),
    "depthwise-f16": (2, 16, 16, (7, 9), 3, 1, 1, 1, 16, f16, False),
    "depthwise-x2-stride2": (2, 8, 16, (9, 9), 3, 2, 1, 1, 8, f32, True),
    "stem7x7": (2, 3, 16, (9, 9), 7, 2, 3, 1, 1, f32, False),
    "depthwise7x7-bf16": (1, 4, 4, (9, 9), 7, 1, 3, 1, 4, bf16, True),
    "7x7-dot-f16": (1, 16, 16, (7, 7), 7, 2, 3, 1, 1, f16, False),
    "groups4-width16-stride2": (2, 64, 32, (7, 5), 3, 2, 1, 1, 4, f32, False),
    "asymmetric-width2": (2, 6, 6, (7, 8), (1, 3), (2, 1), (0, 1), 1, 3, bf16, False),
    "single-channel": (2, 1, 8, (5, 5), 3, 1, 0, 1, 1, f32, True),
}


def _make(n, c_in, c_out, hw, kernel, groups, dtype, channels_last=True):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    x = torch.randn(n, c_in, *hw, device=DEVICE).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    fan_in = c_in // groups * kh * kw
    w = (torch.randn(c_out, c_in // groups, kh, kw, device=DEVICE) / math.sqrt(fan_in)).to(dtype)
    return x, w


def _activation(x, scale, shift, relu):
    """The prologue applied outside the kernel, in x's dtype (eager) or float64 (reference)."""
    c = (1, -1, 1, 1)
    a = x * scale.to(x).view(c) if scale is not None else x
    a = a + shift.to(x).view(c) if shift is not None else a
    return F.relu(a) if relu else a


def _expected(x, w, bias=None, stride=1, padding=0, dilation=1, groups=1,
              in_scale=None, in_shift=None, in_relu=False, relu=False):
    """(float64 CPU reference, eager result in x's dtype or None for float32) of the fused op."""
    def run(x, w, bias):
        a = _activation(x, in_scale, in_shift, in_relu)  # F.conv2d then zero-pads the *normalized* activation
        y = F.conv2d(a, w, None if bias is None else bias.to(x), stride, padding, dilation, groups)
        return F.relu(y) if relu else y
    ref = run(x.double().cpu(), w.double().cpu(), None if bias is None else bias.double().cpu())
    eager = None if x.dtype == f32 else run(x, w, bias)
    return ref, eager


def _check(out, ref, eager, dtype):
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, ref, dtype=dtype, eager=eager)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_conv2d_matches_torch(case):
    n, c_in, c_out, hw, kernel, stride, padding, dilation, groups, dtype, channels_last = case
    x, w = _make(n, c_in, c_out, hw, kernel, groups, dtype, channels_last)
    out = conv.conv2d(x, w, None, stride, padding, dilation, groups)
    _check(out, *_expected(x, w, None, stride, padding, dilation, groups), dtype)


def _problem(n, c_in, c_out, hw, kernel, stride, padding, dilation, groups, dtype, **flags):
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    return conv.Problem(n, c_in, *hw, c_out, *pair(kernel), pair(stride), pair(padding), pair(dilation), groups, dtype,
                        **flags)


# Every candidate config of these problems is launched (the default picks one): several groups per tile
# (block-diagonal weights, a partial last group tile with 5 groups), single-group tiles, direct tiles.
# N, C_in, C_out, (H, W), kernel, stride, padding, dilation, groups, dtype, statistics
SWEEP = {
    "width16-2groups-bf16": (2, 32, 32, (5, 7), 3, 1, 1, 1, 2, bf16, False),
    "width16-5groups-stats": (1, 80, 80, (5, 4), 3, 2, 1, 1, 5, f32, True),
    "in16-out8-4groups": (2, 64, 32, (5, 5), 3, 1, 1, 1, 4, f32, False),
    "in24-out16-4groups-stats": (1, 96, 64, (5, 5), 3, 1, 1, 1, 4, f32, True),  # tiles of 2 groups: K 48 of 64
    "stem-dense-direct-stats": (2, 3, 16, (9, 9), 7, 2, 3, 1, 1, f32, True),
    "width2-direct": (2, 8, 8, (5, 5), 3, 1, 1, 1, 4, f32, False),
}
SWEEP_CONFIGS = [(name, config) for name, case in SWEEP.items()
                 for config in conv.candidates(_problem(*case[:-1], stats=case[-1]))]


@pytest.mark.parametrize("name, config", SWEEP_CONFIGS, ids=[f"{n}-{c}" for n, c in SWEEP_CONFIGS])
def test_every_candidate_config(monkeypatch, name, config):
    n, c_in, c_out, hw, kernel, stride, padding, dilation, groups, dtype, stats = SWEEP[name]
    monkeypatch.setattr(conv, "_default_config", lambda problem: config)
    x, w = _make(n, c_in, c_out, hw, kernel, groups, dtype)
    bias = torch.randn(c_out, device=DEVICE)
    result = conv.conv2d(x, w, bias, stride, padding, dilation, groups, compute_stats=stats)
    out = result[0] if stats else result
    _check(out, *_expected(x, w, bias, stride, padding, dilation, groups), dtype)
    if stats:
        ref_var, ref_mean = torch.var_mean(out.double().cpu(), dim=(0, 2, 3), unbiased=False)
        assert_close(result[1], ref_mean, dtype=f32, what="mean")
        assert_close(result[2], ref_var, dtype=f32, what="var")


def test_group_tile_padded_to_a_power_of_two_reads_only_its_groups(monkeypatch):
    """Input width 24 per group, 2 groups per tile: BLOCK_K = 64 covers the tile's 48 channels and 16 of the next
    tile's, which must not be read: an Inf there, times the zero weight, would make NaN in this tile's outputs.
    (Within a tile the weight is block-diagonal, so an Inf input of one group does make NaN in the other groups of
    its tile: group 3's outputs are not compared.)"""
    x, w = _make(1, 96, 64, (5, 5), 3, 4, bf16)
    x[0, 48:72, 2, 3] = float("inf")  # group 2's input: the second tile's first group
    config = next(c for c in conv.candidates(_problem(1, 96, 64, (5, 5), 3, 1, 1, 1, 4, bf16)) if c.group_tile == 2)
    assert config.block_k == 64
    monkeypatch.setattr(conv, "_default_config", lambda problem: config)
    out = conv.conv2d(x, w, padding=1, groups=4)[:, :48]
    ref, eager = (t[:, :48] for t in _expected(x, w, padding=1, groups=4))
    assert torch.equal(out.isfinite().cpu(), ref.isfinite()) and out[:, :32].isfinite().all()
    assert_close(out[:, :32], ref[:, :32], dtype=bf16, eager=eager[:, :32])


def test_narrow_groups_get_wide_mma_tiles():
    """At group width 16 the default tile spans 4 groups or more: a >= 64-wide MMA with a block-diagonal weight."""
    config = conv._default_config(_problem(128, 128, 128, (28, 28), 3, 1, 1, 1, 8, bf16, stats=True))
    assert config.group_tile >= 4 and config.block_n == 16 * config.group_tile and config.block_k == config.block_n


def test_weight_copy_is_cached_until_the_weight_changes():
    w = torch.randn(16, 8, 3, 3, device=DEVICE)
    first = conv._weight_for(w, direct=False)
    assert first.stride(1) == 1 and torch.equal(first, w)
    assert conv._weight_for(w, direct=False) is first  # no second copy
    with torch.no_grad():
        w.mul_(2)  # bumps the version counter
    second = conv._weight_for(w, direct=False)
    assert second is not first and torch.equal(second, w)
    direct = conv._weight_for(w, direct=True)
    assert direct.stride(0) == 1 and torch.equal(direct, w)
    channels_last = w.to(memory_format=torch.channels_last)
    assert conv._weight_for(channels_last, direct=False) is channels_last  # already in the tl.dot path's layout
    key = (id(w), False)
    del w
    assert key not in conv._WEIGHTS  # the cache does not keep dead weights' copies


def test_repeated_calls_reuse_the_weight_copy():
    x, w = _make(1, 16, 16, (5, 5), 3, 1, f32)
    first = conv.conv2d(x, w, padding=1)
    copy = conv._WEIGHTS[(id(w), False)][2]
    assert torch.equal(conv.conv2d(x, w, padding=1), first) and conv._WEIGHTS[(id(w), False)][2] is copy
    with torch.no_grad():
        w[0] = 0
    _check(conv.conv2d(x, w, padding=1), *_expected(x, w, padding=1), f32)


# C_in, C_out, groups (C_in/groups < 16: direct path), dtype, (in_scale?, in_shift?, in_relu) of the prologue
PROLOGUE_CASES = {
    "dot-scale-shift-relu": (16, 16, 1, f32, (True, True, True)),
    "direct-scale-shift-relu": (8, 8, 2, f32, (True, True, True)),
    "dot-shift-only-bf16": (32, 16, 2, bf16, (False, True, False)),
    "direct-relu-only-f16": (8, 8, 8, f16, (False, False, True)),
}


@pytest.mark.parametrize("case", PROLOGUE_CASES.values(), ids=PROLOGUE_CASES.keys())
def test_prologue_pads_with_zeros_of_the_normalized_activation(case):
    c_in, c_out, groups, dtype, (use_scale, use_shift, in_relu) = case
    x, w = _make(2, c_in, c_out, (7, 5), 3, groups, dtype)
    scale = torch.rand(c_in, device=DEVICE) + 0.5 if use_scale else None
    shift = torch.rand(c_in, device=DEVICE) + 0.5 if use_shift else None  # > 0: relu(shift) != 0 at the border
    out = conv.conv2d(x, w, padding=1, groups=groups, in_scale=scale, in_shift=shift, in_relu=in_relu)
    _check(out, *_expected(x, w, padding=1, groups=groups, in_scale=scale, in_shift=shift, in_relu=in_relu), dtype)


@pytest.mark.parametrize("c_in, groups, dtype", [(16, 1, f32), (8, 4, bf16)], ids=["dot", "direct-bf16"])
def test_bias_relu_epilogue(c_in, groups, dtype):
    x, w = _make(2, c_in, 24, (5, 7), 3, groups, dtype)
    bias = torch.randn(24, device=DEVICE)
    out = conv.conv2d(x, w, bias, padding=1, groups=groups, relu=True)
    _check(out, *_expected(x, w, bias, padding=1, groups=groups, relu=True), dtype)


@pytest.mark.parametrize("c_in, groups, dtype, bn", [(16, 1, f32, True), (8, 4, bf16, False), (32, 2, f16, True)],
                         ids=["dot-bn", "direct-bf16-identity", "grouped-dot-f16-bn"])
def test_residual_epilogue(c_in, groups, dtype, bn):
    """relu(conv + bias + residual*res_scale + res_shift): a residual block's end in inference, one launch; the
    residual in NCHW is read in the output's layout."""
    x, w = _make(2, c_in, 16, (5, 7), 3, groups, dtype)
    bias = torch.randn(16, device=DEVICE)
    residual = torch.randn(2, 16, 5, 7, device=DEVICE).to(dtype)
    res_scale, res_shift = (torch.rand(16, device=DEVICE) + 0.5, torch.randn(16, device=DEVICE)) if bn else (None, None)
    out = conv.conv2d(x, w, bias, padding=1, groups=groups, relu=True, residual=residual, res_scale=res_scale,
                      res_shift=res_shift)

    def run(x, w, bias, residual):
        r = residual if res_scale is None else residual * res_scale.to(residual).view(1, -1, 1, 1) + \
            res_shift.to(residual).view(1, -1, 1, 1)
        return F.relu(F.conv2d(x, w, bias.to(x), padding=1, groups=groups) + r)
    ref = run(*(t.double().cpu() for t in (x, w, bias, residual)))
    _check(out, ref, None if dtype == f32 else run(x, w, bias, residual), dtype)


@pytest.mark.parametrize("c_in, groups", [(16, 1), (4, 4)], ids=["dot", "direct"])
def test_nan_propagates_through_both_relus(c_in, groups):
    x, w = _make(1, c_in, 16, (5, 5), 3, groups, f32)
    x[0, :, 2, 2] = float("nan")
    out = conv.conv2d(x, w, torch.zeros(16, device=DEVICE), padding=1, groups=groups,
                      in_shift=torch.zeros(c_in, device=DEVICE), in_relu=True, relu=True)
    ref = F.relu(F.conv2d(F.relu(x.double().cpu()), w.double().cpu(), padding=1, groups=groups))
    assert torch.equal(out.isnan().cpu(), ref.isnan())


# C_in, C_out, groups, dtype, bias offset (1e4: mean 1e4 with std ~1, where E[y^2]-E[y]^2 fails), prologue?
STATS_CASES = {
    "dot": (16, 24, 1, f32, 0.0, False),
    "direct-bf16": (8, 16, 8, bf16, 0.0, False),
    "large-mean": (16, 16, 2, f32, 1e4, False),
    "direct-large-mean-prologue": (4, 8, 1, f32, 1e4, True),
}


@pytest.mark.parametrize("case", STATS_CASES.values(), ids=STATS_CASES.keys())
def test_stats_epilogue(case):
    c_in, c_out, groups, dtype, offset, prologue = case
    x, w = _make(2, c_in, c_out, (9, 7), 3, groups, dtype)
    bias = torch.randn(c_out, device=DEVICE) + offset
    bn = dict(in_scale=torch.rand(c_in, device=DEVICE) + 0.5, in_shift=torch.randn(c_in, device=DEVICE),
              in_relu=True) if prologue else {}
    out, mean, var = conv.conv2d(x, w, bias, padding=1, groups=groups, compute_stats=True, **bn)
    _check(out, *_expected(x, w, bias, padding=1, groups=groups, **bn), dtype)
    # the statistics are those of the values written
    ref_var, ref_mean = torch.var_mean(out.double().cpu(), dim=(0, 2, 3), unbiased=False)
    assert mean.dtype == var.dtype == f32
    assert_close(mean, ref_mean, dtype=f32, what="mean")
    assert_close(var, ref_var, dtype=f32, what="var")


@pytest.mark.parametrize("final_rows, sms", [(512, 132), (3, 8)], ids=["one-level", "two-level"])
def test_stats_combine(monkeypatch, final_rows, sms):
    """The statistics epilogue's combine inside the launch, over 5600 pixels (many tiles) and 70 channels (several
    channel blocks) with a mean of 1e4: the tile that completes a channel block merges all rows, or (forced)
    the last tile of each group merges the group's rows and the last group those rows (the last group partial).
    Called twice: the arrival counters are back to zero after a launch."""
    monkeypatch.setattr(conv, "_COMBINE_FINAL_ROWS", final_rows)
    monkeypatch.setattr(conv, "_SMS", sms)
    x, w = _make(2, 16, 70, (50, 56), 1, 1, f32)
    problem = conv.Problem(2, 16, 50, 56, 70, 1, 1, (1, 1), (0, 0), (1, 1), 1, f32, has_bias=True, stats=True,
                           tf32=torch.backends.cudnn.allow_tf32)
    plan = conv._stats_plan(problem, conv._choose_config(problem, make_run=None))  # the config conv2d launches
    assert plan.blocks > 1 and plan.tiles > 3 and plan.two_level == (final_rows < plan.tiles)
    if plan.two_level:
        assert plan.groups > 1 and plan.tiles % plan.group_rows
    for _ in range(2):
        bias = torch.randn(70, device=DEVICE) + 1e4
        out, mean, var = conv.conv2d(x, w, bias, compute_stats=True)
        _check(out, *_expected(x, w, bias), f32)
        ref_var, ref_mean = torch.var_mean(out.double().cpu(), dim=(0, 2, 3), unbiased=False)
        assert_close(mean, ref_mean, dtype=f32, what="mean")
        assert_close(var, ref_var, dtype=f32, what="var")
        assert all(not counters.any() for counters in arrival._COUNTERS.values())


@pytest.mark.parametrize("c_in, groups", [(16, 1), (8, 8)], ids=["dot", "direct"])
def test_int64_offsets(monkeypatch, c_in, groups):
    monkeypatch.setattr(conv, "_MAX_INT32_NUMEL", 0)
    x, w = _make(2, c_in, 16, (5, 7), 3, groups, f32)
    out, mean, var = conv.conv2d(x, w, padding=1, groups=groups, compute_stats=True)
    _check(out, *_expected(x, w, padding=1, groups=groups), f32)
    assert_close(var, torch.var(out.double().cpu(), dim=(0, 2, 3), unbiased=False), dtype=f32, what="var")


def test_empty_batch():
    x, w = _make(0, 16, 8, (5, 5), 3, 1, f32)
    out, mean, var = conv.conv2d(x, w, padding=1, compute_stats=True)
    assert out.shape == (0, 8, 5, 5) and mean.isnan().all() and var.isnan().all()


# id: (change to the valid call conv2d(x, w) as a function of x, w and a length-8 vector, expected message)
BAD = {
    "x-rank": (lambda x, w, v: dict(x=x[0]), "x: expected a 4-D"),
    "weight-rank": (lambda x, w, v: dict(weight=w[0]), "weight: expected a 4-D"),
    "x-dtype": (lambda x, w, v: dict(x=x.double(), weight=w.double()), "x: dtype"),
    "weight-dtype": (lambda x, w, v: dict(weight=w.half()), "weight: dtype"),
    "weight-device": (lambda x, w, v: dict(weight=w.to("meta")), "weight: on meta"),
    "groups-divide": (lambda x, w, v: dict(weight=w[:, :3], groups=3), "groups: 3 does not divide"),
    "groups-zero": (lambda x, w, v: dict(groups=0), "groups: expected a positive int"),
    "weight-shape": (lambda x, w, v: dict(weight=w[:, :4]), "weight: shape"),
    "bias-length": (lambda x, w, v: dict(bias=v[:7]), r"bias: expected shape \(8,\)"),
    "scale-length": (lambda x, w, v: dict(in_scale=torch.cat([v, v])), r"in_scale: expected shape \(8,\)"),
    "shift-device": (lambda x, w, v: dict(in_shift=v.to("meta")), "in_shift: on meta"),
    "shift-dtype": (lambda x, w, v: dict(in_shift=v.long()), "in_shift: expected a floating-point"),
    "stats-relu": (lambda x, w, v: dict(compute_stats=True, relu=True), "compute_stats"),
    "stats-residual": (lambda x, w, v: dict(compute_stats=True, padding=1, residual=x), "compute_stats"),
    "residual-shape": (lambda x, w, v: dict(residual=x), r"residual: expected shape \(1, 8, 3, 3\)"),
    "residual-dtype": (lambda x, w, v: dict(padding=1, residual=x.double()), "residual: torch.float64"),
    "res-scale-alone": (lambda x, w, v: dict(res_scale=v), "res_scale/res_shift: given without a residual"),
    "stride": (lambda x, w, v: dict(stride=0), "stride"),
    "padding": (lambda x, w, v: dict(padding=(1, -1)), "padding"),
    "kernel-too-large": (lambda x, w, v: dict(x=x[:, :, :2]), "x: spatial size"),
}


@pytest.mark.parametrize("change, message", BAD.values(), ids=BAD.keys())
def test_bad_inputs_raise_value_error(change, message):
    x, w = _make(1, 8, 8, (5, 5), 3, 1, f32)
    args = dict(x=x, weight=w) | change(x, w, torch.ones(8, device=DEVICE))
    with pytest.raises(ValueError, match=message):
        conv.conv2d(args.pop("x"), args.pop("weight"), **args)


# ---- GPU: real sizes ----
# Batch 8, channels_last, against torch's float64 convolution on CPU (bf16 also against eager cuDNN's own
# error). The first call of each shape and dtype autotunes: these tests spend most of their time compiling.

# N, C_in, C_out, (H, W), kernel, stride, padding, groups
REAL_SHAPES = {
    "regnet-w16-56": (8, 32, 32, (56, 56), 3, 1, 1, 2),  # group width 16: the narrowest tl.dot groups
    "regnet-w16-56-stride2": (8, 32, 32, (56, 56), 3, 2, 1, 2),
    "regnet-w16-28": (8, 80, 80, (28, 28), 3, 1, 1, 5),
    "regnet-w16-14": (8, 128, 128, (14, 14), 3, 1, 1, 8),
    "regnet-w16-7": (8, 256, 256, (7, 7), 3, 1, 1, 16),  # M = 392: few pixel tiles, many groups
    "regnet-w8-56-direct": (8, 24, 24, (56, 56), 3, 1, 1, 3),  # RegNetX-200MF's group width 8: the direct path
    "resnet-1x1": (8, 64, 256, (56, 56), 1, 1, 0, 1),
    "resnet-3x3": (8, 64, 64, (56, 56), 3, 1, 1, 1),
    "stem-7x7-stride2": (8, 3, 64, (224, 224), 7, 2, 3, 1),  # C_in_g = 3: direct path
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [bf16, f32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", REAL_SHAPES.values(), ids=REAL_SHAPES.keys())
def test_real_size(shape, dtype):
    n, c_in, c_out, hw, kernel, stride, padding, groups = shape
    x, w = _make(n, c_in, c_out, hw, kernel, groups, dtype)
    bias = torch.randn(c_out, device=DEVICE)
    out = conv.conv2d(x, w, bias, stride, padding, 1, groups)
    _check(out, *_expected(x, w, bias, stride, padding, 1, groups), dtype)


@pytest.mark.gpu
def test_real_size_tf32(monkeypatch):
    """fp32 with torch.backends.cudnn.allow_tf32 (PyTorch's default): tl.dot in TF32, with TF32's error
    (10-bit mantissa, ~5e-4): more than exact fp32's ~1e-7, or the flag did not reach the kernel."""
    from tolerances import relative_error

    n, c_in, c_out, hw, kernel, stride, padding, groups = REAL_SHAPES["resnet-3x3"]
    x, w = _make(n, c_in, c_out, hw, kernel, groups, f32)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    out = conv.conv2d(x, w, None, stride, padding)
    err = relative_error(out, _expected(x, w, None, stride, padding)[0])
    assert 1e-5 < err <= 2e-3, f"TF32 relative error {err:.3e}"


@pytest.mark.gpu
def test_real_size_prologue():
    """bn_relu_conv at RegNet's 14x14 stage: relu(x*scale + shift) while loading, bias + ReLU epilogue."""
    x, w = _make(8, 128, 128, (14, 14), 3, 8, bf16)
    bn = dict(in_scale=torch.rand(128, device=DEVICE) + 0.5, in_shift=torch.randn(128, device=DEVICE), in_relu=True)
    bias = torch.randn(128, device=DEVICE)
    out = conv.conv2d(x, w, bias, padding=1, groups=8, relu=True, **bn)
    _check(out, *_expected(x, w, bias, padding=1, groups=8, relu=True, **bn), bf16)


@pytest.mark.gpu
def test_real_size_stats():
    """Statistics epilogue over 25088 pixels (hundreds of tiles merged by the combine) with a mean of 1e4."""
    x, w = _make(8, 64, 64, (56, 56), 3, 1, f32)
    bias = torch.randn(64, device=DEVICE) + 1e4
    out, mean, var = conv.conv2d(x, w, bias, padding=1, compute_stats=True)
    _check(out, *_expected(x, w, bias, padding=1), f32)
    ref_var, ref_mean = torch.var_mean(out.double().cpu(), dim=(0, 2, 3), unbiased=False)
    assert_close(mean, ref_mean, dtype=f32, what="mean")
    assert_close(var, ref_var, dtype=f32, what="var")


@pytest.mark.gpu
def test_output_beyond_2_to_the_31_elements():
    """A 1x1 conv 3x64x2048x2048 -> 256 channels in bf16: 3.2e9 output elements (~8 GB in all) need int64
    offsets; the first rows of image 0 and the last rows of image 2 (all past 2**31) are checked."""
    if torch.cuda.mem_get_info()[0] < 12 * 2**30:
        pytest.skip("needs 12 GB of free GPU memory")
    x = torch.randn(3, 2048, 2048, 64, device=DEVICE, dtype=bf16).permute(0, 3, 1, 2)  # channels_last
    w = (torch.randn(256, 64, 1, 1, device=DEVICE) / 8).to(bf16)
    bias = torch.randn(256, device=DEVICE)
    out = conv.conv2d(x, w, bias)
    assert out.numel() > conv._MAX_INT32_NUMEL
    for img, rows in ((0, slice(0, 8)), (2, slice(-8, None))):  # 1x1, stride 1: output rows = input rows
        x_part = x[img:img + 1, :, rows]
        _check(out[img:img + 1, :, rows], *_expected(x_part, w, bias), bf16)


class _AtenOps(torch.utils._python_dispatch.TorchDispatchMode):
    """The ATen ops dispatched outside kernel launches (the interpreter copies tensors inside them)."""

    def __init__(self):
        super().__init__()
        self.ops, self.launches, self._in_launch = [], 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._in_launch:
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("groups, stats", [(2, True), (2, False), (8, True)], ids=["dot-stats", "dot", "direct-stats"])
def test_a_repeated_call_only_allocates_and_launches(monkeypatch, groups, stats):
    """Once a weight's copy is cached, conv2d dispatches no ATen compute (no weight reorder, no zero-fill):
    allocations and one launch, the statistics combine (forced to two levels) included."""
    monkeypatch.setattr(conv, "_COMBINE_FINAL_ROWS", 0)
    x, w = _make(2, 32, 32, (5, 5), 3, groups, f32)
    conv.conv2d(x, w, padding=1, groups=groups, compute_stats=stats)
    mode = _AtenOps()
    run = conv.Launch.run

    def counted(launch):
        mode.launches += 1
        mode._in_launch = True
        try:
            run(launch)
        finally:
            mode._in_launch = False

    monkeypatch.setattr(conv.Launch, "run", counted)
    with mode:
        conv.conv2d(x, w, padding=1, groups=groups, compute_stats=stats)
    assert set(mode.ops) <= {"empty", "empty_like", "empty_strided"}, mode.ops
    assert mode.launches == 1


@pytest.mark.gpu
def test_cuda_graph_capture():
    """After a warm-up call (which tunes), conv2d with statistics is captured and replayed by a CUDA graph:
    nothing in it synchronizes or reads back to the host."""
    x, w = _make(8, 64, 64, (28, 28), 3, 4, bf16)
    conv.conv2d(x, w, padding=1, groups=4, compute_stats=True)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, mean, var = conv.conv2d(x, w, padding=1, groups=4, compute_stats=True)
    x.copy_(torch.randn_like(x))
    graph.replay()
    _check(out, *_expected(x, w, padding=1, groups=4), bf16)
    ref_var, ref_mean = torch.var_mean(out.double().cpu(), dim=(0, 2, 3), unbiased=False)
    assert_close(mean, ref_mean, dtype=f32, what="mean")
    assert_close(var, ref_var, dtype=f32, what="var")
