"""What a fused call dispatches, counted exactly (benchmarks/overhead.py's KernelCounter: every op that runs a
kernel, views and allocations aside, plus Triton launches), against fixed budgets and against the eager
sequence it replaces. Counts are deterministic, so these are regression tests of the cost contract
(docs/ARCHITECTURE.md, section 6); times are benchmarked, never tested."""
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyfast
from pyfast import ops
from pyfast.benchmarks.overhead import count_kernels, kernel_counts

from harness import skip_unless_runs

CPU = pytest.param("cpu", marks=pytest.mark.skipif(ops.BACKENDS["cpu"].unavailable() is not None,
                                                   reason="pyfast._C is not built"))


def _blocks(channels=4):
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    return conv, nn.BatchNorm2d(channels), nn.BatchNorm2d(channels)


def _conv_bn_relu(x, conv, bn, backend, training=True):
    return ops.conv_bn_relu(x, conv.weight, None, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                            bn.num_batches_tracked, training=training, padding=1, backend=backend)


def _eager_bn(t, bn, training=True):
    if training:
        bn.num_batches_tracked.add_(1)
    return F.batch_norm(t, bn.running_mean, bn.running_var, bn.weight, bn.bias, training, 0.1, 1e-5)


def _total(fn) -> int:
    return sum(count_kernels(fn).values())


def _backward(fn, leaves):
    """fn's forward and backward from a random output gradient, the leaves' .grad freed first (as zero_grad
    does: accumulating into an old .grad would add a kernel per leaf to both sides)."""
    gradient = torch.randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last)

    def run():
        for leaf in leaves:
            leaf.grad = None
        fn().backward(gradient)
    return run


# case -> (fused budget on cpu, on triton). On both each fused call dispatches at most the eager ops it replaces
# (a Triton reduction is one launch: its last program combines the partials, kernels/_arrival.py).
CASES = {
    "conv_bn_relu train forward": (4, 3),
    "conv_bn_relu train forward+backward": (8, 7),
    "conv_bn_relu inference": (2, 1),
    "bn_add_relu train forward": (3, 3),
    "bn_add_relu BN shortcut train forward+backward": (8, 8),
    "bn_add_relu inference": (1, 1),
    # the statistics of y in the Triton convolution's epilogue: no statistics launch
    "conv_bn_add_relu BN shortcut train forward+backward": (11, 10),
    "conv_bn_add_relu inference": (2, 1),  # Triton: the shortcut added in the convolution's epilogue
    "bn_relu_conv train forward+backward": (8, 8),
    "add_relu forward+backward": (3, 3),
}


