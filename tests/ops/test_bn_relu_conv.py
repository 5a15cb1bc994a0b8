"""bn_relu_conv (pre-activation) on every backend against the float64 reference."""
import pytest
import torch

from harness import activation, backend_grid, bn_state, compare, conv_weight, skip_unless_runs
from pyfast import ops
from test_conv_bn_relu import CASES, DTYPES, GRID, INTERPRETER_GRID


def inputs(case, bias: bool):
    return {"x": activation(case, case.channels, torch.float32, "nchw", "cpu"),
            **{f"bn_{k}": v for k, v in bn_state(case.channels).items()},
            "weight": conv_weight(case, torch.float32, "cpu"),
            "bias": torch.randn(case.out_channels) * 0.1 if bias else None}


def op(case, training: bool, relu: bool, layout: str):
    memory_format = torch.channels_last if layout == "nhwc" else torch.contiguous_format

    def fn(t, backend):
        return ops.bn_relu_conv(t["x"].contiguous(memory_format=memory_format), t["bn_weight"], t["bn_bias"],
                                t["bn_running_mean"], t["bn_running_var"], t["bn_num_batches_tracked"],
                                training=training, momentum=0.1, eps=1e-5, weight=t["weight"], bias=t["bias"],
                                stride=case.stride, padding=case.padding, dilation=case.dilation,
                                groups=case.groups, relu=relu, backend=backend)
    return fn


@pytest.mark.parametrize("backend,device,case_name,dtype_name", backend_grid(GRID, INTERPRETER_GRID))
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_reference(backend, device, case_name, dtype_name, layout, training):
    case, dtype = CASES[case_name], DTYPES[dtype_name]
    skip_unless_runs(backend, "bn_relu_conv", torch.empty(1, device=device, dtype=dtype))
    relu = case_name != "pointwise"
    compare(op(case, training, relu, layout), inputs(case, bias=case_name == "dilated"), dtype, device, backend)
