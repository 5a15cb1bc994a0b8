"""The `cpu` and `cuda` backends: pyfast's own C++/CUDA BN kernels (csrc/, torch.ops.pyfast.*) around
ATen's convolution (oneDNN on CPU, cuDNN on CUDA)."""
from typing import Optional

import torch

from ... import _extension
from .base import Backend


def _onednn_conv_relu():
    """oneDNN's convolution with a ReLU post-op (what inductor emits on CPU), where this PyTorch has it."""
    if not torch.backends.mkldnn.is_available():
        return None
    return getattr(getattr(torch.ops.mkldnn, "_convolution_pointwise", None), "default", None)


_ONEDNN_CONV_RELU = _onednn_conv_relu()


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
        # The vendor library's own fused convolution + bias + ReLU: one kernel instead of a conv and a pass.
        if relu and x.dtype == torch.float32 or relu and x.dtype != torch.float64 and self.name == "cuda":
            stride, padding, dilation, groups = params.as_lists()
            if self.name == "cuda":
                return torch.cudnn_convolution_relu(x, weight, bias, stride, padding, dilation, groups)
            if _ONEDNN_CONV_RELU is not None:
                return _ONEDNN_CONV_RELU(x, weight, bias, padding, stride, dilation, groups, "relu", [], "")
        return super().conv_bias_act(x, weight, bias, params, relu)
