"""Implicit-GEMM 2-D convolution over channels_last activations, with a fused prologue and epilogues.

Math. x is (N, C_in, H, W) stored NHWC, the weight (C_out, C_in_g, KH, KW) with C_in_g = C_in / G and
C_out_g = C_out / G for G groups; output channel co belongs to group g = co // C_out_g. For an output
pixel m = (n, oh, ow):

    out[m, co] = bias[co] + sum_{kh, kw, ci} a[n, ih, iw, g*C_in_g + ci] * w[co, ci, kh, kw]
    ih = oh*stride_h - pad_h + kh*dil_h,   iw = ow*stride_w - pad_w + kw*dil_w

where a = x, or a = relu?(x*in_scale[c] + in_shift[c]) with the prologue (bn_relu_conv), and a = 0
outside the image: padding zeros are zeros of the *normalized* activation. Per group this is a GEMM
with M = N*OH*OW rows (pixels), C_out_g columns and K = KH*KW*C_in_g: the A tile is gathered from x
while loading ("implicit" GEMM, nothing is unfolded in memory). The weight is read through its strides;
each path wants the weight dense with one dim innermost (in channels for tl.dot, out channels for the direct
path) and a weight laid out otherwise is copied once and the copy cached until the weight changes
(`_weight_for`; inside a CUDA graph capture the graph makes the copy itself, at every replay).

Two inner loops in one kernel, chosen by the constexpr DIRECT; each is one loop over (tap, channel
block) pairs, so that the tl.dot loop is software-pipelined across taps, not drained at each tap:
  * tl.dot (C_in_g >= 16): the grid is (pixel tiles, channel tiles, group tiles). A program covers
    GROUP_TILE consecutive groups: with GROUP_TILE = 1 a [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N] product
    per (tap, channel block) inside one group; with GROUP_TILE > 1 (narrow groups, e.g. RegNet's width
    16) the A tile spans the GROUP_TILE groups' input channels (contiguous in NHWC) and the B tile is
    block-diagonal (zero where input and output channel belong to different groups), so the MMA is
    BLOCK_N = GROUP_TILE*C_out_g wide instead of C_out_g.
  * direct (C_in_g < 16: depthwise, narrow groups, stems; too thin for an MMA's K of 16): a channel
    tile spans groups, each output channel gathering its own group's inputs, and one multiply-add of
    [BLOCK_M, BLOCK_N] per (tap, ci), on the CUDA cores. With groups == 1 (DENSE) every output channel
    reads the same input: one [BLOCK_M] load broadcast over the columns.

Configs are chosen per problem (`_choose_config`): by timing the candidates once per tuning key on a GPU
(M bucketed to a power of two, so a new batch size does not retune; candidates that fail to compile or run
out of resources skipped; trials on scratch outputs and counters), else by `_default_config`'s heuristic
(PYFAST_TRITON_AUTOTUNE=0, the interpreter, `launch_plan` for the static table, a call inside a CUDA graph
capture before its key is tuned).

Precision: accumulation is fp32 for fp16/bf16/fp32 inputs; the output is cast to x's dtype once.
fp32 operands go through tl.dot as TF32 when `torch.backends.cudnn.allow_tf32` is set (PyTorch's
default for convolutions, ~1e-3 relative error) and as exact fp32 ("ieee") otherwise; the
interpreter (TRITON_INTERPRET=1) always computes in fp32.

Epilogue with compute_stats: each pixel tile writes per-channel statistics of the values it stores
(post-bias, as rounded to the output dtype): the mean as an fp32 pair hi + lo and M2, the sum of
squared deviations from it, to a (pixel tiles, 3, C_out) fp32 buffer sized from the launched config,
nothing zero-filled. The same launch merges them with Chan's formula into the mean and biased variance
(`_combine_tile_stats`): the tile that completes its channel block's rows merges them, in a fixed order
(kernels/_arrival.py: integer arrival counters, no floating-point atomics); with many tiles in two
levels, groups of tiles first, then the groups' rows. The output is never read back for statistics.
Nothing in a launch reads back to the host, and nothing in a call synchronizes under a CUDA graph capture.
Launches run with x's device current (`_arrival.launch_device`).
"""
import functools
import math
import weakref
from dataclasses import dataclass, replace
from typing import Tuple

import torch
import triton
import triton.language as tl
import triton.testing
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources, PTXASError

from .. import _flags
from .._shapes import conv_output_size, pair
from ._arrival import _last_to_arrive, arrival_counters, launch_device

_INTERPRET = _flags.TRITON_INTERPRET
# PYFAST_TRITON_AUTOTUNE=0 launches _default_config's choice without timing: for GPU test runs, where
# tuning every new shape would cost more than the tests themselves.
_AUTOTUNE = _flags.TRITON_AUTOTUNE
# Beyond this many elements in x or out, the kernel computes its offsets in int64.
_MAX_INT32_NUMEL = 2**31 - 1
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MMA_K = 16  # smallest K of tl.dot: narrower groups take the direct path
_SMS = 132  # H100 SXM streaming multiprocessors: the default config fills them when the problem allows
_MAX_GROUP_K = 128  # widest K of a multi-group tile (GROUP_TILE * C_in_g)
_SMEM_BUDGET = 200 * 1024  # operand tiles x stages in shared memory, under the 227 KB an H100 block may use
# Triton's interpreter (3.9) keeps bf16 as raw uint16 bits: tl.dot multiplies those bits, and fp32 -> bf16
# truncates instead of rounding to nearest even. Under it the kernel works around both, so that CPU
# tests see the numbers the GPU computes.
_INTERPRETER_FIXES = tl.constexpr(_INTERPRET)


