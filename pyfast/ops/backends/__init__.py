"""The backend registry and the dispatcher that picks one per call.

Order of precedence: the call's `backend=` argument, then a module's override (passed down the same
way), then `pyfast.set_backend(...)`, then the PYFAST_BACKEND environment variable, then "auto": the
backend that auto.py's table (or its default rule) names for the call's op and shape class, else the
next in the device's priority list that can take the call. A backend asked for by name that cannot take
the call raises with its reason; only "auto" moves on to the next one.
"""
import contextlib
from typing import Counter, Dict, Iterator, List, Optional

import torch
from torch import Tensor

from ... import _extension, _flags
from .._conv import ConvParams, memory_format_of
from . import auto
from .base import Backend
from .extension import ExtensionBackend
from .reference import ReferenceBackend
from .triton import TritonBackend

BACKENDS: Dict[str, Backend] = {
    backend.name: backend
    for backend in (ReferenceBackend(), ExtensionBackend("cpu"), ExtensionBackend("cuda"), TritonBackend())
}
# The fallback order behind auto.py's per-shape choice (which goes first): a backend that cannot take the
# call (not built, unsupported dtype) gives way to the next.
PRIORITY: Dict[str, List[str]] = {"cuda": ["cuda", "triton", "reference"], "cpu": ["cpu", "reference"]}
AUTO = "auto"


def check_name(name: Optional[str], optional: bool = False) -> Optional[str]:
    """`name` if it names a backend or "auto" (or, with `optional`, is None: the default applies); the one
    place that says which names are valid."""
    if (name is None and optional) or name == AUTO or name in BACKENDS:
        return name
    choices = [AUTO, *BACKENDS] + (["None"] if optional else [])
    raise ValueError(f"unknown pyfast backend {name!r}; choose from {choices}")


_default = check_name(_flags.BACKEND)


def set_backend(name: str) -> str:
    """Sets the process-wide default backend ("auto", "reference", "cpu", "cuda", "triton").
    Returns the previous one."""
    global _default
    previous, _default = _default, check_name(name)
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


def auto_order(device_type: str, op: str, dtype: torch.dtype, layout: str, groups: int = 1, group_width: int = 0,
               kernel: int = 1, stride: int = 1) -> List[str]:
    """The backends `auto` tries for one shape class, in order: the table's (or default rule's) choice first."""
    order = PRIORITY.get(device_type, ["reference"])
    first = auto.choice(device_type, op, auto.DTYPE_NAMES.get(dtype, str(dtype)), layout, groups, group_width,
                        kernel, stride)
    return order if first is None else [first] + [name for name in order if name != first]


@torch.compiler.assume_constant_result
def _auto(op: str, device: torch.device, dtype: torch.dtype, layout: str, groups: int, group_width: int, kernel: int,
          stride: int) -> str:
    """The first backend of the shape class's order that can run the call (what the backends support and
    the table say do not change while it is in use: a constant to torch.compile)."""
    order = auto_order(device.type, op, dtype, layout, groups, group_width, kernel, stride)
    return next(name for name in order if not _why_not(name, op, device, dtype))


_recorded: Optional[Counter] = None


@contextlib.contextmanager
def record_choices() -> Iterator[Counter]:
    """`with record_choices() as seen: model(x)`: counts `seen[(op, backend)]` for every op call `auto` or
    a named backend dispatched in the block (eager calls; a compiled graph decides once, at trace time)."""
    global _recorded
    previous, _recorded = _recorded, Counter()
    try:
        yield _recorded
    finally:
        _recorded = previous


def select(op: str, x: Tensor, requested: Optional[str] = None, *, weight: Optional[Tensor] = None,
           params: Optional[ConvParams] = None) -> Backend:
    """The backend that runs `op` on input `x`. The ops that convolve pass their `weight` (after
    autocast's cast) and `params`: `auto` then chooses by the convolution's shape class too."""
    name = requested or _default
    device = x.device
    shape = _NO_SHAPE_CLASS
    if name == AUTO and auto.by_shape_class(device.type):
        shape = _shape_class_args(x, weight, params)
    if torch.compiler.is_compiling():
        return BACKENDS[_choose(op, name, device, x.dtype, shape)]
    # Eager: memoized per call signature (a network asks again for the same few on every call); a new table
    # means new answers.
    if auto.TABLE is not _selected_for:
        _new_table()
    key = (op, name, device, x.dtype, shape)
    chosen = _selected.get(key)
    if chosen is None:
        chosen = _selected[key] = BACKENDS[_choose(op, name, device, x.dtype, shape)]
    if _recorded is not None:
        _recorded[(op, chosen.name)] += 1
    return chosen


def choice_settings(requested: Optional[str]):
    """What `select`'s answer depends on besides the call's own arguments: the backend asked for (or the
    default) and auto's table. For callers that memoize a resolved call; None while `record_choices` counts
    (every call must then reach select)."""
    if _recorded is not None:
        return None
    return requested or _default, auto.TABLE


_selected: Dict[tuple, Backend] = {}
_selected_for = auto.TABLE  # the table _selected's answers come from


def _new_table() -> None:
    global _selected_for
    _selected.clear()
    _selected_for = auto.TABLE


_NO_SHAPE_CLASS = ("nchw", 1, 0, 1, 1)  # where auto's choice does not depend on the shape class


def _choose(op: str, name: str, device: torch.device, dtype: torch.dtype, shape: tuple) -> str:
    """The backend `name` names for this call (checked: raises if it cannot run it), or auto's choice."""
    name = check_name(name)
    if name != AUTO:
        reason = _why_not(name, op, device, dtype)
        if reason:
            raise RuntimeError(f"pyfast backend {name!r} cannot run {op} on this input: {reason}")
        return name
    name = _auto(op, device, dtype, *shape)
    if name == "reference":
        _extension.warn_unavailable_once()
    return name


def _shape_class_args(x: Tensor, weight: Optional[Tensor], params: Optional[ConvParams]):
    """(layout, groups, group width, kernel size, stride) of a call; (layout, 1, 0, 1, 1) without a weight."""
    layout = "channels_last" if memory_format_of(x) == torch.channels_last else "nchw"
    if weight is None:
        return layout, 1, 0, 1, 1
    params = params or ConvParams()
    return layout, params.groups, int(weight.shape[1]), int(max(weight.shape[2:])), int(max(params.stride))


def table() -> List[dict]:
    """One row per backend: what it runs, and why it cannot run here (for `python -m pyfast info`)."""
    return [
        {"backend": name, "devices": ", ".join(b.device_types),
         "dtypes": ", ".join(str(d).replace("torch.", "") for d in b.dtypes),
         "available": b.unavailable() is None, "why_not": b.unavailable() or "", "what": b.description}
        for name, b in BACKENDS.items()
    ]
