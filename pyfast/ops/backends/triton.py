"""The `triton` backend: pyfast's Triton kernels (kernels/, imported as pyfast.kernels).

Forward convolutions run through the implicit-GEMM kernel with BN fused into its epilogue (batch
statistics in training, bias+ReLU in inference) or its prologue (pre-activation). The convolution
backward (input and weight gradients) goes through ATen, i.e. cuDNN: its dgrad/wgrad kernels are tuned
per architecture and shape, our epilogue fusions have nothing to fuse there (the BN backward passes run
before it as two Triton kernels), so a Triton dgrad/wgrad would only match cuDNN at best.
"""
import functools
import importlib
from typing import Optional

import torch

from ... import _flags
from .base import Backend


@functools.lru_cache(maxsize=None)
def _kernels():
    """(conv module, batch_norm module), or the ImportError text when Triton is missing."""
    try:
        return importlib.import_module("pyfast.kernels.conv"), importlib.import_module("pyfast.kernels.batch_norm")
    except ImportError as error:
        return str(error)


class TritonBackend(Backend):
    name = "triton"
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    description = "Triton implicit-GEMM conv with fused BN prologue/epilogue + Triton BN passes"

    @property
    def device_types(self):
        # Under TRITON_INTERPRET=1 the kernels run on CPU tensors in Triton's interpreter (tests).
        return ("cuda", "cpu") if _flags.TRITON_INTERPRET else ("cuda",)

    def unavailable(self) -> Optional[str]:
        kernels = _kernels()
        return f"triton is not importable ({kernels})" if isinstance(kernels, str) else None

    def why_not(self, op, device, dtype):
        reason = super().why_not(op, device, dtype)
        if reason is None and device.type == "cuda" and torch.cuda.get_device_capability(device) < (7, 0):
            reason = "the Triton kernels need compute capability >= 7.0 (tensor-core tl.dot)"
        return reason

    def output_memory_format(self, x):
        # The implicit GEMM works on NHWC: its outputs are channels_last whatever the input's format.
        return torch.channels_last

    @property
    def _conv(self):
        return _kernels()[0]

    @property
    def _bn(self):
        return _kernels()[1]

    def bn_stats(self, x):
        return self._bn.bn_stats(x)

    def bn_act_forward(self, *args):
        return self._bn.bn_act_forward(*args)

    def bn_act_forward_(self, *args):
        return self._bn.bn_act_forward_(*args)

    def bn_act_backward_reduce(self, *args):
        return self._bn.bn_act_backward_reduce(*args)

    def bn_act_backward_elemt(self, *args):
        return self._bn.bn_act_backward_elemt(*args)

    def bn_finalize(self, *args):
        return self._bn.bn_finalize(*args)

    def conv(self, x, weight, bias, params):
        return self._conv.conv2d(x, weight, bias, *params.as_lists())

    def conv_bn_stats(self, x, weight, bias, params):
        return self._conv.conv2d(x, weight, bias, *params.as_lists(), compute_stats=True)

    def conv_bias_act(self, x, weight, bias, params, relu):
        return self._conv.conv2d(x, weight, bias, *params.as_lists(), relu=relu)

    def inference_conv_add(self, weight, bias, params, res_scale, res_shift, relu):
        # one launch: the shortcut (and its BN) added in the convolution's epilogue
        conv2d, lists = self._conv.conv2d, params.as_lists()
        return lambda x, residual: conv2d(x, weight, bias, *lists, relu=relu, residual=residual, res_scale=res_scale,
                                          res_shift=res_shift)

    def bn_act_conv(self, x, scale, shift, relu, weight, bias, params):
        if x.dtype != weight.dtype:  # autocast: the prologue reads and multiplies in one dtype
            return super().bn_act_conv(x, scale, shift, relu, weight, bias, params)
        out = self._conv.conv2d(x, weight, bias, *params.as_lists(), in_scale=scale, in_shift=shift, in_relu=relu)
        return out, None
