"""Implicit-GEMM 2-D convolution over channels_last activations, with a fused prologue and epilogues.

Math. x is (N, C_in, H, W) stored NHWC, the weight (C_out, C_in_g, KH, KW) with C_in_g = C_in / G and
C_out_g = C_out / G for G groups; output channel co belongs to group g = co // C_out_g. For an output
pixel m = (n, oh, ow):

    out[m, co] = bias[co] + sum_{kh, kw, ci} a[n, ih, iw, g*C_in_g + ci] * w[co, ci, kh, kw]
    ih = oh*stride_h - pad_h + kh*dil_h,   iw = ow*stride_w - pad_w + kw*dil_w

where a = x, or a = relu?(x*in_scale[c] + in_shift[c]) with the prologue (bn_relu_conv), and a = 0
outside the image: padding zeros are zeros of the *normalized* activation. Per group this is a GEMM
with M = N*OH*OW rows (pixels), C_out_g columns and K = KH*KW*C_in_g: the A tile is gathered from x
while loading ("implicit" GEMM, nothing is unfolded in memory), B is the weight reordered once per
call to (KH*KW*C_in_g, C_out), output channels contiguous.

Two inner loops in one kernel, chosen by the constexpr DIRECT:
  * tl.dot (C_in_g >= 16): the grid is (pixel tiles, channel tiles of one group, groups); a tile
    multiplies [BLOCK_M, BLOCK_K] activations by [BLOCK_K, BLOCK_N] weights per kernel tap (kh, kw),
    masking the channels past the group's end.
  * direct (C_in_g < 16: depthwise and narrow groups, too thin for an MMA's K of 16): a channel tile
    spans groups, each output channel gathering its own group's inputs, and one multiply-add of
    [BLOCK_M, BLOCK_N] per (kh, kw, ci), on the CUDA cores, so no MMA lanes are wasted on padding.

Precision: accumulation is fp32 for fp16/bf16/fp32 inputs; the output is cast to x's dtype once.
fp32 operands go through tl.dot as TF32 when `torch.backends.cudnn.allow_tf32` is set (PyTorch's
default for convolutions, ~1e-3 relative error) and as exact fp32 ("ieee") otherwise; the
interpreter (TRITON_INTERPRET=1) always computes in fp32.

Epilogue with compute_stats: each pixel tile writes per-channel statistics of the values it stores
(post-bias, as rounded to the output dtype): the mean as an fp32 pair hi + lo and M2, the sum of
squared deviations from it, to a (num_pixel_tiles, 3, C_out) fp32 buffer, no atomics.
`_stats_combine_kernel` merges the tiles with Chan's formula into the mean and biased variance, so
the output is never read back for statistics.
"""
import torch
import triton
import triton.language as tl

from .. import _flags
from .._shapes import conv_output_size, pair

_INTERPRET = _flags.TRITON_INTERPRET
# PYFAST_TRITON_AUTOTUNE=0 keeps one config per kernel: for GPU test runs, where tuning every new
# shape would cost more than the tests themselves.
_AUTOTUNE = _flags.TRITON_AUTOTUNE
# Beyond this many elements in x or out, the kernel computes its offsets in int64.
_MAX_INT32_NUMEL = 2**31 - 1
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MMA_K = 16  # smallest K of tl.dot: narrower groups take the direct path
# Triton's interpreter (3.9) keeps bf16 as raw uint16 bits: tl.dot multiplies those bits, and fp32 -> bf16
# truncates instead of rounding to nearest even. Under it the kernel works around both, so that CPU
# tests see the numbers the GPU computes.
_INTERPRETER_FIXES = tl.constexpr(_INTERPRET)


