"""bn_add_relu (identity and BN'd shortcut) and add_relu on every backend against the float64
reference, both memory formats, every dtype, training and eval."""
import pytest
import torch

from harness import Case, activation, backend_grid, bn_state, compare, skip_unless_runs
from pyfast import ops

SHAPES = {"odd": Case(batch=3, channels=5, size=(7, 9)), "square": Case(batch=2, channels=16, size=(4, 4)),
          "batch1": Case(batch=1, channels=8, size=(3, 5)), "batch8": Case(batch=8, channels=4, size=(2, 3))}
DTYPES = {"f32": torch.float32, "f64": torch.float64, "bf16": torch.bfloat16, "f16": torch.float16}
GRID = [(shape, dtype) for shape in SHAPES for dtype in DTYPES]
INTERPRETER_GRID = [("odd", "f32"), ("square", "bf16"), ("batch1", "f16")]


def inputs(case: Case, shortcut: str):
    """shortcut: "none" (a plain BN-ReLU), "identity" or "bn" (the shortcut has its own BN)."""
    tensors = {"y": activation(case, case.channels, torch.float32, "nchw", "cpu"), "shortcut": None}
    if shortcut != "none":
        tensors["shortcut"] = activation(case, case.channels, torch.float32, "nchw", "cpu")
    tensors.update({f"bn_{k}": v for k, v in bn_state(case.channels).items()})
    if shortcut == "bn":
        tensors.update({f"s_{k}": v for k, v in bn_state(case.channels).items()})
    return tensors


def bn_add_relu(training: bool, relu: bool, layout: str):
    memory_format = torch.channels_last if layout == "nhwc" else torch.contiguous_format

    def fn(t, backend):
        shortcut_bn = None
        if "s_weight" in t:
            shortcut_bn = ops.BatchNormArgs(t["s_weight"], t["s_bias"], t["s_running_mean"], t["s_running_var"],
                                            t["s_num_batches_tracked"], momentum=None, eps=1e-3)
        shortcut = None if t["shortcut"] is None else t["shortcut"].contiguous(memory_format=memory_format)
        return ops.bn_add_relu(t["y"].contiguous(memory_format=memory_format), t["bn_weight"], t["bn_bias"],
                               t["bn_running_mean"], t["bn_running_var"], t["bn_num_batches_tracked"],
                               training=training, momentum=0.1, eps=1e-5, shortcut=shortcut,
                               shortcut_bn=shortcut_bn, relu=relu, backend=backend)
    return fn


@pytest.mark.parametrize("backend,device,shape,dtype_name", backend_grid(GRID, INTERPRETER_GRID))
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shortcut", ["none", "identity", "bn"])
def test_bn_add_relu_matches_reference(backend, device, shape, dtype_name, layout, training, shortcut):
    dtype = DTYPES[dtype_name]
    skip_unless_runs(backend, "bn_add_relu", torch.empty(1, device=device, dtype=dtype))
    relu = shape != "batch8"  # the ReLU-less variant on one shape
    compare(bn_add_relu(training, relu, layout), inputs(SHAPES[shape], shortcut), dtype, device, backend)


@pytest.mark.parametrize("backend,device,shape,dtype_name", backend_grid(GRID, INTERPRETER_GRID))
@pytest.mark.parametrize("layouts", [("nchw", "nchw"), ("nhwc", "nhwc"), ("nhwc", "nchw")])
def test_add_relu_matches_reference(backend, device, shape, dtype_name, layouts):
    dtype = DTYPES[dtype_name]
    skip_unless_runs(backend, "add_relu", torch.empty(1, device=device, dtype=dtype))
    case = SHAPES[shape]
    tensors = {"a": activation(case, case.channels, torch.float32, "nchw", "cpu"),
               "b": activation(case, case.channels, torch.float32, "nchw", "cpu")}
    formats = [torch.channels_last if layout == "nhwc" else torch.contiguous_format for layout in layouts]

    def fn(t, backend):
        return ops.add_relu(t["a"].contiguous(memory_format=formats[0]),
                            t["b"].contiguous(memory_format=formats[1]), backend=backend)
    compare(fn, tensors, dtype, device, backend)


def test_variance_of_a_large_mean_is_accurate():
    """Mean 1e4, std 1: E[x^2] - E[x]^2 in float32 loses every digit of the variance; ours must not."""
    skip_unless_runs("cpu", "bn_add_relu", torch.empty(1))
    y = torch.randn(4, 3, 16, 16, dtype=torch.float64) + 1e4
    running_var = torch.zeros(3)
    ops.bn_add_relu(y.float(), None, None, torch.zeros(3), running_var, None, training=True, momentum=1.0,
                    shortcut=torch.zeros_like(y).float(), backend="cpu")
    expected = y.var(dim=(0, 2, 3)).float()
    assert torch.allclose(running_var, expected, rtol=1e-3), (running_var, expected)
