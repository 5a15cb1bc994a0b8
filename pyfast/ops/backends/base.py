"""What a backend is: capabilities that answer *why not*, the five BN primitives, convolution, and
three fusable steps whose composite defaults a backend overrides with a fused kernel."""
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..._numerics import acc_dtype
from ... import _extension
from .._bn import BatchNormArgs, update_running_stats
from .._conv import ConvParams, memory_format_of

# ATen's convolution backward has no generated Python binding; pyfast._C's direct one skips the ~10 us a
# torch.ops call spends on argument handling (None without the extension).
_DIRECT_CONV_BACKWARD = getattr(_extension.extension, "convolution_backward", None)

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class Backend:
    name: str = ""
    device_types: Tuple[str, ...] = ()
    dtypes: Tuple[torch.dtype, ...] = FLOAT_DTYPES
    description: str = ""
    # The backend's own autograd for the fused ops in eager mode: a module with conv_bn_relu, bn_relu_conv,
    # bn_add_relu and add_relu taking an op's checked arguments (pyfast._C's C++ Functions, csrc/autograd/).
    # None: the Python autograd.Functions of pyfast.ops, which also serve torch.compile.
    eager_autograd = None

    # -- capabilities -------------------------------------------------------------------------
    def unavailable(self) -> Optional[str]:
        """Why this backend cannot run at all on this installation (None: it can)."""
        return None

    def why_not(self, op: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        """None when this backend can run `op` on an input of this device and dtype, else the reason."""
        reason = self.unavailable()
        if reason:
            return reason
        if device.type not in self.device_types:
            return f"runs on {'/'.join(self.device_types)} tensors, not {device.type}"
        if dtype not in self.dtypes:
            return f"does not support {dtype} (supports {', '.join(str(d) for d in self.dtypes)})"
        return None

    def output_memory_format(self, x: Tensor) -> torch.memory_format:
        """Outputs follow the input's memory format (channels_last in, channels_last out)."""
        return memory_format_of(x)

    # -- the BN primitives (docs/ARCHITECTURE.md, section 1) -----------------------------------
    def bn_stats(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def bn_act_forward(self, x, scale, shift, residual, res_scale, res_shift, relu: bool) -> Tensor:
        raise NotImplementedError

    def bn_act_forward_(self, x, scale, shift, residual, res_scale, res_shift, relu: bool) -> Tensor:
        """bn_act_forward written into x itself, for an activation nothing else reads (a convolution's fresh
        output in inference); x is NCHW-contiguous or channels_last."""
        raise NotImplementedError

    def bn_act_backward_reduce(self, grad_out, x, scale, shift, mean, invstd, residual, res_scale, res_shift,
                               res_mean, res_invstd, relu: bool):
        raise NotImplementedError

    def bn_act_backward_elemt(self, grad_out, x, scale, shift, mean, invstd, residual, res_scale, res_shift,
                              res_mean, res_invstd, relu: bool, sum_dz, sum_dz_xhat, sum_dz_rhat, count: int):
        raise NotImplementedError

    def bn_finalize(self, mean, var, weight, bias, running_mean, running_var, num_batches_tracked, count: int,
                    momentum, eps: float, update: bool):
        """(scale, shift, invstd) of a BN from (mean, biased var), and with `update` nn.BatchNorm2d's
        running-statistics update in place. This composite of ATen ops is the semantics; each kernel backend
        overrides it with one kernel."""
        acc = acc_dtype(mean.dtype)
        invstd = torch.rsqrt(var.to(acc) + eps)
        scale = invstd if weight is None else weight.to(acc) * invstd
        shift = -mean.to(acc) * scale if bias is None else bias.to(acc) - mean.to(acc) * scale
        if update:
            running = BatchNormArgs(None, None, running_mean, running_var, num_batches_tracked, momentum, eps)
            update_running_stats(running, mean, var, count)
        return scale, shift, invstd

    # -- convolution (ATen: cuDNN on CUDA, oneDNN on CPU) --------------------------------------
    def conv(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], params: ConvParams) -> Tensor:
        stride, padding, dilation, groups = params.as_lists()
        return torch.convolution(x, weight, bias, stride, padding, dilation, False, [0, 0], groups)

    def conv_backward(self, grad_out: Tensor, x: Tensor, weight: Tensor, params: ConvParams,
                      output_mask: Sequence[bool]):
        """(grad_x, grad_weight, grad_bias); entries not asked for in output_mask are None."""
        stride, padding, dilation, groups = params.as_lists()
        if _DIRECT_CONV_BACKWARD is not None and not torch.compiler.is_compiling():
            return _DIRECT_CONV_BACKWARD(grad_out, x, weight, stride, padding, dilation, groups, list(output_mask))
        bias_sizes = [weight.shape[0]] if output_mask[2] else None
        return torch.ops.aten.convolution_backward(
            grad_out, x, weight, bias_sizes, stride, padding, dilation, False, [0, 0], groups, list(output_mask)
        )

    # -- fusable steps: composite defaults ------------------------------------------------------
    def conv_bn_stats(self, x, weight, bias, params: ConvParams) -> Tuple[Tensor, Tensor, Tensor]:
        """Training conv_bn_relu's first half: y = conv(x) and y's per-channel (mean, biased var)."""
        y = self.conv(x, weight, bias, params)
        mean, var = self.bn_stats(y)
        return y, mean, var

    def conv_bias_act(self, x, weight, bias, params: ConvParams, relu: bool) -> Tensor:
        """Inference conv_bn_relu with BN folded into weight and bias: act(conv(x) + bias)."""
        y = self.conv(x, weight, bias, params)
        return torch.relu_(y) if relu else y

    # -- eager inference calls with everything but the activations bound (ops._common.memoized_call) --
    def inference_conv(self, weight, bias, params: ConvParams, relu: bool) -> Callable[[Tensor], Tensor]:
        """x -> conv_bias_act(x, weight, bias, params, relu)."""
        return lambda x: self.conv_bias_act(x, weight, bias, params, relu)

    def inference_bn_act(self, scale, shift, res_scale, res_shift, relu: bool) -> Callable[[Tensor, Tensor], Tensor]:
        """(x, residual) -> bn_act_forward(x, scale, shift, residual, res_scale, res_shift, relu)."""
        return lambda x, residual: self.bn_act_forward(x, scale, shift, residual, res_scale, res_shift, relu)

    def inference_conv_add(self, weight, bias, params: ConvParams, res_scale, res_shift,
                           relu: bool) -> Callable[[Tensor, Tensor], Tensor]:
        """(x, residual) -> act(conv(x) + bias + residual*res_scale + res_shift): inference conv_bn_add_relu, its BN
        folded into weight and bias. Here the convolution without bias, then one pass that adds the bias too, in
        place on the convolution's output (which nothing else reads)."""
        shift = None if bias is None else bias.to(acc_dtype(bias.dtype))

        def run(x, residual):
            y = self.conv(x, weight, None, params)
            return self.bn_act_forward_(y, None, shift, residual, res_scale, res_shift, relu)
        return run

    def bn_act_conv(self, x, scale, shift, relu: bool, weight, bias, params: ConvParams):
        """bn_relu_conv's forward: (conv(a), a) with a = act(x*scale + shift) in the convolution's dtype; a is
        None where the backend never materializes it (a fused prologue) and the backward recomputes it."""
        activation = self.conv_operand(x, scale, shift, relu, weight.dtype)
        return self.conv(activation, weight, bias, params), activation

    def conv_operand(self, x, scale, shift, relu: bool, dtype: torch.dtype) -> Tensor:
        """act(x*scale + shift) as the convolution reads it: cast to its dtype under autocast, as eager
        PyTorch casts only the convolution's input."""
        return self.bn_act_forward(x, scale, shift, None, None, None, relu).to(dtype)