def _configs(blocks, interpret_blocks, untuned):
    """Autotune configs; one fixed config in the interpreter, where each tuning run costs seconds, and
    only blocks[untuned] when autotuning is off."""
    if _INTERPRET:
        return [triton.Config(interpret_blocks)]
    if not _AUTOTUNE:
        blocks = [blocks[untuned]]
    return [triton.Config(dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), b[:3])), num_warps=b[3], num_stages=b[4])
            for b in blocks]


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Starting points for H100, to be tuned there.
_DOT_CONFIGS = _configs(
    [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (256, 64, 32, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
     (128, 64, 32, 4, 4), (64, 64, 32, 4, 4), (128, 32, 32, 4, 4), (64, 32, 32, 4, 4), (128, 32, 16, 4, 4),
     (128, 16, 16, 4, 4), (64, 16, 16, 2, 4)],
    {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16}, untuned=6)
# BLOCK_K is unused on the direct path.
_DIRECT_CONFIGS = _configs(
    [(64, 32, 1, 4, 2), (128, 32, 1, 4, 2), (256, 32, 1, 8, 2), (64, 64, 1, 4, 2), (128, 64, 1, 8, 2),
     (32, 128, 1, 4, 2), (64, 128, 1, 8, 2), (128, 16, 1, 4, 2)],
    {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 1}, untuned=0)


def _prune_configs(configs, named_args, **kwargs):
    """Drop configs whose channel tiles are wider than the next power of two of the channels to cover."""
    args = {**named_args, **kwargs}
    cols = args["C_out"] if args["DIRECT"] else args["C_out_g"]
    depth = 1 if args["DIRECT"] else args["C_in_g"]
    max_n, max_k = max(16, triton.next_power_of_2(cols)), max(16, triton.next_power_of_2(depth))
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= max_n and c.kwargs["BLOCK_K"] <= max_k]
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]))]


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
def _load_activation(ptrs, mask, c, c_mask, scale_ptr, shift_ptr, PROLOGUE: tl.constexpr, IN_RELU: tl.constexpr):
    """Load an activation tile [rows, channels c] and apply the prologue relu?(x*scale[c] + shift[c])."""
    a = tl.load(ptrs, mask=mask, other=0.0)
    if PROLOGUE:
        scale = tl.load(scale_ptr + c, mask=c_mask, other=0.0)
        shift = tl.load(shift_ptr + c, mask=c_mask, other=0.0)
        a = a.to(tl.float32) * scale[None, :] + shift[None, :]
    if IN_RELU:
        a = a.to(tl.float32)  # as after the prologue (and the interpreter cannot compare bf16)
        a = tl.where(a < 0, 0.0, a)  # not tl.maximum: NaN must propagate as in torch.relu
    if PROLOGUE:
        a = tl.where(mask, a, 0.0)  # padding and masked lanes are zeros *after* the prologue
    return a


@triton.jit
def _store_tile_stats(y, m_mask, co, n_mask, pid_m, pid_n, pid_g, M, C_out,
                      tile_stats_ptr, tile_count_ptr, BLOCK_M: tl.constexpr):
    """Write this tile's per-channel mean, as hi + lo, and M2 (sum of squared deviations from the mean).

    Corrected two-pass: hi = fp32(sum y / n); s1 = sum (y - hi) is what hi's rounding missed (the
    deviations are exact near a large mean), so mean = hi + s1/n and M2 = sum (y - hi)^2 - s1^2/n.
    The combine needs lo = s1/n: one fp32 cannot hold a mean of 1e4 to better than ~5e-4.
    """
    count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M)
    hi = tl.sum(tl.where(m_mask[:, None], y, 0.0), axis=0) / count
    dev = tl.where(m_mask[:, None], y - hi[None, :], 0.0)
    s1 = tl.sum(dev, axis=0)
    row = tile_stats_ptr + pid_m * 3 * C_out + co
    tl.store(row, hi, mask=n_mask)
    tl.store(row + C_out, s1 / count, mask=n_mask)
    tl.store(row + 2 * C_out, tl.sum(dev * dev, axis=0) - s1 * s1 / count, mask=n_mask)
    # The count is the same for every channel tile: one program per pixel tile writes it.
    tl.store(tile_count_ptr + pid_m, count.to(tl.float32), mask=(pid_n == 0) & (pid_g == 0))


