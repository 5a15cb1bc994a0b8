"""bn_add_relu (identity and BN'd shortcut), conv_bn_add_relu and add_relu on every backend against the float64
reference, both memory formats, every dtype, training and eval."""
import pytest
import torch

from harness import Case, activation, backend_grid, bn_state, cast, compare, conv_weight, skip_unless_runs
from pyfast import ops
from tolerances import assert_close

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


def _shortcut_bn(t):
    """The shortcut's BatchNormArgs when the inputs have one (cumulative average, its own eps), else None."""
    if "s_weight" not in t:
        return None
    return ops.BatchNormArgs(t["s_weight"], t["s_bias"], t["s_running_mean"], t["s_running_var"],
                             t["s_num_batches_tracked"], momentum=None, eps=1e-3)


def bn_add_relu(training: bool, relu: bool, layout: str):
    memory_format = torch.channels_last if layout == "nhwc" else torch.contiguous_format

    def fn(t, backend):
        shortcut_bn = _shortcut_bn(t)
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


# conv_bn_add_relu: the residual branch's last convolution with its end (on Triton the convolution takes y's batch
# statistics in its epilogue). The reference is bn_add_relu after F.conv2d, in float64.
CONV_CASES = {"dense3x3": Case(channels=6, out_channels=8, size=(5, 7)),
              "pointwise-stride2": Case(batch=3, channels=4, out_channels=8, kernel=1, stride=2, padding=0,
                                        size=(11, 10)),
              "grouped": Case(channels=8, out_channels=8, groups=4, size=(6, 6))}
CONV_GRID = [(case, dtype) for case in CONV_CASES for dtype in ("f32", "f64", "bf16")]
CONV_INTERPRETER_GRID = [("dense3x3", "f32"), ("pointwise-stride2", "bf16"), ("grouped", "f32")]


