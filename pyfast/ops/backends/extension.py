"""The `cpu` and `cuda` backends: pyfast's own C++/CUDA BN kernels (csrc/, torch.ops.pyfast.*) around
ATen's convolution (oneDNN on CPU, cuDNN on CUDA)."""
from typing import Optional

import torch
from torch import Tensor

from ... import _extension
from ..._numerics import acc_dtype
from .base import Backend


def _channels(like: Tensor, length: Optional[int] = None) -> Tensor:
    """A fresh per-channel vector: `length` (default: like's channels) values of like's acc dtype."""
    return like.new_empty(like.shape[1] if length is None else length, dtype=acc_dtype(like.dtype))


def _like_input(x: Tensor) -> Tensor:
    """An output shaped like x in the memory order the kernels write: channels innermost (channels_last)
    when x has them so, NCHW-contiguous otherwise."""
    channels_innermost = x.movedim(1, -1).is_contiguous() and not x.is_contiguous()
    return torch.empty_like(x if channels_innermost else x.contiguous())


def _register_fakes() -> None:
    """Fake (meta) implementations of the torch.ops.pyfast primitives: shapes, dtypes and strides of their
    outputs, so that torch.compile and opcheck can trace through them without running a kernel."""

    @torch.library.register_fake("pyfast::bn_stats")
    def _(x):
        return _channels(x), _channels(x)

    @torch.library.register_fake("pyfast::bn_act_forward")
    def _(x, scale, shift, residual, res_scale, res_shift, relu):
        return _like_input(x)

    @torch.library.register_fake("pyfast::bn_act_forward_")
    def _(x, scale, shift, residual, res_scale, res_shift, relu):
        return x

    @torch.library.register_fake("pyfast::bn_act_backward_reduce")
    def _(grad_out, x, scale, shift, mean, invstd, residual, res_scale, res_shift, res_mean, res_invstd, relu):
        return _channels(x), _channels(x), _channels(x, x.shape[1] if res_mean is not None else 0)

    @torch.library.register_fake("pyfast::bn_act_backward_elemt")
    def _(grad_out, x, scale, shift, mean, invstd, residual, res_scale, res_shift, res_mean, res_invstd, relu,
          sum_dz, sum_dz_xhat, sum_dz_rhat, count):
        return _like_input(x), _like_input(x) if residual is not None else x.new_empty(0)

    @torch.library.register_fake("pyfast::bn_finalize")
    def _(mean, var, weight, bias, running_mean, running_var, num_batches_tracked, count, momentum, eps, update):
        return tuple(mean.new_empty(mean.shape, dtype=acc_dtype(mean.dtype)) for _ in range(3))


if _extension.available():
    _register_fakes()


def _primitive(name: str):
    """A backend method calling primitive `name`: in eager mode through pyfast._C's direct binding (a
    torch.ops call costs ~10 us of Python argument handling, more than the kernel on small inputs), under
    torch.compile through torch.ops.pyfast, which Dynamo traces with the fakes above. Both reach the same
    dispatcher entry."""
    op = getattr(torch.ops.pyfast, name) if _extension.available() else None
    direct = getattr(_extension.extension, name, op)

    def call(self, *args):
        return (op if torch.compiler.is_compiling() else direct)(*args)

    call.__name__ = name
    return call


def _has_kernel(op: str, dispatch_key: str) -> bool:
    return getattr(torch.ops.pyfast, op).default.has_kernel_for_dispatch_key(dispatch_key)


class ExtensionBackend(Backend):
    def __init__(self, device_type: str):
        self.name = device_type
        self.device_types = (device_type,)
        self.description = f"csrc {device_type.upper()} BN kernels + ATen convolution"
        if device_type == "cuda":
            self.dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
        self._unavailable = self._probe()  # pyfast._C is loaded before the backends are built
        if self._unavailable is None:
            self.eager_autograd = _extension.extension

    def unavailable(self) -> Optional[str]:
        return self._unavailable

    def _probe(self) -> Optional[str]:
        if not _extension.available():
            return f"pyfast._C is not built ({_extension.load_error})"
        if not _has_kernel("bn_stats", self.name.upper()):
            return f"pyfast._C was built without {self.name.upper()} kernels"
        return None

    bn_stats = _primitive("bn_stats")
    bn_act_forward = _primitive("bn_act_forward")
    bn_act_forward_ = _primitive("bn_act_forward_")
    bn_act_backward_reduce = _primitive("bn_act_backward_reduce")
    bn_act_backward_elemt = _primitive("bn_act_backward_elemt")
    bn_finalize = _primitive("bn_finalize")

    def conv_bias_act(self, x, weight, bias, params, relu):
        # Eager: pyfast._C's, with the convolution's epilogue (cuDNN's fused conv + bias + ReLU; on CPU one
        # in-place bias + ReLU pass after a bias-less convolution). Under torch.compile the composite, whose
        # epilogue inductor fuses itself.
        if torch.compiler.is_compiling():
            return super().conv_bias_act(x, weight, bias, params, relu)
        return _extension.extension.conv_bias_act(x, weight, bias, params.stride, params.padding, params.dilation,
                                                  params.groups, relu)

    # Eager only (memoized inference calls never run under torch.compile): straight to pyfast._C's bindings.
    def inference_conv(self, weight, bias, params, relu):
        conv_bias_act = _extension.extension.conv_bias_act
        stride, padding, dilation, groups = params
        return lambda x: conv_bias_act(x, weight, bias, stride, padding, dilation, groups, relu)

    def inference_bn_act(self, scale, shift, res_scale, res_shift, relu):
        bn_act_forward = _extension.extension.bn_act_forward
        return lambda x, residual: bn_act_forward(x, scale, shift, residual, res_scale, res_shift, relu)

    def inference_conv_add(self, weight, bias, params, res_scale, res_shift, relu):
        bn_act_forward_ = _extension.extension.bn_act_forward_
        stride, padding, dilation, groups = params.as_lists()
        shift = None if bias is None else bias.to(acc_dtype(bias.dtype))

        def run(x, residual):
            y = torch.convolution(x, weight, None, stride, padding, dilation, False, [0, 0], groups)
            return bn_act_forward_(y, None, shift, residual, res_scale, res_shift, relu)
        return run
