"""What every op promises beyond matching the reference: float64 gradcheck, nn.BatchNorm2d's running
statistics over several steps, clear errors on bad input, backend selection, torch.library schemas and
torch.compile(fullgraph=True)."""
import pytest
import torch
import torch.nn as nn

from harness import skip_unless_runs
from pyfast import ops

NEEDS_CPU = pytest.mark.skipif(ops.BACKENDS["cpu"].unavailable() is not None, reason="pyfast._C not built")


def small_conv_args(dtype=torch.float64):
    x = torch.randn(2, 4, 5, 5, dtype=dtype, requires_grad=True)
    w = (torch.randn(6, 2, 3, 3, dtype=dtype) / 4).requires_grad_()
    gamma = (torch.rand(6, dtype=dtype) + 0.5).requires_grad_()
    beta = torch.randn(6, dtype=dtype).requires_grad_()
    return x, w, gamma, beta


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=NEEDS_CPU)])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck(backend, training):
    x, w, gamma, beta = small_conv_args()
    rm, rv = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    x4 = x.detach()[:, :4].clone().requires_grad_()
    shortcut = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    g4, b4 = gamma.detach()[:4].clone().requires_grad_(), beta.detach()[:4].clone().requires_grad_()
    sbn = ops.BatchNormArgs(g4.detach().clone().requires_grad_(), b4.detach().clone().requires_grad_(),
                            torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64))
    checks = {
        "conv_bn_relu": (lambda x, w, g, b: ops.conv_bn_relu(x, w, None, g, b, rm, rv, training=training,
                                                            padding=1, groups=2, backend=backend), (x, w, gamma, beta)),
        "bn_add_relu": (lambda y, s, g, b, sg, sb: ops.bn_add_relu(
            y, g, b, rm[:4], rv[:4], training=training, shortcut=s, shortcut_bn=sbn._replace(weight=sg, bias=sb),
            backend=backend), (x4, shortcut, g4, b4, sbn.weight, sbn.bias)),
        "add_relu": (lambda a, b: ops.add_relu(a, b, backend=backend), (x4, shortcut)),
        "bn_relu_conv": (lambda x, g, b, w: ops.bn_relu_conv(x, g, b, rm[:4], rv[:4], training=training, weight=w,
                                                            stride=2, padding=1, groups=2, backend=backend),
                         (x4, g4, b4, w)),
    }
    for name, (fn, args) in checks.items():
        assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5), name


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=NEEDS_CPU)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_follow_batchnorm2d_over_steps(backend, momentum):
    conv, bn = nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6, momentum=momentum)
    ours_bn = nn.BatchNorm2d(6, momentum=momentum)
    ours_bn.load_state_dict(bn.state_dict())
    for step in range(3):
        x = torch.randn(3, 4, 6, 5) * (step + 1) + step
        expected = torch.relu(bn(conv(x)))
        actual = ops.conv_bn_relu(x, conv.weight, None, ours_bn.weight, ours_bn.bias, ours_bn.running_mean,
                                  ours_bn.running_var, ours_bn.num_batches_tracked, training=True,
                                  momentum=momentum, eps=bn.eps, padding=1, backend=backend)
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    for name, value in bn.state_dict().items():
        torch.testing.assert_close(ours_bn.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    bn.eval()
    x = torch.randn(2, 4, 6, 5)
    expected = torch.relu(bn(conv(x)))
    actual = ops.conv_bn_relu(x, conv.weight, None, ours_bn.weight, ours_bn.bias, ours_bn.running_mean,
                              ours_bn.running_var, training=False, eps=bn.eps, padding=1, backend=backend)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


BAD_INPUTS = [
    ("wrong rank", dict(x=torch.randn(4, 5, 5)), ValueError, "x must be a 4-D"),
    ("dtype mismatch", dict(weight=torch.randn(6, 2, 3, 3, dtype=torch.float64)), ValueError, "weight has dtype"),
    ("mixed devices", dict(weight=torch.randn(6, 2, 3, 3, device="meta")), RuntimeError, "weight is on meta"),
    ("groups", dict(groups=3), ValueError, "groups=3 must divide"),
    ("one value per channel", dict(x=torch.randn(1, 4, 1, 1), padding=0, weight=torch.randn(6, 2, 1, 1)),
     ValueError, "more than 1 value per channel"),
    ("bn length", dict(bn_weight=torch.ones(5)), ValueError,
     r"bn_weight must be a floating-point tensor of shape \(6,\)"),
    ("eval without stats", dict(running_mean=None, running_var=None, training=False), ValueError,
     "running_mean/bn_running_var are required"),
    ("kernel larger than input", dict(x=torch.randn(2, 4, 2, 2), padding=0), ValueError, "smaller than the kernel"),
    ("bad stride", dict(stride=0), ValueError, "stride must be an int or a pair of ints >= 1"),
]


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=NEEDS_CPU)])
@pytest.mark.parametrize("what,changes,error,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_named(backend, what, changes, error, message):
    args = dict(x=torch.randn(2, 4, 5, 5), weight=torch.randn(6, 2, 3, 3), bias=None, bn_weight=torch.ones(6),
                bn_bias=torch.zeros(6), running_mean=torch.zeros(6), running_var=torch.ones(6), training=True,
                padding=1, groups=2, backend=backend)
    args.update(changes)
    with pytest.raises(error, match=message):
        ops.conv_bn_relu(**args)


def test_bad_shortcut_and_bad_operands():
    y = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="shortcut has shape"):
        ops.bn_add_relu(y, None, None, None, None, training=True, shortcut=torch.randn(2, 4, 3, 2))
    with pytest.raises(ValueError, match="b has shape"):
        ops.add_relu(y, torch.randn(2, 4, 3, 2))
    with pytest.raises(ValueError, match="weight is required"):
        ops.bn_relu_conv(y, None, None, None, None, training=True)
    with pytest.raises(ValueError, match="must be a floating-point"):
        ops.add_relu(y.long(), y.long())


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=NEEDS_CPU)])
def test_empty_batch_behaves_like_pytorch(backend):
    bn = nn.BatchNorm2d(6)
    x = torch.randn(0, 4, 5, 5)
    out = ops.conv_bn_relu(x, torch.randn(6, 4, 3, 3), None, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                           bn.num_batches_tracked, training=True, padding=1, backend=backend)
    assert out.shape == (0, 6, 5, 5)
    assert bn.num_batches_tracked.item() == 1  # nn.BatchNorm2d counts an empty batch too
    assert torch.equal(bn.running_mean, torch.zeros(6))