def _case(name, backend):
    # channels_last: the layout the Triton kernels work in (an NCHW input costs their convolution a copy)
    x = torch.randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    s = torch.randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    conv, bn, s_bn = _blocks()
    xg, sg = x.clone().requires_grad_(), s.clone().requires_grad_()
    leaves = [xg, sg, conv.weight, bn.weight, bn.bias, s_bn.weight, s_bn.bias]
    sbn = ops.BatchNormArgs(s_bn.weight, s_bn.bias, s_bn.running_mean, s_bn.running_var, s_bn.num_batches_tracked)
    fused = {
        "conv_bn_relu train forward": lambda: _conv_bn_relu(x, conv, bn, backend),
        "conv_bn_relu train forward+backward": _backward(lambda: _conv_bn_relu(xg, conv, bn, backend), leaves),
        "conv_bn_relu inference": torch.no_grad()(lambda: _conv_bn_relu(x, conv, bn, backend, training=False)),
        "bn_add_relu train forward": lambda: ops.bn_add_relu(
            x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked, training=True,
            shortcut=s, backend=backend),
        "bn_add_relu BN shortcut train forward+backward": _backward(lambda: ops.bn_add_relu(
            xg, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked, training=True,
            shortcut=sg, shortcut_bn=sbn, backend=backend), leaves),
        "bn_add_relu inference": torch.no_grad()(lambda: ops.bn_add_relu(
            x, bn.weight, bn.bias, bn.running_mean, bn.running_var, training=False, shortcut=s, backend=backend)),
        "conv_bn_add_relu BN shortcut train forward+backward": _backward(lambda: ops.conv_bn_add_relu(
            xg, conv.weight, None, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked,
            training=True, padding=1, shortcut=sg, shortcut_bn=sbn, backend=backend), leaves),
        "conv_bn_add_relu inference": torch.no_grad()(lambda: ops.conv_bn_add_relu(
            x, conv.weight, None, bn.weight, bn.bias, bn.running_mean, bn.running_var, training=False, padding=1,
            shortcut=s, backend=backend)),
        "bn_relu_conv train forward+backward": _backward(lambda: ops.bn_relu_conv(
            xg, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked, training=True,
            weight=conv.weight, padding=1, backend=backend), leaves),
        "add_relu forward+backward": _backward(lambda: ops.add_relu(xg, sg, backend=backend), leaves),
    }
    eager = {
        "conv_bn_relu train forward": lambda: F.relu(_eager_bn(F.conv2d(x, conv.weight, padding=1), bn)),
        "conv_bn_relu train forward+backward": _backward(
            lambda: F.relu(_eager_bn(F.conv2d(xg, conv.weight, padding=1), bn)), leaves),
        "conv_bn_relu inference": torch.no_grad()(
            lambda: F.relu(_eager_bn(F.conv2d(x, conv.weight, padding=1), bn, False))),
        "bn_add_relu train forward": lambda: F.relu(_eager_bn(x, bn) + s),
        "bn_add_relu BN shortcut train forward+backward": _backward(
            lambda: F.relu(_eager_bn(xg, bn) + _eager_bn(sg, s_bn)), leaves),
        "bn_add_relu inference": torch.no_grad()(lambda: F.relu(_eager_bn(x, bn, False) + s)),
        "conv_bn_add_relu BN shortcut train forward+backward": _backward(
            lambda: F.relu(_eager_bn(F.conv2d(xg, conv.weight, padding=1), bn) + _eager_bn(sg, s_bn)), leaves),
        "conv_bn_add_relu inference": torch.no_grad()(
            lambda: F.relu(_eager_bn(F.conv2d(x, conv.weight, padding=1), bn, False) + s)),
        "bn_relu_conv train forward+backward": _backward(
            lambda: F.conv2d(F.relu(_eager_bn(xg, bn)), conv.weight, padding=1), leaves),
        "add_relu forward+backward": _backward(lambda: F.relu(xg + sg), leaves),
    }
    return fused[name], eager[name]


@pytest.mark.parametrize("backend", [CPU, "triton"])
@pytest.mark.parametrize("name", list(CASES))
def test_fused_call_dispatches_its_budget_and_no_more_than_eager(name, backend):
    skip_unless_runs(backend, "conv_bn_relu", torch.randn(1, 4, 2, 2))
    fused, eager = _case(name, backend)
    fused()  # fills the inference caches, as the first call of a model does
    budget = CASES[name][0 if backend == "cpu" else 1]
    counted = count_kernels(fused)
    assert sum(counted.values()) == budget, dict(counted)
    assert budget <= _total(eager)


def test_inference_cache_follows_parameter_updates():
    """The folded convolution is reused while nothing changes and recomputed after an in-place update."""
    x = torch.randn(2, 4, 5, 5)
    conv, bn, _ = _blocks()
    bn.eval()
    with torch.no_grad():
        bn.running_mean.uniform_()
        first = _conv_bn_relu(x, conv, bn, "cpu" if not ops.BACKENDS["cpu"].unavailable() else "reference",
                              training=False)
        bn.weight.mul_(2)
        conv.weight.add_(0.5)
        second = ops.conv_bn_relu(x, conv.weight, None, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                  training=False, padding=1)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, F.relu(bn(conv(x))), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [CPU, "triton"])
