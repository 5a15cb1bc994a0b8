"""Loads the compiled extension pyfast._C, which registers the C++/CUDA kernels as torch.ops.pyfast.*,
and the record setup.py wrote of what it built (pyfast/_build_info.py).

The build degrades (setup.py): without the extension every op still runs, on the reference backend,
and a single warning says so.
"""
import importlib
import warnings

import torch  # noqa: F401  (loads libtorch/libc10 into the process: pyfast._C links against them)

from . import _flags


def _load():
    if _flags.NO_EXTENSION:
        return None, "PYFAST_NO_EXTENSION is set"
    try:
        return importlib.import_module("pyfast._C"), None
    except ImportError as error:
        return None, str(error)


def _build_record():
    """setup.py's record (`extension`, `cuda`: the CUDA version the kernels were built with or None,
    `cuda_archs`, `cpu_vectors`: the vector ISA of the C++ kernels, AVX2 or None for portable code), or None
    in a source tree that was never built."""
    try:
        return importlib.import_module("pyfast._build_info")
    except ImportError:
        return None


extension, load_error = _load()
build = _build_record()
_warned = False


def available():
    return extension is not None


def built_with_cuda() -> bool:
    """Whether the loaded pyfast._C was built with its CUDA kernels (by setup.py's record)."""
    return extension is not None and build is not None and bool(build.cuda)


def warn_unavailable_once():
    """Called by the dispatcher when a call falls back to the reference backend for lack of _C."""
    global _warned
    if not _warned and extension is None:
        _warned = True
        warnings.warn(
            f"pyfast._C is not available ({load_error}); pyfast runs its ops on the slower "
            "reference backend. Rebuild with `pip install --no-build-isolation .`.",
            RuntimeWarning,
            stacklevel=3,
        )
