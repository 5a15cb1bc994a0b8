"""conv_bn_relu on every backend against the float64 reference: a grid of convolutions, both memory
formats, every dtype, training and eval (with gradients) and inference (BN folded)."""
import pytest
import torch

from harness import (Case, activation, backend_grid, backend_params, bn_state, cast, compare, conv_weight,
                     skip_unless_runs)
from pyfast import ops
from tolerances import assert_close

CASES = {
    "dense3x3": Case(),
    "groups2-stride2": Case(channels=8, out_channels=12, groups=2, stride=2, size=(9, 7)),
    "groupwidth16": Case(channels=32, out_channels=32, groups=2, size=(5, 5)),
    "depthwise": Case(channels=8, out_channels=8, groups=8),
    "pointwise": Case(kernel=1, padding=0, out_channels=16, size=(6, 5)),
    "stem7x7": Case(channels=3, out_channels=8, kernel=7, stride=2, padding=3, size=(11, 13)),
    "dilated": Case(dilation=2, padding=2, size=(9, 9)),
    "batch1": Case(batch=1, size=(5, 5)),
    "batch8-odd": Case(batch=8, size=(3, 5), padding=0, channels=4, out_channels=4),
}
DTYPES = {"f32": torch.float32, "f64": torch.float64, "bf16": torch.bfloat16, "f16": torch.float16}
# The interpreter runs Triton kernels element by element in Python: a smaller, still complete grid.
GRID = [(case, dtype) for case in CASES for dtype in DTYPES]
INTERPRETER_GRID = [("dense3x3", "f32"), ("groups2-stride2", "bf16"), ("depthwise", "f32"), ("pointwise", "f16"),
                    ("stem7x7", "f32"), ("dilated", "bf16")]


def inputs(case: Case, bias: bool, affine: bool = True):
    return {"x": activation(case, case.channels, torch.float32, "nchw", "cpu"),
            "weight": conv_weight(case, torch.float32, "cpu"),
            "bias": torch.randn(case.out_channels) * 0.1 if bias else None,
            **{f"bn_{k}" if k in ("weight", "bias") else k: v for k, v in bn_state(case.out_channels, affine).items()}}


def op(case: Case, training: bool, relu: bool, layout: str):
    memory_format = torch.channels_last if layout == "nhwc" else torch.contiguous_format

    def fn(t, backend):
        return ops.conv_bn_relu(t["x"].contiguous(memory_format=memory_format), t["weight"], t["bias"],
                                t["bn_weight"], t["bn_bias"], t["running_mean"], t["running_var"],
                                t["num_batches_tracked"], training=training, momentum=0.1, eps=1e-5,
                                stride=case.stride, padding=case.padding, dilation=case.dilation,
                                groups=case.groups, relu=relu, backend=backend)
    return fn


@pytest.mark.parametrize("backend,device,case_name,dtype_name", backend_grid(GRID, INTERPRETER_GRID))
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_reference(backend, device, case_name, dtype_name, layout, training):
    case, dtype = CASES[case_name], DTYPES[dtype_name]
    skip_unless_runs(backend, "conv_bn_relu", torch.empty(1, device=device, dtype=dtype))
    relu = case_name != "pointwise"  # the branch-end variant (relu=False) on one case
    # A conv bias before a training-mode BN has a zero gradient (the batch mean absorbs it), which no
    # relative error can measure: the bias is tested in eval.
    bias = case_name == "dilated" and not training
    compare(op(case, training, relu, layout), inputs(case, bias), dtype, device, backend)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_inference_folds_batch_norm(backend, device, layout):
    """Eval without gradients takes the folded path: one convolution with a bias+ReLU epilogue."""
    skip_unless_runs(backend, "conv_bn_relu", torch.empty(1, device=device))
    for case_name in ("dense3x3", "groups2-stride2", "depthwise"):
        case = CASES[case_name]
        tensors = inputs(case, bias=True)
        with torch.no_grad():
            expected = op(case, False, True, layout)(cast(tensors, torch.float64, "cpu", grad=False), "reference")
            actual = op(case, False, True, layout)(cast(tensors, torch.float32, device, grad=False), backend)
        assert_close(actual, expected, torch.float32, what=f"{case_name} inference output")


@pytest.mark.parametrize("affine,track", [(False, True), (True, False), (False, False)])
def test_affine_and_tracking_options(affine, track):
    case = CASES["dense3x3"]
    skip_unless_runs("cpu", "conv_bn_relu", torch.empty(1))
    tensors = inputs(case, bias=False)
    tensors.update({f"bn_{k}" if k in ("weight", "bias") else k: v for k, v in bn_state(8, affine, track).items()})
    compare(op(case, True, True, "nchw"), tensors, torch.float32, "cpu", "cpu")
