"""The convolution shape rules, in one place for every layer: the Triton kernels, the op layer, the
models' complexity and the benchmarks. A leaf module (it imports nothing of pyfast), so that the
kernels at the bottom can use it too."""
import operator
from typing import Optional, Sequence, Tuple, Union

IntPair = Union[int, Sequence[int]]


def pair(value: IntPair, name: str = "value", minimum: Optional[int] = None) -> Tuple[int, int]:
    """`value` as (height, width): an int stands for both. ValueError naming `name` for anything but
    an int or two ints, or (with `minimum`) an int below it."""
    try:
        if isinstance(value, str):
            raise TypeError
        items = tuple(value) if hasattr(value, "__len__") else (value, value)
        result = tuple(operator.index(v) for v in items)
    except TypeError:
        result = ()
    if len(result) != 2 or (minimum is not None and min(result) < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name} must be an int or a pair of ints{bound}, got {value!r}")
    return result


def conv_output_size(height: int, width: int, kernel: IntPair, stride: IntPair = 1, padding: IntPair = 0,
                     dilation: IntPair = 1) -> Tuple[int, int]:
    """(OH, OW) of a convolution, as nn.Conv2d computes it: (H + 2*pad - dil*(K - 1) - 1) // stride + 1."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (pair(v, n) for v, n in (
        (kernel, "kernel"), (stride, "stride"), (padding, "padding"), (dilation, "dilation")))
    return (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
