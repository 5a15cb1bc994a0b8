"""Builds random inputs for the fused ops, runs an op on a backend with its backward, and compares
the result with the reference backend computed in float64 on the CPU (the ground truth)."""
import math
from dataclasses import dataclass, replace
from typing import Dict, Optional, Tuple

import pytest
import torch

from pyfast.ops.backends import BACKENDS
from tolerances import assert_close

LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def backend_params():
    """(backend, device) pairs; GPU ones are marked and skipped without a GPU."""
    return [
        pytest.param("cpu", "cpu", id="cpu"),
        pytest.param("triton", "cpu", id="triton-interpreter"),
        pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.gpu),
        pytest.param("triton", "cuda", id="triton", marks=pytest.mark.gpu),
    ]


def backend_grid(points, interpreter_points):
    """(backend, device, *point) parameters: every point on every backend, except Triton's interpreter,
    which runs kernels element by element in Python and gets the smaller (still complete) subset."""
    params = []
    for backend in backend_params():
        name, device = backend.values
        chosen = interpreter_points if (name, device) == ("triton", "cpu") else points
        params += [pytest.param(name, device, *point, id=f"{backend.id}-{'-'.join(point)}", marks=backend.marks)
                   for point in chosen]
    return params


def skip_unless_runs(backend: str, op: str, x: torch.Tensor):
    reason = BACKENDS[backend].why_not(op, x.device, x.dtype)
    if reason:
        pytest.skip(f"{backend}: {reason}")


@dataclass(frozen=True)
class Case:
    """One point of the grid: a convolution (for the conv ops) and the activation it reads."""

    batch: int = 2
    channels: int = 8
    out_channels: int = 8
    size: Tuple[int, int] = (7, 5)
    kernel: int = 3
    stride: int = 1
    padding: int = 1
    dilation: int = 1
    groups: int = 1

    def with_(self, **changes) -> "Case":
        return replace(self, **changes)


def bn_state(channels: int, affine: bool = True, track: bool = True) -> Dict[str, Optional[torch.Tensor]]:
    """A BN's parameters and buffers, with non-trivial values (never zeros, never ones)."""
    return {
        "weight": torch.rand(channels) + 0.5 if affine else None,
        "bias": torch.randn(channels) * 0.2 if affine else None,
        "running_mean": torch.randn(channels) * 0.1 if track else None,
        "running_var": torch.rand(channels) + 0.5 if track else None,
        "num_batches_tracked": torch.tensor(3) if track else None,
    }


def activation(case: Case, channels: int, dtype, layout: str, device: str) -> torch.Tensor:
    x = torch.randn(case.batch, channels, *case.size) + 0.1
    return x.to(device=device, dtype=dtype).contiguous(memory_format=LAYOUTS[layout])


def conv_weight(case: Case, dtype, device: str) -> torch.Tensor:
    fan_in = case.channels // case.groups * case.kernel**2
    w = torch.randn(case.out_channels, case.channels // case.groups, case.kernel, case.kernel) / math.sqrt(fan_in)
    return w.to(device=device, dtype=dtype)


BN_NAMES = ("bn_", "s_", "running_")  # BN parameters and buffers: float32 beside half activations


def cast(tensors: Dict[str, Optional[torch.Tensor]], dtype, device, grad=True):
    """A fresh copy of every tensor on `device`: activations and conv parameters in `dtype`, BN state in
    `dtype` too unless that is a half type (then float32, as in a mixed-precision model); floating
    leaves that are not buffers require grad."""
    out = {}
    for name, t in tensors.items():
        if t is None or not t.is_floating_point():
            out[name] = None if t is None else t.clone().to(device)
            continue
        half = dtype in (torch.float16, torch.bfloat16)
        t = t.detach().clone().to(device=device, dtype=torch.float32 if half and name.startswith(BN_NAMES) else dtype)
        out[name] = t.requires_grad_(grad and "running_" not in name)
    return out


def run(fn, tensors, grad_dtype, grad_out_seed: int = 1):
    """Calls fn(tensors), backpropagates a fixed random gradient (representable in grad_dtype);
    returns (out, grads, state)."""
    out = fn(tensors)
    gen = torch.Generator().manual_seed(grad_out_seed)
    grad_out = torch.randn(out.shape, generator=gen).to(grad_dtype).to(device=out.device, dtype=out.dtype)
    out.backward(grad_out)
    grads = {n: t.grad for n, t in tensors.items() if t is not None and t.requires_grad}
    state = {n: t for n, t in tensors.items() if t is not None and ("running_" in n or "num_batches" in n)}
    return out, grads, state


def compare(fn, tensors, dtype, device, backend):
    """Runs fn on `backend` in `dtype` and checks output, gradients and running statistics against the
    reference backend in float64; bf16/fp16 bounds come from eager PyTorch's own error.

    The inputs are first rounded to `dtype`, so the float64 reference computes the exact function of
    the very values the backend sees: what is measured is the computation's rounding, not the inputs'
    (rounded inputs can flip ReLU masks, an error eager PyTorch shares and no kernel can avoid)."""
    tensors = cast(cast(tensors, dtype, "cpu", grad=False), torch.float32, "cpu", grad=False)
    expected = run(lambda t: fn(t, "reference"), cast(tensors, torch.float64, "cpu"), dtype)
    actual = run(lambda t: fn(t, backend), cast(tensors, dtype, device), dtype)
    half = dtype in (torch.bfloat16, torch.float16)
    eager = run(lambda t: fn(t, "reference"), cast(tensors, dtype, device), dtype) if half else None
    assert_close(actual[0], expected[0], dtype, eager and eager[0], "forward", "output")
    assert actual[0].dtype == dtype
    for name, grad in expected[1].items():
        assert_close(actual[1][name], grad, dtype, eager and eager[1][name], "backward", f"grad of {name}")
    for name, value in expected[2].items():
        if value.is_floating_point():
            stat_dtype = dtype if half else torch.float32
            assert_close(actual[2][name].float(), value, stat_dtype, eager and eager[2][name], what=name)
        else:
            assert torch.equal(actual[2][name].cpu(), value), name
    return actual
