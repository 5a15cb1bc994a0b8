"""What the Triton batch-norm passes (kernels/batch_norm.py) share: the [G, C, L] walk of a 4-D tensor,
the tile configs and their tuning, the @triton.jit helpers (offsets, per-channel loads, the pre-activation,
ReLU and its gradient, Chan's merge), and the launchers' argument checks.

Every pass walks a 4-D tensor (N, C, H, W) as a [G, C, L] view in tiles of [BLOCK_C, BLOCK_L]:

* NCHW-contiguous: G = N, L = H*W, offset = (g*C + c)*L + l; the tile is contiguous along l.
* channels_last:   G = 1, L = N*H*W, offset = l*C + c;      the tile is contiguous along c.

Both layouts are read in place (no copies); outputs get the input's dtype and memory format. Math runs
in `acc` = float64 for float64 input, float32 otherwise. Offsets switch to int64 when a tensor has 2**31
elements or more.
"""
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import _flags
from .._numerics import acc_dtype

_INTERPRET = _flags.TRITON_INTERPRET
# PYFAST_TRITON_AUTOTUNE=0 keeps one config per kernel: for GPU test runs, where tuning every new
# shape would cost more than the tests themselves.
_AUTOTUNE = _flags.TRITON_AUTOTUNE
_MAX_INT32 = 2**31 - 1


def _configs(tiles, untuned):
    """Autotune configs from (BLOCK_C, BLOCK_L, num_warps); one small tile under the interpreter, and
    only tiles[untuned] when autotuning is off."""
    if _INTERPRET:  # the interpreter neither benchmarks nor needs big tiles: one config, few programs
        tiles = [(16, 32, 1)]
    elif not _AUTOTUNE:
        tiles = [tiles[untuned]]
    return [triton.Config({"BLOCK_C": c, "BLOCK_L": l}, num_warps=w) for c, l, w in tiles]


# Elementwise tiles: 4K-8K elements; the autotuner finds the orientation that is wide along the
# contiguous dimension (c for channels_last, l for NCHW).
_ELEMENTWISE_CONFIGS = _configs([
    (4, 1024, 4), (8, 512, 4), (16, 256, 4), (32, 128, 4), (64, 64, 4), (128, 32, 4), (256, 16, 4),
    (8, 1024, 8), (16, 512, 8), (64, 128, 8), (128, 64, 8), (256, 32, 8),
], untuned=3)
# Reduction tiles keep per-lane accumulators in registers. BLOCK_L must divide _SPLIT_ALIGN so that
# only the last chunk of a row of the [G, C, L] view has a partial tile.
_REDUCTION_CONFIGS = _configs([
    (4, 256, 4), (8, 256, 4), (16, 128, 4), (32, 64, 4), (64, 32, 4), (128, 16, 4),
    (16, 256, 8), (64, 64, 8), (128, 32, 8),
], untuned=2)
# A reduction program covers one chunk of _SPLIT_ALIGN-multiple positions along L holding about
# _SPLIT_WORK elements of its channel block: enough work per program, and the partials stay ~1% of x.
_SPLIT_ALIGN = 32 if _INTERPRET else 256
_SPLIT_WORK = 512 if _INTERPRET else 32768
_FINALIZE_BLOCK_C = 1024  # channels per step of the one bn_finalize program


def _prune(configs, named_args, **kwargs):
    """Keep tiles >= 64 wide along the contiguous dim (when it is that long) that fill nearly as well
    as the best one, so that a small tensor is not benchmarked with mostly-masked tiles."""
    args = {**named_args, **kwargs}
    sizes = {"BLOCK_C": args["C"], "BLOCK_L": args["L"]}
    contiguous = "BLOCK_C" if args["CHANNELS_LAST"] else "BLOCK_L"

    def filled(cfg):
        return math.prod(n / (triton.cdiv(n, cfg.kwargs[b]) * cfg.kwargs[b]) for b, n in sizes.items())

    wide = [cfg for cfg in configs if cfg.kwargs[contiguous] >= min(64, sizes[contiguous])] or configs
    best = max(map(filled, wide))
    return [cfg for cfg in wide if filled(cfg) >= 0.75 * best]


_TUNING = dict(key=["G", "C", "L", "CHANNELS_LAST"], prune_configs_by={"early_config_prune": _prune})


