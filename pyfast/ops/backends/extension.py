"""The `cpu` and `cuda` backends: pyfast's own C++/CUDA BN kernels (csrc/, torch.ops.pyfast.*) around
ATen's convolution (oneDNN on CPU, cuDNN on CUDA)."""
from typing import Optional

import torch

from ... import _extension
from .base import Backend


def _has_kernel(op: str, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"pyfast::{op}", dispatch_key)


class ExtensionBackend(Backend):
    def __init__(self, device_type: str):
        self.name = device_type
        self.device_types = (device_type,)
        self.description = f"csrc {device_type.upper()} BN kernels + ATen convolution"
        if device_type == "cuda":
            self.dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
        self._unavailable = self._probe()  # pyfast._C is loaded before the backends are built

    def unavailable(self) -> Optional[str]:
        return self._unavailable

    def _probe(self) -> Optional[str]:
        if not _extension.available():
            return f"pyfast._C is not built ({_extension.load_error})"
        if not _has_kernel("bn_stats", self.name.upper()):
            return f"pyfast._C was built without {self.name.upper()} kernels"
        return None

    def bn_stats(self, x):
        return torch.ops.pyfast.bn_stats(x)

    def bn_act_forward(self, *args):
        return torch.ops.pyfast.bn_act_forward(*args)

    def bn_act_backward_reduce(self, *args):
        return torch.ops.pyfast.bn_act_backward_reduce(*args)

    def bn_act_backward_elemt(self, *args):
        return torch.ops.pyfast.bn_act_backward_elemt(*args)

    def conv_bias_act(self, x, weight, bias, params, relu):
        # cuDNN's own fused convolution + bias + ReLU: one kernel instead of a conv and an extra pass.
        if relu and self.name == "cuda" and x.dtype != torch.float64:
            stride, padding, dilation, groups = params.as_lists()
            return torch.cudnn_convolution_relu(x, weight, bias, stride, padding, dilation, groups)
        return super().conv_bias_act(x, weight, bias, params, relu)
