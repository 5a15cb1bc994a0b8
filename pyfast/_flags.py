"""Every environment variable pyfast reads, read once here at import.

A leaf module (it imports nothing but `os`), so that every layer, the Triton kernels at the bottom
included, reads the same values parsed by the same rule. A switch is on for 1/true/yes/on and off for
0/false/no/off, case-insensitively (Triton's own reading of TRITON_INTERPRET takes the same words);
unset or empty means its default, and anything else raises, naming the variable. setup.py keeps a copy
of `flag`, because it runs before pyfast can be imported.

    TRITON_INTERPRET        Triton kernels run in Triton's interpreter, on CPU tensors (tests)
    PYFAST_NO_EXTENSION     do not load pyfast._C (every op runs on the reference backend)
    PYFAST_TRITON_AUTOTUNE  on by default; off keeps one config per Triton kernel (GPU test runs)
    PYFAST_BENCH_COMPILE    the CPU benchmark suites time torch.compile too
    PYFAST_BACKEND          the default op backend ("auto" unless set), checked by pyfast.ops
    PYFAST_LEAN             on by default; off keeps every activation for the backward (pyfast.ops.lean)
    PYFAST_NO_CUDA          (setup.py only) build the extension without its CUDA kernels
"""
import os

_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")


def flag(name: str, default: bool = False) -> bool:
    """The switch `name` from the environment, `default` when it is unset or empty."""
    word = os.environ.get(name, "").strip().lower()
    if not word:
        return default
    if word in _ON:
        return True
    if word in _OFF:
        return False
    raise ValueError(f"environment variable {name}={os.environ[name]!r}: {'/'.join(_ON)} switches it on, "
                     f"{'/'.join(_OFF)} off")


TRITON_INTERPRET = flag("TRITON_INTERPRET")
NO_EXTENSION = flag("PYFAST_NO_EXTENSION")
TRITON_AUTOTUNE = flag("PYFAST_TRITON_AUTOTUNE", default=True)
BENCH_COMPILE = flag("PYFAST_BENCH_COMPILE")
BACKEND = os.environ.get("PYFAST_BACKEND", "auto")
LEAN = flag("PYFAST_LEAN", default=True)
