"""The accumulation rule, in one place for every Python layer (the C++ kernels have theirs in
csrc/batch_norm_args.h): statistics and sums run in float32, or float64 for float64 input. A leaf module
(it imports nothing of pyfast), so that the kernels at the bottom can use it too."""
import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics and accumulations of `dtype` values run in."""
    return torch.float64 if dtype == torch.float64 else torch.float32