def _cdiv(a, b):
    return -(-a // b)


def _next_pow2(n):
    return 1 << max(n - 1, 0).bit_length()


@dataclass(frozen=True)
class Config:
    """One launch configuration; GROUP_TILE > 1 only for tl.dot tiles spanning groups (then
    block_n == group_tile * C_out_g and block_k is group_tile * C_in_g rounded up to a power of two)."""
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_tile: int = 1

    def __str__(self):
        groups = f" g{self.group_tile}" if self.group_tile > 1 else ""
        return f"{self.block_m}x{self.block_n}x{self.block_k}{groups} w{self.num_warps} s{self.num_stages}"


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Starting points for H100, to be tuned there.
_DOT_CONFIGS = [Config(*b) for b in [
    (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (256, 64, 32, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
    (128, 64, 32, 4, 4), (64, 64, 32, 4, 4), (128, 32, 32, 4, 4), (64, 32, 32, 4, 4), (128, 16, 16, 4, 4),
    (64, 16, 16, 2, 4)]]
# BLOCK_K is unused on the direct path.
_DIRECT_CONFIGS = [Config(*b) for b in [
    (64, 32, 1, 4, 2), (128, 32, 1, 4, 2), (256, 32, 1, 8, 2), (64, 64, 1, 4, 2), (128, 64, 1, 8, 2),
    (32, 128, 1, 4, 2), (64, 128, 1, 8, 2), (128, 16, 1, 4, 2)]]
# The statistics epilogue holds the tile's values twice (y and its deviations): tiles above this many
# accumulator elements per warp would spill (128x128 on 8 warps needs 252 registers without it).
_STATS_MAX_TILE_PER_WARP = 128 * 64 // 4
# The prologue holds the activation tile in fp32 registers while it normalizes it: a 128x128 tile on 4 warps (a
# tile of 4 groups of 24 input channels, K padded to 128) spilled 88 bytes (sm_90, bf16).
_PROLOGUE_MAX_A_TILE_PER_WARP = 128 * 64 // 4


@dataclass(frozen=True)
class Problem:
    """Everything about a conv2d call that shapes its launches (no tensors)."""
    n: int
    c_in: int
    h: int
    w: int
    c_out: int
    kh: int
    kw: int
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int
    dtype: torch.dtype
    has_bias: bool = False
    has_scale: bool = False
    has_shift: bool = False
    in_relu: bool = False
    relu: bool = False
    stats: bool = False
    has_residual: bool = False
    has_res_scale: bool = False
    has_res_shift: bool = False
    tf32: bool = True

    @property
    def oh(self):
        return self.output_size[0]

    @property
    def ow(self):
        return self.output_size[1]

    @property
    def output_size(self):
        return conv_output_size(self.h, self.w, (self.kh, self.kw), self.stride, self.padding, self.dilation)

    @property
    def m(self):
        return self.n * self.oh * self.ow

    @property
    def c_in_g(self):
        return self.c_in // self.groups

    @property
    def c_out_g(self):
        return self.c_out // self.groups

    @property
    def direct(self):
        return self.c_in_g < _MMA_K

    @property
    def channel_align(self):
        """The largest power of two, up to 16, dividing every channel count, and so every channel offset and
        stride of the dense NHWC tensors and weight: the JIT marks only ints divisible by 16, and without more a
        channel vector of RegNet's widths (multiples of 8: 72, 120, 232) loads element by element."""
        counts = math.gcd(self.c_in, self.c_out, self.c_in_g, self.c_out_g)
        return min(16, counts & -counts)

    @property
    def int64(self):
        return max(self.n * self.c_in * self.h * self.w, self.m * self.c_out) > _MAX_INT32_NUMEL

    def tuning_key(self):
        """What the best config depends on; M only as its power-of-two bucket. int64 offsets are part of it: they
        change the kernel (and its registers), and one bucket can hold problems on both sides of 2**31."""
        return (self.c_in_g, self.c_out_g, self.groups, self.kh, self.kw, self.stride, self.dilation, self.dtype,
                self.has_scale or self.has_shift or self.in_relu, self.stats, self.has_residual, self.tf32,
                self.int64, _next_pow2(self.m))


def _group_tiles(problem, config):
    """Groups per program for a tl.dot config at this problem, or 0 if the config does not fit it."""
    p = problem
    narrow = p.groups > 1 and p.c_out_g < config.block_n and (p.c_out_g & (p.c_out_g - 1)) == 0
    if not narrow:
        return 1
    tile = config.block_n // p.c_out_g
    return tile if tile <= p.groups and _group_block_k(p, tile) <= _MAX_GROUP_K else 0


def _group_block_k(problem, tile):
    """BLOCK_K of a tile of `tile` groups: their input channels (one channel block per tap), rounded up to the
    power of two tl.arange needs; the channels past them are masked (C_in_g = 24: 2 groups in a K of 64)."""
    return _next_pow2(tile * problem.c_in_g)


def candidates(problem):
    """The configs worth trying on this problem: channel tiles no wider than the channels to cover
    (several groups per tile where the groups are narrow), operand stages that fit in shared memory,
    statistics tiles small enough not to spill."""
    p = problem
    kept = []
    if p.direct:
        max_n = max(16, _next_pow2(p.c_out))
        kept = [c for c in _DIRECT_CONFIGS if c.block_n <= max_n]
    else:
        max_n = max(16, _next_pow2(p.c_out_g))
        max_k = max(16, _next_pow2(p.c_in_g))
        for c in _DOT_CONFIGS:
            tile = _group_tiles(p, c)
            if tile > 1:
                c = replace(c, block_k=_group_block_k(p, tile), group_tile=tile)
            elif tile == 0 or c.block_n > max_n or c.block_k > max_k:
                continue
            operands = (c.block_m + c.block_n) * c.block_k * c.num_stages * p.dtype.itemsize
            if c not in kept and operands <= _SMEM_BUDGET:
                kept.append(c)
    if p.has_scale or p.has_shift or p.in_relu:
        kept = [c for c in kept if c.block_m * c.block_k <= _PROLOGUE_MAX_A_TILE_PER_WARP * c.num_warps]
    if p.stats:  # int64 offsets hold more registers: 1024 accumulator elements per warp spilled (sm_90, fp16)
        per_warp = _STATS_MAX_TILE_PER_WARP // (4 if p.int64 else 1)
        kept = [c for c in kept if c.block_m * c.block_n <= per_warp * c.num_warps]
    pool = _DIRECT_CONFIGS if p.direct else _DOT_CONFIGS
    return kept or [min(pool, key=lambda c: (c.block_n, c.block_k, c.block_m))]


def _grid(problem, config):
    p = problem
    if p.direct:
        return _cdiv(p.m, config.block_m), _cdiv(p.c_out, config.block_n), 1
    columns = config.group_tile * p.c_out_g
    return (_cdiv(p.m, config.block_m), _cdiv(columns, config.block_n),
            _cdiv(p.groups, config.group_tile))


def _programs(problem, config):
    grid = _grid(problem, config)
    return grid[0] * grid[1] * grid[2]


def _default_config(problem):
    """Without timing: among the configs that give every SM a program (else those with the most programs),
    an MMA 64 wide (or as wide as the layer) with the fewest groups per tile (a block-diagonal tile of g groups
    does g times the useful multiply-adds), then the largest tile."""
    options = candidates(problem)
    filling = [c for c in options if _programs(problem, c) >= _SMS]
    if not filling:
        most = max(_programs(problem, c) for c in options)
        filling = [c for c in options if _programs(problem, c) == most]
    columns = problem.c_out if problem.groups > 1 else problem.c_out_g
    return max(filling, key=lambda c: (problem.direct or c.block_n >= min(64, columns), -c.group_tile,
                                       c.block_m * c.block_n, c.block_n, c.block_k, c.num_warps))


_TUNED = {}  # tuning key -> Config, filled once per key by timing the candidates
_CHOSEN = {}  # Problem -> Config: after the first call of a problem, choosing costs one dict look-up
# What a candidate that cannot run here raises, at compile time or at launch (registers, shared memory): tuning
# skips it, as Triton's autotuner does.
_CANDIDATE_FAILURES = (OutOfResources, PTXASError, CompilationError)


def _capturing(device):
    """Whether a CUDA graph is being captured on the current stream, that of `device` (made current by
    `launch_device`) on which the launches go."""
    return device is not None and device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _choose_config(problem, make_run, device=None):
    """The config to launch: timed once per tuning key on a GPU (`make_run(config)` returns a callable
    launching it), the default heuristic's choice otherwise. Timing synchronizes, so a call inside a CUDA
    graph capture on `device` does not tune: it launches the tuned config if there is one, else the default,
    and remembers neither (a later call outside the capture tunes)."""
    config = _CHOSEN.get(problem)
    if config is not None:
        return config
    options = candidates(problem)
    if _INTERPRET or not _AUTOTUNE or len(options) == 1:
        config = _default_config(problem)
    else:
        key = problem.tuning_key()
        config = _TUNED.get(key)
        if config is None:
            if _capturing(device):
                return _default_config(problem)
            config = _TUNED[key] = _fastest(options, make_run)
    _CHOSEN[problem] = config
    return config


def _fastest(options, make_run):
    """The config of the shortest time among those that compile and launch (the others are skipped; if none
    does, the first one's error is raised)."""
    times, failures = [], []
    for config in options:
        try:
            times.append(triton.testing.do_bench(make_run(config), warmup=5, rep=20))
        except _CANDIDATE_FAILURES as error:
            times.append(math.inf)
            failures.append(error)
    if len(failures) == len(options):
        raise failures[0]
    return options[min(range(len(options)), key=times.__getitem__)]


@triton.jit
def _multiple(n, ALIGN: tl.constexpr):
    """n, which the launcher knows to be a multiple of ALIGN, as the compiler's divisibility analysis then sees
    it (tl.multiple_of does not reach a kernel argument)."""
    return n // ALIGN * ALIGN


@triton.jit
def _cast(v, dtype: tl.constexpr):
    """v.to(dtype), rounding to nearest even as the GPU does (also under the interpreter)."""
    if _INTERPRETER_FIXES:
        if dtype == tl.bfloat16:  # round the fp32 bits to 16 so that the interpreter's truncation is exact
            bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
            bits += 0x7FFF + ((bits >> 16) & 1)
            v = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
    return v.to(dtype)


@triton.jit
def _load_activation(ptrs, mask, c, c_mask, scale_ptr, shift_ptr,
                     HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, IN_RELU: tl.constexpr):
    """Load an activation tile [rows, channels c] and apply the prologue relu?(x*scale[c] + shift[c])."""
    a = tl.load(ptrs, mask=mask, other=0.0)
    if HAS_SCALE:
        a = a.to(tl.float32) * tl.load(scale_ptr + c, mask=c_mask, other=0.0)[None, :]
    if HAS_SHIFT:
        a = a.to(tl.float32) + tl.load(shift_ptr + c, mask=c_mask, other=0.0)[None, :]
    if IN_RELU:
        a = a.to(tl.float32)  # as after the prologue (and the interpreter cannot compare bf16)
        a = tl.where(a < 0, 0.0, a)  # not tl.maximum: NaN must propagate as in torch.relu
    if HAS_SHIFT:
        a = tl.where(mask, a, 0.0)  # padding and masked lanes are zeros *after* the prologue
    return a


@triton.jit
def _store_tile_stats(y, m_mask, co, n_mask, pid_m, M, C_out, tile_stats_ptr, BLOCK_M: tl.constexpr):
    """Write this tile's per-channel mean, as hi + lo, and M2 (sum of squared deviations from the mean).

    Corrected two-pass: hi = fp32(sum y / n); s1 = sum (y - hi) is what hi's rounding missed (the
    deviations are exact near a large mean), so mean = hi + s1/n and M2 = sum (y - hi)^2 - s1^2/n.
    The combine needs lo = s1/n: one fp32 cannot hold a mean of 1e4 to better than ~5e-4.
    """
    count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
    hi = tl.sum(tl.where(m_mask[:, None], y, 0.0), axis=0) / count
    dev = tl.where(m_mask[:, None], y - hi[None, :], 0.0)
    s1 = tl.sum(dev, axis=0)
    row = tile_stats_ptr + pid_m * 3 * C_out + co
    tl.store(row, hi, mask=n_mask)
    tl.store(row + C_out, s1 / count, mask=n_mask)
    tl.store(row + 2 * C_out, tl.sum(dev * dev, axis=0) - s1 * s1 / count, mask=n_mask)


@triton.jit
def _conv2d_kernel(
    x_ptr,  # activation (N, H, W, C_in), dense NHWC
    w_ptr,  # weight (C_out, C_in_g, KH, KW) with strides w_stride_*
    bias_ptr,  # (C_out,) fp32, read if HAS_BIAS
    scale_ptr, shift_ptr,  # (C_in,) fp32 prologue scale and shift, read if HAS_SCALE / HAS_SHIFT
    out_ptr,  # output (N, OH, OW, C_out), dense NHWC, dtype of x
    res_ptr,  # residual (N, OH, OW, C_out), dense NHWC, dtype of x, read if HAS_RES
    res_scale_ptr, res_shift_ptr,  # (C_out,) fp32 residual scale and shift, read if HAS_RES_SCALE / HAS_RES_SHIFT
    tile_stats_ptr,  # (cdiv(M, BLOCK_M), 3, C_out) fp32 per tile: channel mean as hi, lo and M2, written if STATS
    group_stats_ptr,  # (groups of stats_rows tiles, 3, C_out) fp32: the groups' merged rows, if STATS_TWO_LEVEL
    mean_ptr, var_ptr,  # (C_out,) fp32 out: mean and biased variance of the output, written if STATS
    counter_ptr,  # int32 arrival counters, zero (kernels/_arrival.py), if STATS
    H, W, C_in,  # input height, width, channels
    OH, OW, C_out,  # output height, width, channels
    M,  # output pixels N*OH*OW: the GEMM's rows
    C_in_g, C_out_g,  # channels per group
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    w_stride_o, w_stride_i, w_stride_h, w_stride_w,
    stats_rows,  # STATS_TWO_LEVEL: pixel tiles per group of the combine's first level
    KH: tl.constexpr, KW: tl.constexpr,  # kernel size
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, IN_RELU: tl.constexpr,  # prologue relu?(x*scale + shift)
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr,  # epilogue: + bias, then ReLU
    HAS_RES: tl.constexpr, HAS_RES_SCALE: tl.constexpr, HAS_RES_SHIFT: tl.constexpr,  # + res*res_scale + res_shift
    STATS: tl.constexpr,  # epilogue: channel statistics of the stored output
    STATS_TWO_LEVEL: tl.constexpr,  # combine them in groups of stats_rows tiles first
    DIRECT: tl.constexpr,  # CUDA-core multiply-add over channel tiles spanning groups instead of tl.dot
    DENSE: tl.constexpr,  # direct path with groups == 1: every output channel reads the same inputs
    GROUP_TILE: tl.constexpr,  # tl.dot path: groups per program (block-diagonal weight tile if > 1)
    CHANNEL_ALIGN: tl.constexpr,  # divides C_in, C_out, C_in_g, C_out_g and the tl.dot path's weight strides
    INT64: tl.constexpr,  # offsets in int64 (x or out has 2**31 elements or more)
    DOT_PRECISION: tl.constexpr,  # tl.dot input precision for fp32 operands: "tf32" or "ieee"
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # pixels, out channels, in channels
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_g = tl.program_id(2)
    # what the launcher knows of the channel counts, told to the compiler: channel vectors then load 16 bytes at a
    # time, and asynchronously, also at widths the JIT does not mark as multiples of 16 (a 128x128 tile of a
    # 72-channel conv spilled 184 bytes without it)
    C_in = _multiple(C_in, CHANNEL_ALIGN)
    C_out = _multiple(C_out, CHANNEL_ALIGN)
    C_in_g = _multiple(C_in_g, CHANNEL_ALIGN)
    C_out_g = _multiple(C_out_g, CHANNEL_ALIGN)
    if INT64:
        pid_m = pid_m.to(tl.int64)  # every pixel offset derived below is then int64
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    ow = offs_m % OW
    oh = (offs_m // OW) % OH
    img_h = (offs_m // (OW * OH)) * H
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    if DIRECT:
        co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = co < C_out
        c_first = (co // C_out_g) * C_in_g  # first input channel of each output channel's group
        w_co = w_ptr + co * w_stride_o
        for it in range(KH * KW * C_in_g):  # (tap, input channel) pairs
            r = it // C_in_g
            ci = it - r * C_in_g
            kh = r // KW
            kw = r - kh * KW
            ih = ih0 + kh * dil_h
            iw = iw0 + kw * dil_w
            in_image = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_pix = x_ptr + ((img_h + ih) * W + iw) * C_in  # [BLOCK_M] pointers to channel 0 of each pixel
            if DENSE:  # one column of inputs, broadcast over the output channels
                c = ci + tl.zeros((1,), dtype=tl.int32)
                a = _load_activation((x_pix + ci)[:, None], in_image[:, None], c, c < C_in, scale_ptr, shift_ptr,
                                     HAS_SCALE, HAS_SHIFT, IN_RELU)
            else:
                c = c_first + ci
                a = _load_activation(x_pix[:, None] + c[None, :], in_image[:, None] & n_mask[None, :], c, n_mask,
                                     scale_ptr, shift_ptr, HAS_SCALE, HAS_SHIFT, IN_RELU)
            b = tl.load(w_co + ci * w_stride_i + kh * w_stride_h + kw * w_stride_w, mask=n_mask, other=0.0)
            acc += a.to(tl.float32) * b.to(tl.float32)[None, :]
    else:
        n_local = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # column within the group tile
        co = pid_g * GROUP_TILE * C_out_g + n_local
        n_mask = (n_local < GROUP_TILE * C_out_g) & (co < C_out)
        c_first = pid_g * GROUP_TILE * C_in_g
        k_span = GROUP_TILE * C_in_g  # input channels of the tile's groups, contiguous in NHWC
        k_blocks = tl.cdiv(k_span, BLOCK_K)
        kk = tl.arange(0, BLOCK_K)
        # the weight is dense with in channels innermost (_weight_for): its other strides are multiples of C_in_g
        w_stride_o = _multiple(w_stride_o, CHANNEL_ALIGN)
        w_stride_h = _multiple(w_stride_h, CHANNEL_ALIGN)
        w_stride_w = _multiple(w_stride_w, CHANNEL_ALIGN)
        w_co = w_ptr + co[None, :] * w_stride_o
        if GROUP_TILE > 1:  # one channel block per tap (BLOCK_K >= k_span): the block-diagonal mask is fixed
            ci_tile = kk % C_in_g
            w_mask = ((kk // C_in_g)[:, None] == (n_local // C_out_g)[None, :]) & n_mask[None, :]
            # past k_span (BLOCK_K rounded up to a power of two) are the next tile's channels: masked, since
            # a NaN there would survive the zero weights it meets
            k_tile_mask = kk < k_span
        for it in range(KH * KW * k_blocks):  # (tap, channel block) pairs: one pipelined loop
            r = it // k_blocks
            kh = r // KW
            kw = r - kh * KW
            ih = ih0 + kh * dil_h
            iw = iw0 + kw * dil_w
            in_image = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_pix = x_ptr + ((img_h + ih) * W + iw) * C_in
            w_tap = w_co + kh * w_stride_h + kw * w_stride_w
            if GROUP_TILE > 1:
                c = c_first + kk
                k_mask = k_tile_mask & (c < C_in)
                b = tl.load(w_tap + ci_tile[:, None] * w_stride_i, mask=w_mask, other=0.0)
            else:
                ci = (it - r * k_blocks) * BLOCK_K + kk
                k_mask = ci < C_in_g
                c = c_first + ci
                b = tl.load(w_tap + ci[:, None] * w_stride_i, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            a = _load_activation(x_pix[:, None] + c[None, :], in_image[:, None] & k_mask[None, :], c, k_mask,
                                 scale_ptr, shift_ptr, HAS_SCALE, HAS_SHIFT, IN_RELU)
            a = _cast(a, b.dtype)  # the prologue computes in fp32: back to the operand dtype for the MMA
            if _INTERPRETER_FIXES:  # exact fp32 products of the fp16/bf16 operands, as the MMA makes
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=n_mask, other=0.0)[None, :]
    out_offs = offs_m[:, None] * C_out + co[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if HAS_RES:  # before the ReLU: relu(conv + bias + bn_s(residual)), a residual block's end in inference
        r = tl.load(res_ptr + out_offs, mask=out_mask, other=0.0).to(tl.float32)
        if HAS_RES_SCALE:
            r = r * tl.load(res_scale_ptr + co, mask=n_mask, other=0.0)[None, :]
        if HAS_RES_SHIFT:
            r = r + tl.load(res_shift_ptr + co, mask=n_mask, other=0.0)[None, :]
        acc += r
    out_dtype = out_ptr.dtype.element_ty
    if STATS:  # of the values stored (rounded to the output dtype), before the (excluded) ReLU
        _store_tile_stats(_cast(acc, out_dtype).to(tl.float32), m_mask, co, n_mask, pid_m, M, C_out,
                          tile_stats_ptr, BLOCK_M)
    if RELU:
        acc = tl.where(acc < 0, 0.0, acc)
    tl.store(out_ptr + out_offs, _cast(acc, out_dtype), mask=out_mask)
    if STATS:
        _combine_tile_stats(tile_stats_ptr, group_stats_ptr, mean_ptr, var_ptr, counter_ptr, co, n_mask, pid_m, M,
                            C_out, stats_rows, STATS_TWO_LEVEL, BLOCK_M)


_MERGE_ROWS = tl.constexpr(16)  # rows of tile statistics merged at a time


@triton.jit
def _merge_rows(rows_ptr, first, end, co, n_mask, C, M, row_pixels):
    """(hi_0, mean - hi_0, M2, count) of channels co over rows [first, end) of (hi, lo, M2) rows of C channels,
    row t holding min(M - t*row_pixels, row_pixels) pixels; merged _MERGE_ROWS rows at a time in order of t.

    A block of rows is merged exactly about its joint mean:
        n_B = sum n_t,  mean_B = sum n_t*mean_t / n_B,  M2_B = sum M2_t + n_t*(mean_t - mean_B)^2
    and the block into the running result with Chan et al.'s pairwise formula:
        n = n_a + n_B,  d = mean_B - mean_a,  mean = mean_a + d*n_B/n,  M2 = M2_a + M2_B + d^2*n_a*n_B/n
    Only deviations are squared, so a large mean costs no precision (unlike E[y^2] - E[y]^2); the
    means are taken relative to the first row's hi: mean_t = (hi_t - hi_0) + lo_t is small and exact to
    fp32 rounding, and so is sum n_t*mean_t.
    """
    shift = tl.load(rows_ptr + first * 3 * C + co, mask=n_mask, other=0.0, cache_modifier=".cg")
    n = tl.zeros_like(shift)
    mean = tl.zeros_like(shift)
    m2 = tl.zeros_like(shift)
    for t0 in range(first, end, _MERGE_ROWS):
        t = t0 + tl.arange(0, _MERGE_ROWS)
        t_mask = t < end
        n_t = tl.where(t_mask, tl.minimum(M - t * row_pixels, row_pixels), 0).to(tl.float32)
        mask = t_mask[:, None] & n_mask[None, :]
        row = rows_ptr + t[:, None] * 3 * C + co[None, :]
        mean_t = tl.where(mask, (tl.load(row, mask=mask, other=0.0, cache_modifier=".cg") - shift[None, :])
                          + tl.load(row + C, mask=mask, other=0.0, cache_modifier=".cg"), 0.0)
        m2_t = tl.load(row + 2 * C, mask=mask, other=0.0, cache_modifier=".cg")
        n_b = tl.sum(n_t, axis=0)
        mean_b = tl.sum(n_t[:, None] * mean_t, axis=0) / tl.maximum(n_b, 1.0)
        dev = tl.where(mask, mean_t - mean_b[None, :], 0.0)
        m2_b = tl.sum(m2_t + n_t[:, None] * dev * dev, axis=0)
        n_ab = n + n_b
        d = mean_b - mean
        mean += d * (n_b / tl.maximum(n_ab, 1.0))
        m2 += m2_b + d * d * (n * n_b / tl.maximum(n_ab, 1.0))
        n = n_ab
    return shift, mean, m2, n


@triton.jit
def _store_mean_var(rows_ptr, first, end, co, n_mask, C, M, row_pixels, mean_ptr, var_ptr):
    """The mean and biased variance of channels co from rows [first, end) (see _merge_rows)."""
    shift, mean, m2, n = _merge_rows(rows_ptr, first, end, co, n_mask, C, M, row_pixels)
    tl.store(mean_ptr + co, shift + mean, mask=n_mask)
    tl.store(var_ptr + co, m2 / n, mask=n_mask)


@triton.jit
def _combine_tile_stats(tile_stats_ptr, group_stats_ptr, mean_ptr, var_ptr, counter_ptr, co, n_mask, pid_m, M, C,
                        group_rows, TWO_LEVEL: tl.constexpr, BLOCK_M: tl.constexpr):
    """After a tile's statistics row is stored: the tile that completes a count merges (kernels/_arrival.py).

    The tiles of one channel block are the programs along axis 0. One level: the last of them merges all rows
    into the mean and variance. Two levels: the last tile of each group of group_rows tiles merges the group's
    rows into a row of group_stats (its mean split as hi = fp32(hi_0 + mean) and lo = mean - (hi - hi_0)), and
    the last group to finish merges those rows.
    """
    block = tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)
    blocks = tl.num_programs(1) * tl.num_programs(2)
    tiles = tl.num_programs(0)
    if TWO_LEVEL:
        group = pid_m // group_rows
        first = group * group_rows
        end = tl.minimum(first + group_rows, tiles)
        if _last_to_arrive(counter_ptr + group * blocks + block, end - first):
            shift, mean, m2, _ = _merge_rows(tile_stats_ptr, first, end, co, n_mask, C, M, BLOCK_M)
            hi = shift + mean
            row = group_stats_ptr + group * 3 * C + co
            tl.store(row, hi, mask=n_mask)
            tl.store(row + C, mean - (hi - shift), mask=n_mask)
            tl.store(row + 2 * C, m2, mask=n_mask)
            groups = tl.cdiv(tiles, group_rows)
            if _last_to_arrive(counter_ptr + groups * blocks + block, groups):
                _store_mean_var(group_stats_ptr, 0, groups, co, n_mask, C, M, group_rows * BLOCK_M, mean_ptr, var_ptr)
    else:
        if _last_to_arrive(counter_ptr + block, tiles):
            _store_mean_var(tile_stats_ptr, 0, tiles, co, n_mask, C, M, BLOCK_M, mean_ptr, var_ptr)


@dataclass
class Launch:
    """One kernel launch: the kernel, its grid, its arguments (tensors, or for `launch_plan` their dtypes;
    None for absent pointers) and its compile options. `elements` counts what it reads and writes."""
    kernel: object
    grid: Tuple[int, int, int]
    args: dict
    num_warps: int
    num_stages: int
    config: str
    elements: int

    def run(self):
        self.kernel[self.grid](**self.args, num_warps=self.num_warps, num_stages=self.num_stages)


_COMBINE_FINAL_ROWS = 512  # most tile rows one program merges before the combine takes two levels


@dataclass(frozen=True)
class _StatsPlan:
    """How the statistics epilogue combines its tile rows at one problem and config."""
    tiles: int  # pixel tiles: rows of tile statistics per channel block
    blocks: int  # channel blocks
    two_level: bool
    group_rows: int  # tiles per group of the first level (two_level), else all tiles

    @property
    def groups(self):
        return _cdiv(self.tiles, self.group_rows) if self.two_level else 0

    @property
    def counters(self):
        return (self.groups + 1) * self.blocks  # a counter per group and channel block, then per channel block


def _stats_plan(problem, config):
    """One level while a channel block has at most _COMBINE_FINAL_ROWS tiles, else groups sized so that about
    two per SM merge (of all channel blocks), which bounds both levels' merges."""
    grid = _grid(problem, config)
    tiles, blocks = grid[0], grid[1] * grid[2]
    if tiles <= _COMBINE_FINAL_ROWS:
        return _StatsPlan(tiles, blocks, False, tiles)
    return _StatsPlan(tiles, blocks, True, max(_MERGE_ROWS.value, _next_pow2(_cdiv(tiles * blocks, 2 * _SMS))))


def _conv_launch(problem, config, tensors):
    """The convolution kernel's launch for `config`; `tensors` maps pointer names to tensors (or dtypes)
    and the weight strides."""
    grid, static_args, elements = _conv_static_args(problem, config)
    return Launch(_conv2d_kernel, grid, {**tensors, **static_args}, config.num_warps, config.num_stages, str(config),
                  elements)


@functools.lru_cache(maxsize=None)
def _conv_static_args(problem, config):
    """(grid, the int and constexpr arguments, elements touched): the same for every call of a problem."""
    p = problem
    args = dict(H=p.h, W=p.w, C_in=p.c_in, OH=p.oh, OW=p.ow, C_out=p.c_out, M=p.m, C_in_g=p.c_in_g, C_out_g=p.c_out_g,
                stride_h=p.stride[0], stride_w=p.stride[1], pad_h=p.padding[0], pad_w=p.padding[1],
                dil_h=p.dilation[0], dil_w=p.dilation[1],
                KH=p.kh, KW=p.kw, HAS_SCALE=p.has_scale, HAS_SHIFT=p.has_shift, IN_RELU=p.in_relu,
                HAS_BIAS=p.has_bias, RELU=p.relu, HAS_RES=p.has_residual, HAS_RES_SCALE=p.has_res_scale,
                HAS_RES_SHIFT=p.has_res_shift, STATS=p.stats, DIRECT=p.direct, DENSE=p.direct and p.groups == 1,
                GROUP_TILE=config.group_tile, CHANNEL_ALIGN=p.channel_align, INT64=p.int64,
                DOT_PRECISION="tf32" if p.tf32 else "ieee",
                BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k)
    plan = _stats_plan(p, config)
    args.update(STATS_TWO_LEVEL=p.stats and plan.two_level, stats_rows=plan.group_rows if p.stats else 0)
    outputs = p.m * p.c_out * (2 if p.has_residual else 1)  # the output, and the residual read beside it
    elements = p.n * p.c_in * p.h * p.w + p.c_out * p.c_in_g * p.kh * p.kw + outputs
    if p.stats:  # tile rows written and read back (the groups' rows are fewer)
        elements += 2 * plan.tiles * 3 * p.c_out
    return _grid(p, config), args, elements


def _weight_order(direct):
    """Dims of (C_out, C_in_g, KH, KW) from outermost to innermost in the layout each path reads fastest:
    out channels innermost for the direct path, in channels innermost (channels_last) for tl.dot."""
    return (2, 3, 1, 0) if direct else (0, 2, 3, 1)


def _weight_strides(weight):
    return dict(zip(("w_stride_o", "w_stride_i", "w_stride_h", "w_stride_w"), weight.stride()))


def launch_plan(problem, config=None):
    """The launches conv2d makes for `problem` with `config` (default: `_default_config`), with dtypes
    in place of tensors: for tables and ahead-of-time compiles, without a GPU."""
    config = config or _default_config(problem)
    f32, dtype = torch.float32, problem.dtype
    order = _weight_order(problem.direct)
    shape = [(problem.c_out, problem.c_in_g, problem.kh, problem.kw)[d] for d in order]
    weight_strides = _weight_strides(torch.empty(shape, device="meta").permute(*_inverse(order)))
    tensors = dict(x_ptr=dtype, w_ptr=dtype, bias_ptr=f32 if problem.has_bias else None,
                   scale_ptr=f32 if problem.has_scale else None, shift_ptr=f32 if problem.has_shift else None,
                   out_ptr=dtype, res_ptr=dtype if problem.has_residual else None,
                   res_scale_ptr=f32 if problem.has_res_scale else None,
                   res_shift_ptr=f32 if problem.has_res_shift else None,
                   **_stats_tensors(problem, config, f32, f32, lambda shape: f32, lambda count: torch.int32),
                   **weight_strides)
    return [_conv_launch(problem, config, tensors)]


def _stats_tensors(problem, config, mean, var, alloc, counters):
    """The statistics epilogue's pointers, all None without statistics: the outputs mean and var, the scratch
    rows from `alloc(shape)` and the arrival counters from `counters(count)`."""
    if not problem.stats:
        return dict.fromkeys(("tile_stats_ptr", "group_stats_ptr", "mean_ptr", "var_ptr", "counter_ptr"))
    plan = _stats_plan(problem, config)
    return dict(tile_stats_ptr=alloc((plan.tiles, 3, problem.c_out)),
                group_stats_ptr=alloc((plan.groups, 3, problem.c_out)) if plan.two_level else None,
                mean_ptr=mean, var_ptr=var, counter_ptr=counters(plan.counters))


def _inverse(order):
    return tuple(order.index(d) for d in range(len(order)))


_WEIGHTS = {}  # (id(weight), direct) -> (weakref to weight, its state, the copy in the path's layout)


def _dense_in(weight, order):
    """Whether the weight is dense with its dims in `order` from outermost to innermost (dims of size 1 aside)."""
    expected = 1
    for d in reversed(order):
        if weight.stride(d) != expected and weight.shape[d] != 1:
            return False
        expected *= weight.shape[d]
    return True


def _weight_for(weight, direct):
    """The weight as the path reads it: itself when it is already dense in the layout the path wants (the
    kernel relies on its strides being multiples of the channel counts), else a copy in that layout, cached
    per weight tensor until the weight changes (version counter, storage, dtype, shape or strides), so that
    repeated calls with one weight copy it once."""
    order = _weight_order(direct)
    if _dense_in(weight, order):
        return weight
    copy = lambda: weight.detach().permute(*order).contiguous().permute(*_inverse(order))  # noqa: E731
    if weight.is_inference():  # no version counter to tell when it changes
        return copy()
    if _capturing(weight.device):
        # A replayed graph reads what the capture launched, without asking whether the weight changed (an
        # optimizer's in-place step) or whether the cache still holds that copy. Copied inside the capture,
        # the copy is remade by every replay from the weight as it is then, and lives in the graph's memory
        # pool as long as the graph: no graph reads a cached copy, so replacing one frees nothing a graph uses.
        return copy()
    key = (id(weight), direct)
    state = (weight._version, weight.data_ptr(), weight.dtype, weight.shape, weight.stride())
    entry = _WEIGHTS.get(key)
    if entry is None or entry[0]() is not weight or entry[1] != state:
        ref = weakref.ref(weight, lambda _, key=key: _WEIGHTS.pop(key, None))
        entry = _WEIGHTS[key] = (ref, state, copy())
    return entry[2]


def _check_vector(t, name, length, device):
    """Validate a per-channel vector and return it as contiguous fp32 (or None)."""
    if t is None:
        return None
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name}: expected shape ({length},), got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: on {t.device}, x is on {device}")
    return t.to(torch.float32).contiguous()


def _check_conv_inputs(x, weight, groups, relu, compute_stats, residual):
    if x.dim() != 4:
        raise ValueError(f"x: expected a 4-D (N, C, H, W) tensor, got {x.dim()}-D")
    if weight.dim() != 4:
        raise ValueError(f"weight: expected a 4-D (C_out, C_in/groups, KH, KW) tensor, got {weight.dim()}-D")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x: dtype {x.dtype} not supported, expected one of {_DTYPES}")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight: dtype {weight.dtype} differs from x's {x.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight: on {weight.device}, x is on {x.device}")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups: expected a positive int, got {groups!r}")
    C_in, C_out = x.shape[1], weight.shape[0]
    if C_in % groups or C_out % groups:
        raise ValueError(f"groups: {groups} does not divide C_in={C_in} and C_out={C_out}")
    if weight.shape[1] != C_in // groups:
        raise ValueError(f"weight: shape {tuple(weight.shape)} needs C_in/groups = {C_in // groups} in dim 1")
    if compute_stats and relu:
        raise ValueError("compute_stats: statistics are of the pre-ReLU output, relu=True cannot be fused with them")
    if compute_stats and residual is not None:
        raise ValueError("compute_stats: statistics are of the convolution's output, a residual cannot be added")


def _checked_residual(residual, shape, x):
    """The residual as the epilogue reads it: the output's shape, x's dtype and device, dense NHWC (copied to
    channels_last if it is not)."""
    if tuple(residual.shape) != shape:
        raise ValueError(f"residual: expected shape {shape}, got {tuple(residual.shape)}")
    if residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(f"residual: {residual.dtype} on {residual.device}, x is {x.dtype} on {x.device}")
    return residual.contiguous(memory_format=torch.channels_last)


def conv2d(x, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, *,
           in_scale=None, in_shift=None, in_relu=False, relu=False, compute_stats=False, residual=None,
           res_scale=None, res_shift=None):
    """Grouped 2-D convolution of x (N, C_in, H, W) by weight (C_out, C_in/groups, KH, KW).

    Prologue: x is replaced by relu?(x*in_scale[c] + in_shift[c]) as it is loaded (in_scale/in_shift
    of length C_in, either may be None), padding being zeros of that result. Epilogue: + bias, + residual
    *res_scale[c] + res_shift[c] (a tensor of the output's shape and x's dtype; either vector may be None), then
    ReLU if `relu`. With compute_stats also returns the per-channel mean and biased variance (fp32) of
    the output (post-bias; incompatible with relu and a residual).
    Returns a channels_last tensor of x's dtype. NCHW input is copied to channels_last first (one
    extra read and write of x). fp32 convolves in TF32 when torch.backends.cudnn.allow_tf32 is set.
    """
    stride, padding, dilation = pair(stride, "stride", 1), pair(padding, "padding", 0), pair(dilation, "dilation", 1)
    _check_conv_inputs(x, weight, groups, relu, compute_stats, residual)
    N, C_in, H, W = x.shape
    C_out, _, KH, KW = weight.shape
    bias = _check_vector(bias, "bias", C_out, x.device)
    in_scale = _check_vector(in_scale, "in_scale", C_in, x.device)
    in_shift = _check_vector(in_shift, "in_shift", C_in, x.device)
    res_scale = _check_vector(res_scale, "res_scale", C_out, x.device)
    res_shift = _check_vector(res_shift, "res_shift", C_out, x.device)
    if residual is None and (res_scale is not None or res_shift is not None):
        raise ValueError("res_scale/res_shift: given without a residual")
    problem = Problem(N, C_in, H, W, C_out, KH, KW, stride, padding, dilation, groups, x.dtype,
                      has_bias=bias is not None, has_scale=in_scale is not None, has_shift=in_shift is not None,
                      in_relu=in_relu, relu=relu, stats=compute_stats, has_residual=residual is not None,
                      has_res_scale=res_scale is not None, has_res_shift=res_shift is not None,
                      tf32=torch.backends.cudnn.allow_tf32)
    if problem.oh < 1 or problem.ow < 1:
        raise ValueError(f"x: spatial size {(H, W)} with padding {padding} is smaller than the dilated kernel")
    if residual is not None:
        residual = _checked_residual(residual, (N, C_out, problem.oh, problem.ow), x)

    x = x.contiguous(memory_format=torch.channels_last)
    out = torch.empty((N, C_out, problem.oh, problem.ow), device=x.device, dtype=x.dtype,
                      memory_format=torch.channels_last)
    if problem.m == 0 or C_out == 0:
        if not compute_stats:
            return out
        nan = torch.full((C_out,), float("nan"), device=x.device)
        return out, nan, nan.clone()
    mean = torch.empty(C_out, device=x.device, dtype=torch.float32) if compute_stats else None
    var = torch.empty_like(mean) if compute_stats else None

    def launch(config, trial=False):
        """The launch of `config`. A tuning trial writes scratch outputs and zeroed arrival counters of its own:
        a failed or repeated trial leaves nothing behind in the call's results or the shared counters."""
        outputs = (out, mean, var)
        if trial:
            outputs = [None if t is None else torch.empty_like(t) for t in outputs]
        counters = (lambda count: torch.zeros(count, dtype=torch.int32, device=x.device)) if trial else \
            (lambda count: arrival_counters(x.device, count))
        stats = _stats_tensors(problem, config, outputs[1], outputs[2],
                               lambda shape: torch.empty(shape, device=x.device, dtype=torch.float32), counters)
        return _conv_launch(problem, config, dict(x_ptr=x, w_ptr=w, bias_ptr=bias, scale_ptr=in_scale,
                                                  shift_ptr=in_shift, out_ptr=outputs[0], res_ptr=residual,
                                                  res_scale_ptr=res_scale, res_shift_ptr=res_shift, **stats,
                                                  **_weight_strides(w)))

    with launch_device(x.device):  # and its stream is the one a graph capture is asked about
        w = _weight_for(weight, problem.direct)
        launch(_choose_config(problem, lambda c: launch(c, trial=True).run, x.device)).run()
    return (out, mean, var) if compute_stats else out
