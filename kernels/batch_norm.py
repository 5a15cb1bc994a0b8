"""Triton kernels for the five batch-norm primitives of docs/ARCHITECTURE.md, section 1: bn_stats,
bn_finalize, bn_act_forward, bn_act_backward_reduce and bn_act_backward_elemt, each a kernel (or two) and
its launcher. What they share (the [G, C, L] walk, tile configs, @triton.jit helpers, argument checks) is in
kernels/_bn_common.py.

Optional per-channel tensors become constexpr flags of one kernel per pass. Reductions are one launch and
deterministic: every program writes its per-channel partials (count, mean, M2 or sums) to a small [k, S, C]
buffer, and the program that completes a channel block's partials combines them in a fixed order
(kernels/_arrival.py); no floating-point atomics.
"""
import torch
import triton
import triton.language as tl

from ._arrival import _last_to_arrive, arrival_counters, launch_device
from ._bn_common import (_Args, _DTYPES, _ELEMENTWISE_CONFIGS, _FINALIZE_BLOCK_C,
                          _INTERPRET, _REDUCTION_CONFIGS, _TUNING, _acc_of, _aligned_sizes, _chan_merge, _chunk,
                          _contiguous, _elementwise_grid, _load_affine, _offsets, _per_channel, _pre_activation,
                          _prepare_input, _relu, _relu_grad, _require, _tl_dtype)


@triton.autotune(configs=_REDUCTION_CONFIGS, **_TUNING)
@triton.jit
def _bn_stats_kernel(
    x_ptr,  # input, a [G, C, L] view
    partial_ptr,  # scratch: [3, S, C] acc dtype, per-program count, mean and M2 of each channel
    mean_ptr, var_ptr,  # out: [C] acc dtype, mean and biased variance
    counter_ptr,  # int32 arrival counters, one per channel block, zero (kernels/_arrival.py)
    G, C, L,  # sizes of the view (G is also part of the autotune key)
    splits_per_g, chunk,  # program s covers positions [(s % splits_per_g)*chunk, +chunk) of row s // splits_per_g
    CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr, ALIGN: tl.constexpr,  # layout, 64-bit offsets, alignment
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,  # tile
):
    """Per-channel count, mean and M2 = sum (x - mean)^2 over one chunk; the last program of a channel block
    to finish combines the S chunks into the mean and biased variance.

    Full tiles run Welford's update per lane, with one count for all lanes:
        n += 1;  d = x - m;  m += d / n;  M2 += d * (x - m)
    then the lanes and the last, partial tile are merged with Chan's formula. No E[x^2] - E[x]^2 anywhere.
    """
    C, L = _aligned_sizes(C, L, CHANNELS_LAST, ALIGN)
    g, l_start, l_end = _chunk(splits_per_g, chunk, L)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    m = tl.zeros([BLOCK_C, BLOCK_L], ACC)
    m2 = tl.zeros([BLOCK_C, BLOCK_L], ACC)
    n_full = (l_end - l_start) // BLOCK_L
    for i in range(0, n_full):
        offs = _offsets(g, c, l_start + i * BLOCK_L + tl.arange(0, BLOCK_L), C, L, CHANNELS_LAST, INT64)
        x = tl.load(x_ptr + offs, mask=cmask[:, None], other=0.0).to(ACC)
        delta = x - m
        m += delta * (1.0 / tl.cast(i + 1, ACC))
        m2 += delta * (x - m)
    # The lanes: BLOCK_L sets of n_full values each.
    count = (n_full * BLOCK_L).to(ACC)
    mean = tl.sum(m, 1) / BLOCK_L
    spread = m - mean[:, None]
    m2_c = tl.sum(m2, 1) + n_full.to(ACC) * tl.sum(spread * spread, 1)
    # The partial tile at the end of the row, two-pass in registers.
    l = l_start + n_full * BLOCK_L + tl.arange(0, BLOCK_L)
    mask = cmask[:, None] & (l < l_end)[None, :]
    x = tl.load(x_ptr + _offsets(g, c, l, C, L, CHANNELS_LAST, INT64), mask=mask, other=0.0).to(ACC)
    n_t = (l_end - l_start - n_full * BLOCK_L).to(ACC)
    mean_t = tl.sum(x, 1) / tl.maximum(n_t, 1.0)
    dev = tl.where(mask, x - mean_t[:, None], 0.0)
    count, mean, m2_c = _chan_merge(count, mean, m2_c, n_t, mean_t, tl.sum(dev * dev, 1))
    out = partial_ptr + tl.program_id(0) * C + c
    S = tl.num_programs(0)
    tl.store(out, count + tl.zeros_like(mean), mask=cmask)
    tl.store(out + S * C, mean, mask=cmask)
    tl.store(out + 2 * S * C, m2_c, mask=cmask)
    if _last_to_arrive(counter_ptr + tl.program_id(1), S):
        _combine_stats(partial_ptr, mean_ptr, var_ptr, c, cmask, C, S, ACC, BLOCK_C, BLOCK_L)