@triton.jit
def _conv2d_kernel(
    x_ptr,  # activation (N, H, W, C_in), dense NHWC
    w_ptr,  # weight reordered to (KH*KW*C_in_g, C_out): row (kh*KW + kw)*C_in_g + ci, out channels contiguous
    bias_ptr,  # (C_out,) fp32, read if HAS_BIAS
    scale_ptr, shift_ptr,  # (C_in,) fp32 prologue scale and shift, read if PROLOGUE
    out_ptr,  # output (N, OH, OW, C_out), dense NHWC, dtype of x
    tile_stats_ptr,  # (num_pixel_tiles, 3, C_out) fp32 per tile: channel mean as hi, lo and M2, written if STATS
    tile_count_ptr,  # (num_pixel_tiles,) fp32 valid pixels per tile, written if STATS
    H, W, C_in,  # input height, width, channels
    OH, OW, C_out,  # output height, width, channels
    M,  # output pixels N*OH*OW: the GEMM's rows
    C_in_g, C_out_g,  # channels per group
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr,  # kernel size
    PROLOGUE: tl.constexpr, IN_RELU: tl.constexpr,  # x -> x*scale + shift, then ReLU, while loading
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr,  # epilogue: + bias, then ReLU
    STATS: tl.constexpr,  # epilogue: per-tile channel statistics of the stored output
    DIRECT: tl.constexpr,  # CUDA-core multiply-add over channel tiles spanning groups instead of tl.dot
    INT64: tl.constexpr,  # offsets in int64 (x or out has 2**31 elements or more)
    DOT_PRECISION: tl.constexpr,  # tl.dot input precision for fp32 operands: "tf32" or "ieee"
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # pixels, out channels, in channels
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_g = tl.program_id(2)
    if INT64:
        pid_m = pid_m.to(tl.int64)  # every pixel offset derived below is then int64
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    ow = offs_m % OW
    oh = (offs_m // OW) % OH
    img = offs_m // (OW * OH)
    if DIRECT:
        co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = co < C_out
        c_first = (co // C_out_g) * C_in_g  # first input channel of each output channel's group
    else:
        co_g = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = co_g < C_out_g
        co = pid_g * C_out_g + co_g
        c_first = pid_g * C_in_g

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in range(KH * KW):  # kernel taps
        ih = oh * stride_h - pad_h + (r // KW) * dil_h
        iw = ow * stride_w - pad_w + (r % KW) * dil_w
        in_image = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_pix = x_ptr + ((img * H + ih) * W + iw) * C_in  # [BLOCK_M] pointers to channel 0 of each pixel
        w_tap = w_ptr + r * C_in_g * C_out
        if DIRECT:
            mask = in_image[:, None] & n_mask[None, :]
            for ci in range(C_in_g):
                c = c_first + ci
                a = _load_activation(x_pix[:, None] + c[None, :], mask, c, n_mask, scale_ptr, shift_ptr,
                                     PROLOGUE, IN_RELU)
                b = tl.load(w_tap + ci * C_out + co, mask=n_mask, other=0.0)
                acc += a.to(tl.float32) * b.to(tl.float32)[None, :]
        else:
            for k0 in range(0, C_in_g, BLOCK_K):
                ci = k0 + tl.arange(0, BLOCK_K)
                k_mask = ci < C_in_g
                c = c_first + ci
                a = _load_activation(x_pix[:, None] + c[None, :], in_image[:, None] & k_mask[None, :], c, k_mask,
                                     scale_ptr, shift_ptr, PROLOGUE, IN_RELU)
                b = tl.load(w_tap + ci[:, None] * C_out + co[None, :], mask=k_mask[:, None] & n_mask[None, :],
                            other=0.0)
                a = _cast(a, b.dtype)  # the prologue computes in fp32: back to the operand dtype for the MMA
                if _INTERPRETER_FIXES:  # exact fp32 products of the fp16/bf16 operands, as the MMA makes
                    a, b = a.to(tl.float32), b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=n_mask, other=0.0)[None, :]
    out_dtype = out_ptr.dtype.element_ty
    if STATS:  # of the values stored (rounded to the output dtype), before the (excluded) ReLU
        _store_tile_stats(_cast(acc, out_dtype).to(tl.float32), m_mask, co, n_mask, pid_m, pid_n, pid_g, M, C_out,
                          tile_stats_ptr, tile_count_ptr, BLOCK_M)
    if RELU:
        acc = tl.where(acc < 0, 0.0, acc)
    tl.store(out_ptr + offs_m[:, None] * C_out + co[None, :], _cast(acc, out_dtype),
             mask=m_mask[:, None] & n_mask[None, :])


_AUTOTUNE_KEY = ["C_in_g", "C_out_g", "KH", "KW", "stride_h", "stride_w", "M", "PROLOGUE", "STATS", "DOT_PRECISION"]
# One kernel, two tuning tables: the paths favour different tile shapes. Tile counts are zeroed before
# each tuning run, or rows written by a config with a smaller BLOCK_M would survive into the combine.
_TUNING = dict(key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_configs},
               reset_to_zero=["tile_count_ptr"])
_conv2d_dot = triton.autotune(_DOT_CONFIGS, **_TUNING)(_conv2d_kernel)
_conv2d_direct = triton.autotune(_DIRECT_CONFIGS, **_TUNING)(_conv2d_kernel)


@triton.jit
def _stats_combine_kernel(
    tile_stats_ptr,  # (T, 3, C) fp32 per tile: channel mean as hi + lo, and M2; rows whose count is 0 are ignored
    tile_count_ptr,  # (T,) fp32 pixels per tile (0 for rows no tile wrote)
    mean_ptr, var_ptr,  # (C,) fp32 outputs: mean and biased variance
    T, C,  # rows and channels of the tile buffers
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Merge per-tile (n_t, mean_t, M2_t) into per-channel mean and biased variance M2 / n.

    BLOCK_T tiles are merged exactly about their joint mean:
        n_B = sum n_t,  mean_B = sum n_t*mean_t / n_B,  M2_B = sum M2_t + n_t*(mean_t - mean_B)^2
    and the block into the running result with Chan et al.'s pairwise formula:
        n = n_a + n_B,  d = mean_B - mean_a,  mean = mean_a + d*n_B/n,  M2 = M2_a + M2_B + d^2*n_a*n_B/n
    Only deviations are squared, so a large mean costs no precision (unlike E[y^2] - E[y]^2); the
    means are taken relative to tile 0's hi (always written): mean_t = (hi_t - hi_0) + lo_t is small
    and exact to fp32 rounding, and so is sum n_t*mean_t.
    """
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    shift = tl.load(tile_stats_ptr + c, mask=c_mask, other=0.0)
    n = tl.zeros((BLOCK_C,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        n_t = tl.load(tile_count_ptr + t, mask=t < T, other=0.0)
        mask = (n_t > 0)[:, None] & c_mask[None, :]
        rows = tile_stats_ptr + t[:, None] * 3 * C + c[None, :]
        hi = tl.load(rows, mask=mask, other=0.0)
        lo = tl.load(rows + C, mask=mask, other=0.0)
        mean_t = tl.where(mask, (hi - shift[None, :]) + lo, 0.0)
        m2_t = tl.load(rows + 2 * C, mask=mask, other=0.0)
        n_b = tl.sum(n_t, axis=0)
        mean_b = tl.sum(n_t[:, None] * mean_t, axis=0) / tl.maximum(n_b, 1.0)
        dev = tl.where(mask, mean_t - mean_b[None, :], 0.0)
        m2_b = tl.sum(m2_t + n_t[:, None] * dev * dev, axis=0)
        n_ab = n + n_b
        d = mean_b - mean
        mean += d * (n_b / tl.maximum(n_ab, 1.0))
        m2 += m2_b + d * d * (n * n_b / tl.maximum(n_ab, 1.0))
        n = n_ab
    tl.store(mean_ptr + c, shift + mean, mask=c_mask)
    tl.store(var_ptr + c, m2 / n, mask=c_mask)


def _combine_stats(tile_stats, tile_count, block_t=64):
    """Per-channel (mean, biased var) from the conv kernel's (T, 3, C) tile statistics and (T,) counts."""
    T, _, C = tile_stats.shape
    mean = torch.empty(C, device=tile_stats.device, dtype=torch.float32)
    var = torch.empty_like(mean)
    block_c = min(64, triton.next_power_of_2(C))
    _stats_combine_kernel[(triton.cdiv(C, block_c),)](tile_stats, tile_count, mean, var, T, C,
                                                      BLOCK_T=block_t, BLOCK_C=block_c)
    return mean, var


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


def _check_conv_inputs(x, weight, groups, relu, compute_stats):
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


def conv2d(x, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, *,
           in_scale=None, in_shift=None, in_relu=False, relu=False, compute_stats=False):
    """Grouped 2-D convolution of x (N, C_in, H, W) by weight (C_out, C_in/groups, KH, KW).

    Prologue: x is replaced by relu?(x*in_scale[c] + in_shift[c]) as it is loaded (in_scale/in_shift
    of length C_in, either may be None), padding being zeros of that result. Epilogue: + bias, then
    ReLU if `relu`. With compute_stats also returns the per-channel mean and biased variance (fp32) of
    the output (post-bias; incompatible with relu).
    Returns a channels_last tensor of x's dtype. NCHW input is copied to channels_last first (one
    extra read and write of x). fp32 convolves in TF32 when torch.backends.cudnn.allow_tf32 is set.
    """
    stride, padding, dilation = pair(stride, "stride", 1), pair(padding, "padding", 0), pair(dilation, "dilation", 1)
    _check_conv_inputs(x, weight, groups, relu, compute_stats)
    N, C_in, H, W = x.shape
    C_out, C_in_g, KH, KW = weight.shape
    bias = _check_vector(bias, "bias", C_out, x.device)
    in_scale = _check_vector(in_scale, "in_scale", C_in, x.device)
    in_shift = _check_vector(in_shift, "in_shift", C_in, x.device)
    OH, OW = conv_output_size(H, W, (KH, KW), stride, padding, dilation)
    if OH < 1 or OW < 1:
        raise ValueError(f"x: spatial size {(H, W)} with padding {padding} is smaller than the dilated kernel")

    x = x.contiguous(memory_format=torch.channels_last)
    w = weight.permute(2, 3, 1, 0).contiguous().view(KH * KW * C_in_g, C_out)
    out = torch.empty((N, C_out, OH, OW), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    M = N * OH * OW
    prologue = in_scale is not None or in_shift is not None
    if prologue:
        in_scale = torch.ones(C_in, device=x.device) if in_scale is None else in_scale
        in_shift = torch.zeros(C_in, device=x.device) if in_shift is None else in_shift
    direct = C_in_g < _MMA_K
    kernel, configs = (_conv2d_direct, _DIRECT_CONFIGS) if direct else (_conv2d_dot, _DOT_CONFIGS)
    # Sized for the smallest BLOCK_M; rows past the chosen config's tiles keep count 0 and are skipped.
    tiles = triton.cdiv(M, min(c.kwargs["BLOCK_M"] for c in configs)) if compute_stats else 0
    tile_stats = torch.empty((tiles, 3, C_out), device=x.device, dtype=torch.float32)
    tile_count = torch.zeros(tiles, device=x.device, dtype=torch.float32)

    if M and C_out:
        cols, grid_g = (C_out, 1) if direct else (C_out // groups, groups)
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(cols, meta["BLOCK_N"]), grid_g)  # noqa: E731
        kernel[grid](
            x_ptr=x, w_ptr=w, bias_ptr=out if bias is None else bias,
            scale_ptr=in_scale if prologue else out, shift_ptr=in_shift if prologue else out,
            out_ptr=out, tile_stats_ptr=tile_stats, tile_count_ptr=tile_count,
            H=H, W=W, C_in=C_in, OH=OH, OW=OW, C_out=C_out, M=M, C_in_g=C_in_g, C_out_g=C_out // groups,
            stride_h=stride[0], stride_w=stride[1], pad_h=padding[0], pad_w=padding[1],
            dil_h=dilation[0], dil_w=dilation[1], KH=KH, KW=KW,
            PROLOGUE=prologue, IN_RELU=in_relu, HAS_BIAS=bias is not None, RELU=relu, STATS=compute_stats,
            DIRECT=direct, INT64=max(x.numel(), out.numel()) > _MAX_INT32_NUMEL,
            DOT_PRECISION="tf32" if torch.backends.cudnn.allow_tf32 else "ieee",
        )
    if not compute_stats:
        return out
    if out.numel() == 0:
        nan = torch.full((C_out,), float("nan"), device=x.device)
        return out, nan, nan.clone()
    return (out, *_combine_stats(tile_stats, tile_count))