def test_backend_selection_and_refusal(monkeypatch):
    x = torch.randn(2, 4, 5, 5)
    assert ops.select("add_relu", x, "reference").name == "reference"
    with pytest.raises(ValueError, match="unknown pyfast backend"):
        ops.select("add_relu", x, "fastest")
    with pytest.raises(RuntimeError, match="pyfast backend 'cuda' cannot run add_relu"):
        ops.select("add_relu", x, "cuda")
    with pytest.raises(RuntimeError, match="does not support torch.float64"):
        ops.select("add_relu", x.double(), "triton")
    with ops.use_backend("reference"):
        assert ops.get_backend() == "reference"
        assert ops.select("add_relu", x).name == "reference"
    assert ops.get_backend() == "auto"
    expected = "cpu" if ops.BACKENDS["cpu"].unavailable() is None else "reference"
    assert ops.select("add_relu", x).name == expected


def test_environment_variable_sets_the_default(tmp_path):
    import subprocess
    import sys
    code = "import pyfast; print(pyfast.get_backend())"
    env = {"PYFAST_BACKEND": "reference", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"


@NEEDS_CPU
def test_opcheck_schemas_and_fakes():
    """torch.library.opcheck on every C++ primitive the fused ops call: schema (including what bn_finalize
    mutates) and fake (meta) implementation agree with the CPU kernel, so torch.compile can trace them."""
    x, grad = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    residual = torch.randn(2, 4, 3, 3)
    mean, var = torch.randn(4), torch.rand(4) + 0.5
    scale, shift, invstd = torch.randn(4), torch.randn(4), torch.rand(4) + 0.5
    sums = (torch.randn(4), torch.randn(4), torch.randn(4))
    stats = (torch.randn(4), torch.rand(4) + 0.5, torch.tensor(3))
    pyfast_ops = torch.ops.pyfast
    cases = [
        (pyfast_ops.bn_stats.default, (x,)),
        (pyfast_ops.bn_act_forward.default, (x, scale, shift, residual, None, None, True)),
        (pyfast_ops.bn_act_forward_.default, (x.clone(), scale, shift, residual, scale, shift, True)),
        (pyfast_ops.bn_act_backward_reduce.default,
         (grad, x, scale, shift, mean, invstd, residual, scale, shift, mean, invstd, True)),
        (pyfast_ops.bn_act_backward_elemt.default,
         (grad, x, scale, shift, mean, invstd, residual, scale, shift, mean, invstd, True, *sums, 18)),
        (pyfast_ops.bn_finalize.default, (mean, var, torch.randn(4), torch.randn(4), *stats, 18, 0.1, 1e-5, True)),
        (pyfast_ops.bn_finalize.default, (mean, var, None, None, *stats, 18, None, 1e-5, True)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


class TinyNet(nn.Module):
    """Uses every fused op: stem conv-BN-ReLU, a pre-activation conv, a BN+add+ReLU, a conv+BN+add+ReLU with an
    identity shortcut."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.bn2, self.conv2 = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.conv4, self.bn4 = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x):
        bn1, bn2, bn3, bn4 = self.bn1, self.bn2, self.bn3, self.bn4
        y = ops.conv_bn_relu(x, self.conv1.weight, None, bn1.weight, bn1.bias, bn1.running_mean, bn1.running_var,
                             bn1.num_batches_tracked, training=self.training, padding=1)
        z = ops.bn_relu_conv(y, bn2.weight, bn2.bias, bn2.running_mean, bn2.running_var, bn2.num_batches_tracked,
                             training=self.training, weight=self.conv2.weight, padding=1, groups=2)
        h = ops.bn_add_relu(z, bn3.weight, bn3.bias, bn3.running_mean, bn3.running_var, bn3.num_batches_tracked,
                            training=self.training, shortcut=y)
        return ops.conv_bn_add_relu(h, self.conv4.weight, None, bn4.weight, bn4.bias, bn4.running_mean,
                                    bn4.running_var, bn4.num_batches_tracked, training=self.training, shortcut=y)


@NEEDS_CPU
def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    eager, compiled = TinyNet(), TinyNet()
    compiled.load_state_dict(eager.state_dict())
    compiled_fn = torch.compile(compiled, fullgraph=True)
    x = torch.randn(2, 3, 8, 8)
    for training in (True, False):
        eager.train(training)
        compiled.train(training)
        expected, actual = eager(x), compiled_fn(x)
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
        if training:
            expected.square().sum().backward()
            actual.square().sum().backward()
            torch.testing.assert_close(compiled.conv1.weight.grad, eager.conv1.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled.state_dict(), eager.state_dict())


@pytest.mark.parametrize("backend,device", [("reference", "cpu"), pytest.param("cpu", "cpu", marks=NEEDS_CPU),
                                            ("triton", "cpu")])
def test_nan_propagates_like_pytorch(backend, device):
    """relu(NaN) is NaN forward, and its backward lets the gradient through, as torch.relu does."""
    x = torch.randn(2, 3, 4, 4)
    x[0, 1, 2, 3] = float("nan")
    skip_unless_runs(backend, "add_relu", x)
    expected_x, actual_x = x.clone().requires_grad_(), x.clone().to(device).requires_grad_()
    expected = torch.relu(expected_x + 0.5)
    actual = ops.add_relu(actual_x, torch.full_like(actual_x, 0.5), backend=backend)
    torch.testing.assert_close(actual.cpu(), expected, equal_nan=True)
    expected.backward(torch.ones_like(expected))
    actual.backward(torch.ones_like(actual))
    torch.testing.assert_close(actual_x.grad.cpu(), expected_x.grad)