def conv_inputs(case: Case, shortcut: str):
    out = Case(batch=case.batch, channels=case.out_channels,
               size=tuple((s + 2 * case.padding - case.kernel) // case.stride + 1 for s in case.size))
    tensors = inputs(out, shortcut)
    tensors.update(x=activation(case, case.channels, torch.float32, "nchw", "cpu"), weight=conv_weight(case,
                   torch.float32, "cpu"))
    del tensors["y"]
    return tensors


def conv_bn_add_relu(case: Case, training: bool, layout: str):
    memory_format = torch.channels_last if layout == "nhwc" else torch.contiguous_format

    def fn(t, backend):
        shortcut_bn = _shortcut_bn(t)
        return ops.conv_bn_add_relu(t["x"].contiguous(memory_format=memory_format), t["weight"], None,
                                    t["bn_weight"], t["bn_bias"], t["bn_running_mean"], t["bn_running_var"],
                                    t["bn_num_batches_tracked"], training=training, momentum=0.1, eps=1e-5,
                                    stride=case.stride, padding=case.padding, groups=case.groups,
                                    shortcut=t["shortcut"].contiguous(memory_format=memory_format),
                                    shortcut_bn=shortcut_bn, backend=backend)
    return fn


@pytest.mark.parametrize("backend,device,case_name,dtype_name", backend_grid(CONV_GRID, CONV_INTERPRETER_GRID))
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shortcut", ["identity", "bn"])
def test_conv_bn_add_relu_matches_reference(backend, device, case_name, dtype_name, layout, training, shortcut):
    dtype, case = DTYPES[dtype_name], CONV_CASES[case_name]
    skip_unless_runs(backend, "bn_add_relu", torch.empty(1, device=device, dtype=dtype))
    compare(conv_bn_add_relu(case, training, layout), conv_inputs(case, shortcut), dtype, device, backend)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_conv_bn_add_relu_inference_matches_reference(backend):
    """Eval without gradients: the convolution, then one pass with the cached affine maps."""
    skip_unless_runs(backend, "bn_add_relu", torch.empty(1))
    case = CONV_CASES["dense3x3"]
    for shortcut in ("identity", "bn"):
        tensors = conv_inputs(case, shortcut)
        with torch.no_grad():
            expected = conv_bn_add_relu(case, False, "nchw")(cast(tensors, torch.float64, "cpu", grad=False),
                                                             "reference")
            for _ in range(2):  # the second call is the memoized one
                actual = conv_bn_add_relu(case, False, "nhwc")(cast(tensors, torch.float32, "cpu", grad=False),
                                                               backend)
                assert_close(actual, expected, torch.float32, what=f"{shortcut} shortcut inference output")


def test_conv_bn_add_relu_rejects_bad_input():
    x, weight = torch.randn(2, 4, 5, 5), torch.randn(8, 4, 3, 3)
    bn = (torch.ones(8), torch.zeros(8), torch.zeros(8), torch.ones(8))
    with pytest.raises(ValueError, match="shortcut has shape"):
        ops.conv_bn_add_relu(x, weight, None, *bn, training=True, padding=0, shortcut=torch.randn(2, 8, 5, 5))
    with pytest.raises(ValueError, match="shortcut has dtype"):
        ops.conv_bn_add_relu(x, weight, None, *bn, training=True, padding=1,
                             shortcut=torch.randn(2, 8, 5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="shortcut_bn needs a shortcut"):
        ops.conv_bn_add_relu(x, weight, None, *bn, training=True, padding=1, shortcut_bn=ops.BatchNormArgs())
    with pytest.raises(TypeError, match="shortcut_bn must be a pyfast.ops.BatchNormArgs"):
        ops.conv_bn_add_relu(x, weight, None, *bn, training=False, padding=1, shortcut=torch.randn(2, 8, 5, 5),
                             shortcut_bn=torch.nn.BatchNorm2d(8))
    with pytest.raises(ValueError, match="weight of shape"):
        ops.conv_bn_add_relu(x, torch.randn(8, 3, 3, 3), None, *bn, training=True, padding=1,
                             shortcut=torch.randn(2, 8, 5, 5))
    with pytest.raises(ValueError, match=r"bn_weight must be .* shape \(8,\)"):
        ops.conv_bn_add_relu(x, weight, None, torch.ones(4), *bn[1:], training=True, padding=1,
                             shortcut=torch.randn(2, 8, 5, 5))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_inference_conv_add_default_and_override_agree(backend):
    """Backend.inference_conv_add's composite (the semantics: the convolution, then one in-place pass) and the
    backend's own (pyfast._C's bindings; Triton's residual epilogue) against float64."""
    from pyfast.ops.backends.base import Backend
    from pyfast.ops._conv import ConvParams

    skip_unless_runs(backend, "bn_add_relu", torch.empty(1))
    chosen = ops.BACKENDS[backend]
    x, weight, bias = torch.randn(2, 4, 5, 5), torch.randn(6, 2, 3, 3), torch.randn(6)
    residual, res_scale, res_shift = torch.randn(2, 6, 5, 5), torch.rand(6) + 0.5, torch.randn(6)
    params = ConvParams.of(1, 1, 1, 2)
    expected = torch.relu(torch.nn.functional.conv2d(x.double(), weight.double(), bias.double(), 1, 1, 1, 2)
                          + residual.double() * res_scale.double().view(1, -1, 1, 1)
                          + res_shift.double().view(1, -1, 1, 1))
    for run in (Backend.inference_conv_add(chosen, weight, bias, params, res_scale, res_shift, True),
                chosen.inference_conv_add(weight, bias, params, res_scale, res_shift, True)):
        assert_close(run(x, residual), expected, torch.float32, what=f"{backend} inference_conv_add")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_conv_bn_add_relu_with_bias_mixed_layouts_and_no_relu(backend, training):
    """x in NCHW, the shortcut channels_last, relu=False, and in eval a convolution bias (before a training BN its
    gradient is zero, which no relative error can measure): against the float64 reference."""
    skip_unless_runs(backend, "bn_add_relu", torch.empty(1))
    case = CONV_CASES["grouped"]
    tensors = conv_inputs(case, "bn")
    tensors["bias"] = None if training else torch.randn(case.out_channels) * 0.1

    def fn(t, backend):
        return ops.conv_bn_add_relu(t["x"], t["weight"], t["bias"], t["bn_weight"], t["bn_bias"], t["bn_running_mean"],
                                    t["bn_running_var"], t["bn_num_batches_tracked"], training=training, padding=1,
                                    groups=case.groups, shortcut=t["shortcut"].contiguous(
                                        memory_format=torch.channels_last), shortcut_bn=_shortcut_bn(t), relu=False,
                                    backend=backend)
    compare(fn, tensors, torch.float32, "cpu", backend)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_conv_bn_add_relu_under_autocast_with_a_wider_shortcut(backend):
    """Under autocast the convolution runs in bf16 and the shortcut stays float32: the branches add in float32,
    and gradients reach x and the convolution's weight (the Triton kernel has no autograd of its own)."""
    skip_unless_runs(backend, "bn_add_relu", torch.empty(1))
    case = CONV_CASES["dense3x3"]
    tensors, results = conv_inputs(case, "identity"), {}
    for name in ("reference", backend):
        t = cast(tensors, torch.float32, "cpu")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ops.conv_bn_add_relu(t["x"], t["weight"], None, t["bn_weight"], t["bn_bias"], t["bn_running_mean"],
                                       t["bn_running_var"], t["bn_num_batches_tracked"], training=True, padding=1,
                                       shortcut=t["shortcut"], backend=name)
        out.float().sum().backward()
        results[name] = (out, t["x"].grad, t["weight"].grad, t["shortcut"].grad)
    assert results[backend][0].dtype == torch.float32
    for what, mine, theirs in zip(("out", "x grad", "weight grad", "shortcut grad"), results[backend],
                                  results["reference"]):
        assert mine is not None, what
        assert_close(mine.float(), theirs.float().double(), torch.bfloat16, what=what)