@triton.jit
def _combine_stats(partial_ptr, mean_ptr, var_ptr, c, cmask, C, S, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_S: tl.constexpr):
    """Chan's combine of the S (count, mean, M2) partials of channels c, BLOCK_S at a time in order of s;
    var = M2 / count (biased).

    Per block of partials: n = sum n_s, mean = sum n_s mean_s / n, M2 = sum M2_s + n_s (mean_s - mean)^2,
    then merged into the running result with _chan_merge.
    """
    n = tl.zeros([BLOCK_C], ACC)
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = cmask[:, None] & (s < S)[None, :]
        ptrs = partial_ptr + s[None, :] * C + c[:, None]
        n_s = tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")
        mean_s = tl.load(ptrs + S * C, mask=mask, other=0.0, cache_modifier=".cg")
        m2_s = tl.load(ptrs + 2 * S * C, mask=mask, other=0.0, cache_modifier=".cg")
        n_b = tl.sum(n_s, 1)
        mean_b = tl.sum(n_s * mean_s, 1) / tl.maximum(n_b, 1.0)
        dev = mean_s - mean_b[:, None]
        n, mean, m2 = _chan_merge(n, mean, m2, n_b, mean_b, tl.sum(m2_s + n_s * dev * dev, 1))
    tl.store(mean_ptr + c, mean, mask=cmask)
    tl.store(var_ptr + c, m2 / tl.maximum(n, 1.0), mask=cmask)  # n > 0 for every real channel


def bn_stats(x):
    """Per-channel mean and biased variance of a 4-D tensor over N*H*W, in the acc dtype; one launch."""
    x, view = _prepare_input(x)
    acc = _acc_of(x)
    mean = torch.empty(view.C, dtype=acc, device=x.device)
    var = torch.empty_like(mean)
    if view.G * view.L == 0:  # like torch.var_mean over no elements
        return mean.fill_(float("nan")), var.fill_(float("nan"))
    splits_per_g, chunk = view.splits()
    num_splits = view.G * splits_per_g
    partial = torch.empty((3, num_splits, view.C), dtype=acc, device=x.device)
    sizes, layout = view.args()
    with launch_device(x.device):
        _bn_stats_kernel[lambda meta: (num_splits, triton.cdiv(view.C, meta["BLOCK_C"]))](
            x, partial, mean, var, arrival_counters(x.device, view.C), *sizes, splits_per_g, chunk, **layout,
            ACC=_tl_dtype(acc))
    return mean, var


# ----------------------------------------------------------------------------------------------
# Forward: scale/shift (+ residual with its own scale/shift) + ReLU, one pass
# ----------------------------------------------------------------------------------------------