def test_inference_cache_follows_training_updates(backend):
    """A training call updates the running statistics in its finalize kernel; the next eval call must use the
    new ones (the kernels write through pointers, so the op layer bumps the version counters)."""
    skip_unless_runs(backend, "conv_bn_relu", torch.randn(1, 4, 2, 2))
    x = torch.randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    conv, bn, _ = _blocks()
    with torch.no_grad():
        for training in (False, True, False, True, False):
            bn.train(training)
            out = _conv_bn_relu(x, conv, bn, backend, training=training)
            torch.testing.assert_close(out, F.relu(_eager_bn(conv(x), copy_of(bn), training)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", [CPU, "triton"])
def test_conv_bn_add_relu_inference_follows_training_updates(backend):
    """conv_bn_add_relu with a BN'd shortcut, eval -> train -> eval: the eval calls fold the BN and take the shortcut
    BN's affine map from the running statistics the training calls' finalize kernels just updated."""
    skip_unless_runs(backend, "conv_bn_add_relu", torch.randn(1, 4, 2, 2))
    x = torch.randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    s = torch.randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    conv, bn, s_bn = _blocks()
    with torch.no_grad():
        for training in (False, True, False, True, False):
            expected_bn, expected_s_bn = copy_of(bn), copy_of(s_bn)
            expected = F.relu(_eager_bn(conv(x), expected_bn, training) + _eager_bn(s, expected_s_bn, training))
            out = ops.conv_bn_add_relu(x, conv.weight, None, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                       bn.num_batches_tracked, training=training, padding=1, shortcut=s,
                                       shortcut_bn=ops.BatchNormArgs(s_bn.weight, s_bn.bias, s_bn.running_mean,
                                                                     s_bn.running_var, s_bn.num_batches_tracked),
                                       backend=backend)
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
            for mine, theirs in ((bn, expected_bn), (s_bn, expected_s_bn)):
                torch.testing.assert_close(mine.running_var, theirs.running_var)


def copy_of(bn):
    """bn's state before the reference call (which would update it again)."""
    import copy
    return copy.deepcopy(bn)


# (backend, model, training) -> the exact kernels (cpu) or launches and kernels (triton) of the fast model's step,
# lean training off (pyfast.ops.lean; LEAN_REBUILDS adds its passes)
MODEL_BUDGETS = {("cpu", "resnet50", True): 392, ("cpu", "resnet50", False): 105, ("cpu", "regnetx_32", True): 786,
                 ("cpu", "regnetx_32", False): 212, ("triton", "resnet50", True): 363,
                 ("triton", "resnet50", False): 58, ("triton", "regnetx_32", True): 720,
                 ("triton", "regnetx_32", False): 110}
# (backend, training) -> the largest fast/eager ratio: training at most eager's kernels; inference (BN folded once,
# ReLU in the convolution) 0.7x on cpu, 0.5x on Triton
MODEL_RATIOS = {("cpu", True): 1.0, ("cpu", False): 0.7, ("triton", True): 1.0, ("triton", False): 0.5}


# model -> the passes a lean training step adds (pyfast.ops.lean): one per activation its backward rebuilds (the
# post-ReLU tensor of each conv-BN-ReLU, each block output a later op saves, resnet50's stem max-pool) plus
# resnet50's backward max-pool pass, which finds the indices eager keeps; the same on every backend
LEAN_REBUILDS = {"resnet50": 50, "regnetx_32": 102}


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("model", ["resnet50", "regnetx_32"])
@pytest.mark.parametrize("training, lean", [(True, False), (True, True), (False, False)],
                         ids=["training", "training-lean", "inference"])  # (inference keeps nothing: not lean)
def test_model_step_kernels_against_eager(backend, model, training, lean):
    """A fast model's step (batch 2, 32x32) against the eager model's, held to exact budgets. On Triton (under the
    interpreter, launches counted without running them) every reduction is one launch, its partials combined by
    its last program. Lean training rebuilds activations in the backward: on a CPU, whose convolution cannot
    normalize its operand, each is a pass of its own, beyond eager's kernels."""
    if backend == "cpu" and ops.BACKENDS["cpu"].unavailable():
        pytest.skip("pyfast._C is not built")
    if backend == "triton":
        pytest.importorskip("triton")
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("the model runs on CPU tensors: Triton's interpreter only")
    with ops.lean.use_lean(lean):
        counts = kernel_counts(model, backend, training)
    if lean:
        assert counts["fast"] == MODEL_BUDGETS[backend, model, training] + LEAN_REBUILDS[model], counts
        return
    assert counts["fast"] == MODEL_BUDGETS[backend, model, training], counts
    assert counts["fast"] <= MODEL_RATIOS[backend, training] * counts["eager"], counts
