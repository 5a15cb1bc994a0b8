"""What a backend is: capabilities that answer *why not*, the five BN primitives, convolution, and
three fusable steps whose composite defaults a backend overrides with a fused kernel."""
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .._conv import ConvParams, memory_format_of

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class Backend:
    name: str = ""
    device_types: Tuple[str, ...] = ()
    dtypes: Tuple[torch.dtype, ...] = FLOAT_DTYPES
    description: str = ""

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

    def bn_act_backward_reduce(self, grad_out, x, scale, shift, mean, invstd, residual, res_scale, res_shift,
                               res_mean, res_invstd, relu: bool):
        raise NotImplementedError

    def bn_act_backward_elemt(self, grad_out, x, scale, shift, mean, invstd, residual, res_scale, res_shift,
                              res_mean, res_invstd, relu: bool, sum_dz, sum_dz_xhat, sum_dz_rhat, count: int):
        raise NotImplementedError

    def bn_finalize(self, mean, var, weight, bias, running_mean, running_var, num_batches_tracked, count: int,
                    momentum: Optional[float], eps: float, update: bool) -> Tuple[Tensor, Tensor, Tensor]:
        """(scale, shift, invstd) from the per-channel mean and biased var; with `update`, the running
        statistics and num_batches_tracked are updated in place as nn.BatchNorm2d does."""
        raise NotImplementedError

    # -- convolution (ATen: cuDNN on CUDA, oneDNN on CPU) --------------------------------------
    def conv(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], params: ConvParams) -> Tensor:
        stride, padding, dilation, groups = params.as_lists()
        return torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, False, [0, 0], groups)

    def conv_backward(self, grad_out: Tensor, x: Tensor, weight: Tensor, params: ConvParams,
                      output_mask: Sequence[bool]):
        """(grad_x, grad_weight, grad_bias); entries not asked for in output_mask are None."""
        stride, padding, dilation, groups = params.as_lists()
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

    def bn_act_conv(self, x, scale, shift, relu: bool, weight, bias, params: ConvParams) -> Tensor:
        """bn_relu_conv's forward: conv(act(x*scale + shift))."""
        activation = self.bn_act_forward(x, scale, shift, None, None, None, relu)
        return self.conv(activation, weight, bias, params)
