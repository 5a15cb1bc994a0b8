"""What `auto` runs, per device, op and shape class: a small table measured on a GPU
(auto_table.json, written by `python -m pyfast.benchmarks.backend_table` from the GPU script's kernel
timings), and a default rule where the table is silent.

A shape class is what decides between cuDNN and the Triton kernels: for the ops that convolve, dense /
depthwise / grouped with its group width (rounded up to a power of two), the kernel size and the stride;
for every op the dtype and the activation's memory layout. Example keys:
`conv_bn_relu grouped-gw16 k3 s1 bf16 channels_last`, `bn_add_relu bf16 channels_last`.

The default rule, until a GPU has measured the class: cuDNN's convolution with pyfast's fused BN passes
(the `cuda` backend), since Triton implicit-GEMM convolutions are commonly 2-3x behind cuDNN on dense
ones (triton #772); the Triton kernels only where their advantage is structural: grouped convolutions
at RegNet group widths in channels_last, where cuDNN's NHWC grouped kernels are slow (pytorch #34977,
#70954).
"""
import json
import os
from typing import Dict, Optional

import torch

TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "auto_table.json")
CONV_OPS = ("conv_bn_relu", "bn_relu_conv", "conv_bn_add_relu")
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
# RegNet's group widths (8 for RegNetX-200MF up to 168 for RegNetX-32GF, after rounding up: 256).
TRITON_GROUP_WIDTHS = (8, 256)


def _round_up_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def conv_kind(groups: int, group_width: int) -> str:
    """'dense', 'depthwise' (one input channel per group) or 'grouped-gw<width rounded up to 2^k>'."""
    if groups <= 1:
        return "dense"
    if group_width <= 1:
        return "depthwise"
    return f"grouped-gw{_round_up_pow2(group_width)}"


def shape_class(op: str, dtype: str, layout: str, groups: int = 1, group_width: int = 0, kernel: int = 1,
                stride: int = 1) -> str:
    """The table key of one call; `dtype` as 'bf16'/'fp16'/'fp32', `layout` 'channels_last' or 'nchw'.
    The convolution fields count only for the ops that convolve."""
    if op not in CONV_OPS:
        return f"{op} {dtype} {layout}"
    return f"{op} {conv_kind(groups, group_width)} k{kernel} s{stride} {dtype} {layout}"


def default_choice(op: str, groups: int, group_width: int, layout: str) -> str:
    low, high = TRITON_GROUP_WIDTHS
    if op in CONV_OPS and groups > 1 and low <= group_width <= high and layout == "channels_last":
        return "triton"
    return "cuda"


def load_table(path: str = TABLE_PATH) -> Dict[str, Dict[str, str]]:
    """{device type: {shape class: backend}} from the committed JSON ({} when it has no entries)."""
    with open(path) as f:
        doc = json.load(f)
    return {device: {key: entry["use"] for key, entry in choices.items()}
            for device, choices in doc.get("choices", {}).items()}


TABLE = load_table()


def by_shape_class(device_type: str) -> bool:
    """Whether `choice` can differ between shape classes on this device: on CUDA (the default rule does), or
    where the table has entries."""
    return device_type == "cuda" or device_type in TABLE


def choice(device_type: str, op: str, dtype: str, layout: str, groups: int = 1, group_width: int = 0,
           kernel: int = 1, stride: int = 1) -> Optional[str]:
    """The backend the table (or, on CUDA, the default rule) puts first; None: the device's plain
    priority order decides (the CPU)."""
    key = shape_class(op, dtype, layout, groups, group_width, kernel, stride)
    measured = TABLE.get(device_type, {}).get(key)
    if measured is not None:
        return measured
    return default_choice(op, groups, group_width, layout) if device_type == "cuda" else None