# ----------------------------------------------------------------------------------------------
# Helpers shared by the kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _aligned_sizes(C, L, CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr):
    """C and L, the row length of the contiguous dim written as a multiple of ALIGN (the launcher's
    gcd(16, row length)): then the compiler can prove row starts and masks aligned and vectorize
    loads even where the value itself is not specialized (e.g. C = 24, 56, 152 in RegNets)."""
    if CHANNELS_LAST:
        C = (C // ALIGN) * ALIGN
    else:
        L = (L // ALIGN) * ALIGN
    return C, L


@triton.jit
def _offsets(g, c, l, C, L, CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr):
    """Element offsets of the [BLOCK_C, BLOCK_L] tile of channels `c`, positions `l` in row `g`."""
    if INT64:  # past 2**31 elements, int32 products overflow
        g = g.to(tl.int64)
        c = c.to(tl.int64)
        l = l.to(tl.int64)
    if CHANNELS_LAST:
        offs = l[None, :] * C + c[:, None]
    else:
        offs = (g * C + c[:, None]) * L + l[None, :]
    return offs


@triton.jit
def _per_channel(ptr, c, cmask, PRESENT: tl.constexpr = True, DEFAULT: tl.constexpr = 0.0):
    """A per-channel vector's values for channels c as a [BLOCK_C, 1] column; DEFAULT when it is absent."""
    if PRESENT:
        v = tl.load(ptr + c, mask=cmask, other=0.0)[:, None]
    else:
        v = DEFAULT
    return v


@triton.jit
def _load_affine(c, cmask, scale_ptr, shift_ptr, res_scale_ptr, res_shift_ptr, HAS_SCALE: tl.constexpr,
                 HAS_SHIFT: tl.constexpr, HAS_RES_SCALE: tl.constexpr, HAS_RES_SHIFT: tl.constexpr):
    """scale, shift, res_scale, res_shift of channels c; 1 and 0 stand in for absent ones."""
    return (_per_channel(scale_ptr, c, cmask, HAS_SCALE, 1.0), _per_channel(shift_ptr, c, cmask, HAS_SHIFT, 0.0),
            _per_channel(res_scale_ptr, c, cmask, HAS_RES_SCALE, 1.0),
            _per_channel(res_shift_ptr, c, cmask, HAS_RES_SHIFT, 0.0))


@triton.jit
def _pre_activation(x, r, scale, shift, res_scale, res_shift, HAS_RES: tl.constexpr):
    """z = x*scale + shift (+ r*res_scale + res_shift): the input of the ReLU."""
    z = x * scale + shift
    if HAS_RES:
        z += r * res_scale + res_shift
    return z


@triton.jit
def _relu(z):
    """max(z, 0) that keeps NaN like torch.relu (NaN <= 0 is false, so NaN passes)."""
    return tl.where(z <= 0, 0.0, z)


@triton.jit
def _relu_grad(dy, z):
    """dy where the ReLU passed z, else 0; like torch's threshold_backward a NaN z passes dy."""
    return tl.where(z <= 0, 0.0, dy)


@triton.jit
def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.: (count, mean, M2) of the union of two disjoint sets, stable for any mean."""
    n = n_a + n_b
    w_b = n_b / tl.maximum(n, 1.0)
    delta = mean_b - mean_a
    return n, mean_a + delta * w_b, m2_a + m2_b + delta * delta * n_a * w_b


@triton.jit
def _chunk(splits_per_g, chunk, L):
    """Row g and range [l_start, l_end) of the chunk that reduction program `program_id(0)` covers."""
    pid = tl.program_id(0)
    l_start = (pid % splits_per_g) * chunk
    return pid // splits_per_g, l_start, tl.minimum(l_start + chunk, L)


@dataclass(frozen=True)
class _View:
    """The [G, C, L] view of a 4-D tensor that the kernels walk (see the module docstring)."""

    memory_format: torch.memory_format
    G: int
    C: int
    L: int
    int64: bool

    @property
    def channels_last(self):
        return self.memory_format == torch.channels_last

    def args(self):
        """Sizes (positional) and layout flags (keywords) that every kernel takes."""
        row = self.C if self.channels_last else self.L  # elements per row of the contiguous dim
        return (self.G, self.C, self.L), {"CHANNELS_LAST": self.channels_last, "INT64": self.int64,
                                          "ALIGN": math.gcd(16, row)}

    def splits(self):
        """(splits_per_g, chunk): each row of L positions split into chunks for the reductions."""
        chunk = triton.cdiv(max(_SPLIT_WORK // self.C, 1), _SPLIT_ALIGN) * _SPLIT_ALIGN
        chunk = min(chunk, triton.cdiv(self.L, _SPLIT_ALIGN) * _SPLIT_ALIGN)
        return triton.cdiv(self.L, chunk), chunk


# ----------------------------------------------------------------------------------------------
# Argument checks and layout
# ----------------------------------------------------------------------------------------------

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _require(ok, message):
    if not ok:
        raise ValueError(message)


def _contiguous(t):
    return None if t is None else t.contiguous()


def _acc_of(x):
    return acc_dtype(x.dtype)


def _tl_dtype(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _elementwise_grid(view):
    return lambda meta: (view.G * triton.cdiv(view.L, meta["BLOCK_L"]), triton.cdiv(view.C, meta["BLOCK_C"]))


def _memory_format(x):
    """NCHW when x is contiguous, channels_last when it is that, None when it is neither."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return None


def _prepare_input(x):
    """Check x and return it (copied to NCHW only when it is neither layout) with its [G, C, L] view."""
    _require(isinstance(x, torch.Tensor), f"x must be a Tensor, got {type(x).__name__}")
    _require(x.dim() == 4, f"x must be 4-D (N, C, H, W), got {x.dim()}-D of shape {tuple(x.shape)}")
    _require(x.dtype in _DTYPES, f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    _require(_INTERPRET or x.is_cuda, f"x must be a CUDA tensor (or set TRITON_INTERPRET=1), got {x.device}")
    fmt = _memory_format(x)
    if fmt is None:
        x, fmt = x.contiguous(), torch.contiguous_format
    n, c, h, w = x.shape
    if fmt == torch.channels_last:
        return x, _View(fmt, 1, c, n * h * w, x.numel() > _MAX_INT32)
    return x, _View(fmt, n, c, h * w, x.numel() > _MAX_INT32)


class _Args:
    """Checks of the arguments that travel with x, and the constexpr flags they imply."""

    def __init__(self, x, view):
        self.x, self.view = x, view
        self.acc = _tl_dtype(_acc_of(x))

    def like(self, name, t):
        """A tensor shaped like x (grad_out, residual), in x's dtype, device and memory format."""
        if t is None:
            return None
        _require(isinstance(t, torch.Tensor), f"{name} must be a Tensor, got {type(t).__name__}")
        _require(t.shape == self.x.shape, f"{name} must have x's shape {tuple(self.x.shape)}, got {tuple(t.shape)}")
        _require(t.dtype == self.x.dtype, f"{name} must have x's dtype {self.x.dtype}, got {t.dtype}")
        _require(t.device == self.x.device, f"{name} must be on x's device {self.x.device}, got {t.device}")
        return t.contiguous(memory_format=self.view.memory_format)  # a copy only when layouts differ

    def channels(self, **vectors):
        """Per-channel vectors in order, checked: None or 1-D of length C, acc dtype, x's device."""
        acc = _acc_of(self.x)
        checked = []
        for name, v in vectors.items():
            if v is not None:
                _require(isinstance(v, torch.Tensor), f"{name} must be a Tensor, got {type(v).__name__}")
                _require(v.dim() == 1 and v.numel() == self.view.C,
                         f"{name} must be 1-D of length C={self.view.C}, got shape {tuple(v.shape)}")
                _require(v.dtype == acc, f"{name} must be {acc} for {self.x.dtype} input, got {v.dtype}")
                _require(v.device == self.x.device, f"{name} must be on x's device {self.x.device}, got {v.device}")
                v = v.contiguous()
            checked.append(v)
        return checked

    @staticmethod
    def pre_activation_flags(scale, shift, residual, res_scale, res_shift):
        """Constexpr flags of z = x*scale + shift + residual*res_scale + res_shift."""
        _require(residual is not None or (res_scale is None and res_shift is None),
                 "res_scale/res_shift given without residual")
        return {"HAS_SCALE": scale is not None, "HAS_SHIFT": shift is not None, "HAS_RES": residual is not None,
                "HAS_RES_SCALE": res_scale is not None, "HAS_RES_SHIFT": res_shift is not None}