@triton.jit
def _elementwise_tile(C, L, CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr, ALIGN: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """Channels c, channel mask, tile mask and element offsets of elementwise program (program_id(0),
    program_id(1)): program_id(1) picks the channels, program_id(0) the row and the positions in it."""
    C, L = _aligned_sizes(C, L, CHANNELS_LAST, ALIGN)
    pid = tl.program_id(0)
    tiles_l = tl.cdiv(L, BLOCK_L)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    l = (pid % tiles_l) * BLOCK_L + tl.arange(0, BLOCK_L)
    cmask = c < C
    mask = cmask[:, None] & (l < L)[None, :]
    return c, cmask, mask, _offsets(pid // tiles_l, c, l, C, L, CHANNELS_LAST, INT64)


# restore_value: the tuner runs the kernel once per config, and bn_act_forward_ writes into its own input
@triton.autotune(configs=_ELEMENTWISE_CONFIGS, restore_value=["out_ptr"], **_TUNING)
@triton.jit
def _bn_act_forward_kernel(
    x_ptr, res_ptr,  # inputs, [G, C, L] views in the same layout; res_ptr read when HAS_RES
    out_ptr,  # output, same layout
    scale_ptr, shift_ptr, res_scale_ptr, res_shift_ptr,  # [C] acc dtype, read when the flag says so
    G, C, L,  # sizes of the view (G is also part of the autotune key)
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RES: tl.constexpr,  # which optional
    HAS_RES_SCALE: tl.constexpr, HAS_RES_SHIFT: tl.constexpr,  # inputs exist
    RELU: tl.constexpr,  # apply the ReLU
    CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr, ALIGN: tl.constexpr,  # layout, 64-bit offsets, alignment
    ACC: tl.constexpr,  # compute dtype
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,  # tile
):
    """out = relu?(x*scale[c] + shift[c] + residual*res_scale[c] + res_shift[c]), one read per input."""
    c, cmask, mask, offs = _elementwise_tile(C, L, CHANNELS_LAST, INT64, ALIGN, BLOCK_C, BLOCK_L)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    r = x  # placeholder, read only when HAS_RES
    if HAS_RES:
        r = tl.load(res_ptr + offs, mask=mask, other=0.0).to(ACC)
    scale, shift, res_scale, res_shift = _load_affine(c, cmask, scale_ptr, shift_ptr, res_scale_ptr, res_shift_ptr,
                                                      HAS_SCALE, HAS_SHIFT, HAS_RES_SCALE, HAS_RES_SHIFT)
    z = _pre_activation(x, r, scale, shift, res_scale, res_shift, HAS_RES)
    if RELU:
        z = _relu(z)
    tl.store(out_ptr + offs, z.to(out_ptr.dtype.element_ty), mask=mask)


def bn_act_forward(x, scale, shift, residual, res_scale, res_shift, relu):
    """relu?(x*scale[c] + shift[c] + residual*res_scale[c] + res_shift[c]); None drops a term."""
    x, view = _prepare_input(x)
    return _act_forward_into(torch.empty_like(x), x, view, scale, shift, residual, res_scale, res_shift, relu)


def bn_act_forward_(x, scale, shift, residual, res_scale, res_shift, relu):
    """bn_act_forward written into x itself (an activation nothing else reads: a convolution's fresh output). Each
    element is read and written by the same program, once."""
    prepared, view = _prepare_input(x)
    _require(prepared is x, "bn_act_forward_: x must be NCHW-contiguous or channels_last to be updated in place")
    return _act_forward_into(x, x, view, scale, shift, residual, res_scale, res_shift, relu)


def _act_forward_into(out, x, view, scale, shift, residual, res_scale, res_shift, relu):
    args = _Args(x, view)
    flags = args.pre_activation_flags(scale, shift, residual, res_scale, res_shift)
    residual = args.like("residual", residual)
    if x.numel():
        sizes, layout = view.args()
        with launch_device(x.device):
            _bn_act_forward_kernel[_elementwise_grid(view)](
                x, residual, out, *args.channels(scale=scale, shift=shift, res_scale=res_scale, res_shift=res_shift),
                *sizes, **flags, RELU=relu, **layout, ACC=args.acc)
    return out


# ----------------------------------------------------------------------------------------------
# Backward: per-channel sums of dz, dz*xhat, dz*rhat, then the elementwise input gradients
# ----------------------------------------------------------------------------------------------


@triton.autotune(configs=_REDUCTION_CONFIGS, **_TUNING)
@triton.jit
def _bn_act_backward_reduce_kernel(
    grad_ptr, x_ptr, res_ptr,  # inputs, [G, C, L] views in the same layout; res_ptr read when HAS_RES
    scale_ptr, shift_ptr, res_scale_ptr, res_shift_ptr,  # [C] acc dtype, optional as in the forward
    mean_ptr, invstd_ptr,  # [C] statistics that normalize x
    res_mean_ptr, res_invstd_ptr,  # [C] statistics that normalize the residual, read when HAS_RHAT
    partial_ptr,  # scratch: [2 or 3, S, C] acc dtype, per-program sums of dz, dz*xhat (, dz*rhat)
    sum_dz_ptr, sum_dz_xhat_ptr, sum_dz_rhat_ptr,  # out: [C] each; sum_dz_rhat_ptr written when HAS_RHAT
    counter_ptr,  # int32 arrival counters, one per channel block, zero (kernels/_arrival.py)
    G, C, L,  # sizes of the view (G is also part of the autotune key)
    splits_per_g, chunk,  # program s covers positions [(s % splits_per_g)*chunk, +chunk) of row s // splits_per_g
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RES: tl.constexpr,  # which optional
    HAS_RES_SCALE: tl.constexpr, HAS_RES_SHIFT: tl.constexpr,  # inputs exist
    HAS_RHAT: tl.constexpr,  # also sum dz*rhat
    RELU: tl.constexpr,  # the forward applied a ReLU: recompute its mask from x (and residual)
    CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr, ALIGN: tl.constexpr,  # layout, 64-bit offsets, alignment
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,  # tile
):
    """Per-channel partial sums over one chunk, accumulated per lane and reduced once at the end; the last
    program of a channel block to finish sums the S chunks.

        dz = grad_out * (z > 0) (relu) or grad_out;  sum dz;  sum dz*xhat = invstd * sum dz*(x - mean);
        sum dz*rhat = res_invstd * sum dz*(residual - res_mean)
    """
    C, L = _aligned_sizes(C, L, CHANNELS_LAST, ALIGN)
    g, l_start, l_end = _chunk(splits_per_g, chunk, L)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    scale, shift, res_scale, res_shift = _load_affine(c, cmask, scale_ptr, shift_ptr, res_scale_ptr, res_shift_ptr,
                                                      HAS_SCALE, HAS_SHIFT, HAS_RES_SCALE, HAS_RES_SHIFT)
    mean = _per_channel(mean_ptr, c, cmask)
    res_mean = _per_channel(res_mean_ptr, c, cmask, HAS_RHAT)
    sum_dz = tl.zeros([BLOCK_C, BLOCK_L], ACC)
    sum_dz_x = tl.zeros([BLOCK_C, BLOCK_L], ACC)
    sum_dz_r = tl.zeros([BLOCK_C, BLOCK_L], ACC)
    for l0 in range(l_start, l_end, BLOCK_L):
        l = l0 + tl.arange(0, BLOCK_L)
        mask = cmask[:, None] & (l < l_end)[None, :]
        offs = _offsets(g, c, l, C, L, CHANNELS_LAST, INT64)
        dz = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(ACC)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        r = x  # placeholder, read only when the residual was loaded
        if HAS_RES and (RELU or HAS_RHAT):
            r = tl.load(res_ptr + offs, mask=mask, other=0.0).to(ACC)
        if RELU:
            dz = _relu_grad(dz, _pre_activation(x, r, scale, shift, res_scale, res_shift, HAS_RES))
        sum_dz += dz
        sum_dz_x += dz * (x - mean)  # centred before the sum: no cancellation for a large mean
        if HAS_RHAT:
            sum_dz_r += dz * (r - res_mean)
    out = partial_ptr + tl.program_id(0) * C + c
    S = tl.num_programs(0)
    tl.store(out, tl.sum(sum_dz, 1), mask=cmask)
    tl.store(out + S * C, tl.sum(sum_dz_x, 1) * tl.load(invstd_ptr + c, mask=cmask), mask=cmask)
    if HAS_RHAT:
        tl.store(out + 2 * S * C, tl.sum(sum_dz_r, 1) * tl.load(res_invstd_ptr + c, mask=cmask), mask=cmask)
    if _last_to_arrive(counter_ptr + tl.program_id(1), S):
        _combine_sums(partial_ptr, sum_dz_ptr, 0, c, cmask, C, S, ACC, BLOCK_C, BLOCK_L)
        _combine_sums(partial_ptr, sum_dz_xhat_ptr, 1, c, cmask, C, S, ACC, BLOCK_C, BLOCK_L)
        if HAS_RHAT:
            _combine_sums(partial_ptr, sum_dz_rhat_ptr, 2, c, cmask, C, S, ACC, BLOCK_C, BLOCK_L)


@triton.jit
def _combine_sums(partial_ptr, out_ptr, k, c, cmask, C, S, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
                  BLOCK_S: tl.constexpr):
    """out[c] = the sum of the S partials of sum k (of [k, S, C]) of channels c, BLOCK_S at a time in order of s."""
    total = tl.zeros([BLOCK_C], ACC)
    ptrs = partial_ptr + k * S * C + c[:, None]
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        total += tl.sum(tl.load(ptrs + s[None, :] * C, mask=cmask[:, None] & (s < S)[None, :], other=0.0,
                               cache_modifier=".cg"), 1)
    tl.store(out_ptr + c, total, mask=cmask)


def bn_act_backward_reduce(grad_out, x, scale, shift, mean, invstd, residual, res_scale, res_shift, res_mean,
                           res_invstd, relu):
    """(sum dz, sum dz*xhat, sum dz*rhat) per channel, one launch; the last is empty when res_mean is None."""
    x, view = _prepare_input(x)
    args = _Args(x, view)
    flags = args.pre_activation_flags(scale, shift, residual, res_scale, res_shift)
    _require(mean is not None and invstd is not None, "mean and invstd are required")
    has_rhat = res_mean is not None
    _require(not has_rhat or (residual is not None and res_invstd is not None),
             "res_mean needs residual and res_invstd")
    grad_out, residual = args.like("grad_out", grad_out), args.like("residual", residual)
    channels = args.channels(scale=scale, shift=shift, res_scale=res_scale, res_shift=res_shift, mean=mean,
                             invstd=invstd, res_mean=res_mean, res_invstd=res_invstd)
    acc = _acc_of(x)
    # Three separate tensors, not views of one buffer: they become BN parameter gradients as they are.
    sums = [torch.empty(view.C if k < 2 or has_rhat else 0, dtype=acc, device=x.device) for k in range(3)]
    if view.G * view.L == 0:
        return tuple(s.zero_() for s in sums)
    splits_per_g, chunk = view.splits()
    num_splits = view.G * splits_per_g
    partial = torch.empty((3 if has_rhat else 2, num_splits, view.C), dtype=acc, device=x.device)
    sizes, layout = view.args()
    with launch_device(x.device):
        _bn_act_backward_reduce_kernel[lambda meta: (num_splits, triton.cdiv(view.C, meta["BLOCK_C"]))](
            grad_out, x, residual, *channels, partial, sums[0], sums[1], sums[2] if has_rhat else None,
            arrival_counters(x.device, view.C), *sizes, splits_per_g, chunk, **flags, HAS_RHAT=has_rhat,
            RELU=relu, **layout, ACC=args.acc)
    return tuple(sums)


@triton.jit
def _bn_input_grad(dz, v, scale, c, cmask, mean_ptr, invstd_ptr, sum_dz_ptr, sum_dz_vhat_ptr, count,
                   TRAIN: tl.constexpr):
    """Gradient through z = scale*(v - mean)*invstd + ...: scale*(dz - mean_dz - vhat*mean_dz_vhat) with
    batch statistics (TRAIN; mean_dz = sum_dz / count, likewise mean_dz_vhat), scale*dz with fixed ones."""
    grad = dz
    if TRAIN:
        vhat = (v - _per_channel(mean_ptr, c, cmask)) * _per_channel(invstd_ptr, c, cmask)
        mean_dz = _per_channel(sum_dz_ptr, c, cmask) / count
        grad = dz - mean_dz - vhat * (_per_channel(sum_dz_vhat_ptr, c, cmask) / count)
    return grad * scale


@triton.autotune(configs=_ELEMENTWISE_CONFIGS, **_TUNING)
@triton.jit
def _bn_act_backward_elemt_kernel(
    grad_ptr, x_ptr, res_ptr,  # inputs, [G, C, L] views in the same layout
    grad_x_ptr, grad_res_ptr,  # outputs, same layout; grad_res_ptr written when HAS_RES
    scale_ptr, shift_ptr, res_scale_ptr, res_shift_ptr,  # [C] acc dtype, optional as in the forward
    mean_ptr, invstd_ptr, res_mean_ptr, res_invstd_ptr,  # [C] statistics, read in training
    sum_dz_ptr, sum_dz_xhat_ptr, sum_dz_rhat_ptr,  # [C] sums of bn_act_backward_reduce, read in training
    G, C, L,  # sizes of the view (G is also part of the autotune key)
    count,  # the values each channel's statistics were taken over (sums / count are the means)
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RES: tl.constexpr,  # which optional
    HAS_RES_SCALE: tl.constexpr, HAS_RES_SHIFT: tl.constexpr,  # inputs exist
    X_TRAIN: tl.constexpr, RES_TRAIN: tl.constexpr,  # x / residual were normalized with batch statistics
    RELU: tl.constexpr,  # the forward applied a ReLU: recompute its mask from x (and residual)
    CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr, ALIGN: tl.constexpr,  # layout, 64-bit offsets, alignment
    ACC: tl.constexpr,  # compute dtype
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,  # tile
):
    """grad_x and grad_residual from dz (see _bn_input_grad); x and residual are read only when needed."""
    c, cmask, mask, offs = _elementwise_tile(C, L, CHANNELS_LAST, INT64, ALIGN, BLOCK_C, BLOCK_L)
    dz = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(ACC)
    x = dz  # placeholders, read only when loaded below
    r = dz
    if RELU or X_TRAIN:
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    if HAS_RES and (RELU or RES_TRAIN):
        r = tl.load(res_ptr + offs, mask=mask, other=0.0).to(ACC)
    scale, shift, res_scale, res_shift = _load_affine(c, cmask, scale_ptr, shift_ptr, res_scale_ptr, res_shift_ptr,
                                                      HAS_SCALE, HAS_SHIFT, HAS_RES_SCALE, HAS_RES_SHIFT)
    if RELU:
        dz = _relu_grad(dz, _pre_activation(x, r, scale, shift, res_scale, res_shift, HAS_RES))
    count = tl.cast(count, ACC)
    grad_x = _bn_input_grad(dz, x, scale, c, cmask, mean_ptr, invstd_ptr, sum_dz_ptr, sum_dz_xhat_ptr, count,
                            X_TRAIN)
    tl.store(grad_x_ptr + offs, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
    if HAS_RES:
        grad_r = _bn_input_grad(dz, r, res_scale, c, cmask, res_mean_ptr, res_invstd_ptr, sum_dz_ptr,
                                sum_dz_rhat_ptr, count, RES_TRAIN)
        tl.store(grad_res_ptr + offs, grad_r.to(grad_res_ptr.dtype.element_ty), mask=mask)


def bn_act_backward_elemt(grad_out, x, scale, shift, mean, invstd, residual, res_scale, res_shift, res_mean,
                          res_invstd, relu, sum_dz, sum_dz_xhat, sum_dz_rhat, count):
    """(grad_x, grad_residual); training formulas where sum_dz / sum_dz_rhat are given (divided by `count`
    per channel in the kernel), eval otherwise."""
    x, view = _prepare_input(x)
    args = _Args(x, view)
    flags = args.pre_activation_flags(scale, shift, residual, res_scale, res_shift)
    x_train, res_train = sum_dz is not None, sum_dz_rhat is not None
    _require(not x_train or None not in (mean, invstd, sum_dz_xhat), "sum_dz needs mean, invstd and sum_dz_xhat")
    _require(not res_train or None not in (residual, res_mean, res_invstd, sum_dz),
             "sum_dz_rhat needs residual, res_mean, res_invstd and sum_dz")
    _require(not x_train or count > 0 or x.numel() == 0, f"count must be positive when sum_dz is given, got {count}")
    grad_out, residual = args.like("grad_out", grad_out), args.like("residual", residual)
    channels = args.channels(scale=scale, shift=shift, res_scale=res_scale, res_shift=res_shift, mean=mean,
                             invstd=invstd, res_mean=res_mean, res_invstd=res_invstd, sum_dz=sum_dz,
                             sum_dz_xhat=sum_dz_xhat, sum_dz_rhat=sum_dz_rhat)
    grad_x = torch.empty_like(x)
    grad_res = torch.empty_like(x) if residual is not None else x.new_empty(0)
    if x.numel():
        sizes, layout = view.args()
        with launch_device(x.device):
            _bn_act_backward_elemt_kernel[_elementwise_grid(view)](
                grad_out, x, residual, grad_x, grad_res if residual is not None else None, *channels, *sizes, count,
                **flags, X_TRAIN=x_train, RES_TRAIN=res_train, RELU=relu, **layout, ACC=args.acc)
    return grad_x, grad_res


# ----------------------------------------------------------------------------------------------
# Finalize: batch statistics -> scale, shift, invstd and the running-statistics update, one kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _scalar_in(value, ACC: tl.constexpr):
    """A float64 scalar argument in ACC, added to an ACC zero rather than cast: the interpreter passes the
    argument as a Python float, which a cast would round to float32 first."""
    return (tl.zeros([], ACC) + value).to(ACC)


@triton.jit(do_not_specialize=["count"])
def _bn_finalize_kernel(
    mean_ptr, var_ptr,  # [C] per-channel mean and biased variance (any float dtype, the same for both)
    weight_ptr, bias_ptr,  # [C] any float dtype, read when HAS_WEIGHT / HAS_BIAS
    running_mean_ptr, running_var_ptr,  # [C] updated in place in their own dtype when UPDATE_RUNNING
    num_batches_tracked_ptr,  # int64 scalar, incremented when TRACK
    scale_ptr, shift_ptr, invstd_ptr,  # out: [C] acc dtype
    C,  # channels
    count,  # values per channel behind mean/var: the unbiased variance is var * count / max(count - 1, 1)
    momentum: tl.float64, eps: tl.float64,  # float64 arguments: a float32 momentum would skew float64 statistics
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    UPDATE_RUNNING: tl.constexpr, TRACK: tl.constexpr,
    CUMULATIVE: tl.constexpr,  # momentum None: weight 1 / num_batches_tracked (after the increment); needs TRACK
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_C: tl.constexpr,  # channels per step
):
    """invstd = 1/sqrt(var + eps); scale = weight*invstd; shift = bias - mean*scale; then nn.BatchNorm2d's
    update: num_batches_tracked += 1, running += f*(batch - running) with f = momentum or 1/num_batches_tracked.

    One program walks every channel: num_batches_tracked is read and written by that program alone, so the
    weight every channel uses comes from the one increment (several programs would race on it). Inside the
    program every thread loads the scalar and thread 0 alone stores it: the barrier keeps a late warp from
    loading the incremented value (tests/kernels/test_finalize_sm90.py checks it in the sm_90 PTX).
    """
    tracked = 0
    if TRACK:
        tracked = tl.load(num_batches_tracked_ptr) + 1
        tl.debug_barrier()  # every thread has loaded the old value before the store below
        tl.store(num_batches_tracked_ptr, tracked)
    f = _scalar_in(momentum, ACC)
    if CUMULATIVE:
        f = 1.0 / tl.cast(tracked, ACC)
    bessel = tl.cast(count, ACC) / tl.cast(tl.maximum(count - 1, 1), ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < C
        mean = tl.load(mean_ptr + c, mask=cmask, other=0.0).to(ACC)
        var = tl.load(var_ptr + c, mask=cmask, other=0.0).to(ACC)
        invstd = 1.0 / tl.sqrt(var + _scalar_in(eps, ACC))
        scale = invstd
        if HAS_WEIGHT:
            scale = tl.load(weight_ptr + c, mask=cmask, other=0.0).to(ACC) * invstd
        shift = -mean * scale
        if HAS_BIAS:
            shift = tl.load(bias_ptr + c, mask=cmask, other=0.0).to(ACC) - mean * scale
        tl.store(invstd_ptr + c, invstd, mask=cmask)
        tl.store(scale_ptr + c, scale, mask=cmask)
        tl.store(shift_ptr + c, shift, mask=cmask)
        if UPDATE_RUNNING:
            running_mean = tl.load(running_mean_ptr + c, mask=cmask, other=0.0).to(ACC)
            running_var = tl.load(running_var_ptr + c, mask=cmask, other=0.0).to(ACC)
            running_mean += f * (mean - running_mean)
            running_var += f * (var * bessel - running_var)
            tl.store(running_mean_ptr + c, running_mean.to(running_mean_ptr.dtype.element_ty), mask=cmask)
            tl.store(running_var_ptr + c, running_var.to(running_var_ptr.dtype.element_ty), mask=cmask)


def bn_finalize(mean, var, weight, bias, running_mean, running_var, num_batches_tracked, count, momentum, eps,
                update):
    """(scale, shift, invstd) of a BN from its per-channel mean and biased var, in the acc dtype of mean; with
    `update`, nn.BatchNorm2d's running-statistics update in place (docs/ARCHITECTURE.md, section 1)."""
    _require(isinstance(mean, torch.Tensor) and mean.dim() == 1, f"mean must be 1-D (C,), got {mean!r:.80}")
    _require(mean.dtype in _DTYPES, f"mean must be float16, bfloat16, float32 or float64, got {mean.dtype}")
    _require(_INTERPRET or mean.is_cuda, f"mean must be a CUDA tensor (or set TRITON_INTERPRET=1), got {mean.device}")
    c = mean.numel()
    vectors = dict(var=var, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    for name, v in vectors.items():
        if v is not None:
            _require(isinstance(v, torch.Tensor) and v.shape == (c,), f"{name} must be 1-D of length C={c}")
            _require(v.dtype in _DTYPES, f"{name} must be float16, bfloat16, float32 or float64, got {v.dtype}")
            _require(v.device == mean.device, f"{name} must be on mean's device {mean.device}, got {v.device}")
    _require(var is not None and var.dtype == mean.dtype, "var must have mean's dtype")
    _require((running_mean is None) == (running_var is None), "running_mean and running_var must be given together")
    for name, v in (("running_mean", running_mean), ("running_var", running_var)):
        _require(v is None or v.is_contiguous(), f"{name} must be contiguous (it is updated in place)")
    if num_batches_tracked is not None:
        _require(num_batches_tracked.numel() == 1 and num_batches_tracked.dtype == torch.int64
                 and num_batches_tracked.device == mean.device,
                 "num_batches_tracked must be a one-element int64 tensor on mean's device")
    _require(count >= 0, f"count must be >= 0, got {count}")
    track = update and num_batches_tracked is not None
    update_running = update and running_mean is not None
    _require(not update_running or momentum is not None or track,
             "momentum=None (cumulative average) needs num_batches_tracked")
    acc = _acc_of(mean)
    scale, shift, invstd = (torch.empty(c, dtype=acc, device=mean.device) for _ in range(3))
    if c or track:
        with launch_device(mean.device):
            _bn_finalize_kernel[(1,)](
                mean.contiguous(), var.contiguous(), _contiguous(weight), _contiguous(bias), running_mean, running_var,
                num_batches_tracked, scale, shift, invstd, c, count, 0.0 if momentum is None else momentum, eps,
                HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, UPDATE_RUNNING=update_running and count > 0,
                TRACK=track, CUMULATIVE=update_running and momentum is None, ACC=_tl_dtype(acc),
                BLOCK_C=min(triton.next_power_of_2(max(c, 1)), _FINALIZE_BLOCK_C))
    # The kernel writes through pointers, which no version counter sees; caches of values derived from the
    # running statistics (pyfast.ops's inference folds) key on versions.
    updated = [t for t, wrote in ((running_mean, update_running and count > 0), (running_var, update_running
               and count > 0), (num_batches_tracked, track)) if wrote and not t.is_inference()]
    if updated and not torch.compiler.is_compiling():
        torch.autograd.graph.increment_version(updated)
    return scale, shift, invstd
