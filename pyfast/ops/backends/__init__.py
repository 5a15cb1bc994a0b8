"""The backend registry and the dispatcher that picks one per call.

Order of precedence: the call's `backend=` argument, then a module's override (passed down the same
way), then `pyfast.set_backend(...)`, then the PYFAST_BACKEND environment variable, then "auto": the
first backend in the device's priority list that can take the call. A backend asked for by name that
cannot take the call raises with its reason; only "auto" moves on to the next one.
"""
import contextlib
from typing import Dict, Iterator, List, Optional

import torch
from torch import Tensor

from ... import _extension, _flags
from .base import Backend
from .extension import ExtensionBackend
from .reference import ReferenceBackend
from .triton import TritonBackend

BACKENDS: Dict[str, Backend] = {
    backend.name: backend
    for backend in (ReferenceBackend(), ExtensionBackend("cpu"), ExtensionBackend("cuda"), TritonBackend())
}
# Fastest first. On CUDA the Triton kernels fuse the BN passes into the convolution itself; the csrc
# kernels fuse only the BN passes. GPU benchmarks (benchmarks/results/) are what this order rests on.
PRIORITY: Dict[str, List[str]] = {"cuda": ["triton", "cuda", "reference"], "cpu": ["cpu", "reference"]}
AUTO = "auto"


def _check_name(name: str) -> str:
    if name != AUTO and name not in BACKENDS:
        raise ValueError(f"unknown pyfast backend {name!r}; choose from {[AUTO, *BACKENDS]}")
    return name


_default = _check_name(_flags.BACKEND)


def set_backend(name: str) -> str:
    """Sets the process-wide default backend ("auto", "reference", "cpu", "cuda", "triton").
    Returns the previous one."""
    global _default
    previous, _default = _default, _check_name(name)
    return previous


def get_backend() -> str:
    return _default


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """`with pyfast.use_backend("reference"): ...` — the default backend inside the block."""
    previous = set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


@torch.compiler.assume_constant_result
def _why_not(name: str, op: str, device: torch.device, dtype: torch.dtype) -> str:
    """Backend `name`'s answer for this call ("" = it can run it). A constant to torch.compile: what a
    backend supports does not change while a process runs, so the choice is made once at trace time."""
    return BACKENDS[name].why_not(op, device, dtype) or ""


@torch.compiler.assume_constant_result
def _auto(op: str, device: torch.device, dtype: torch.dtype) -> str:
    """The first backend of the device's priority list that can run the call."""
    return next(name for name in PRIORITY.get(device.type, ["reference"]) if not _why_not(name, op, device, dtype))


def select(op: str, x: Tensor, requested: Optional[str] = None) -> Backend:
    """The backend that runs `op` on input `x`."""
    name = _check_name(requested or _default)
    if name != AUTO:
        reason = _why_not(name, op, x.device, x.dtype)
        if reason:
            raise RuntimeError(f"pyfast backend {name!r} cannot run {op} on this input: {reason}")
        return BACKENDS[name]
    name = _auto(op, x.device, x.dtype)
    if name == "reference":
        _extension.warn_unavailable_once()
    return BACKENDS[name]


def table() -> List[dict]:
    """One row per backend: what it runs, and why it cannot run here (for `python -m pyfast info`)."""
    return [
        {"backend": name, "devices": ", ".join(b.device_types),
         "dtypes": ", ".join(str(d).replace("torch.", "") for d in b.dtypes),
         "available": b.unavailable() is None, "why_not": b.unavailable() or "", "what": b.description}
        for name, b in BACKENDS.items()
    ]
