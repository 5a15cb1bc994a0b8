"""The CPU BN primitives (csrc/cpu/batch_norm.cpp) against eager PyTorch, forward + backward.

On a 32x256x56x56 float32 activation, NCHW and channels_last, the BN parts of two fusions:
- bn_add_relu: relu(bn(y) + shortcut), identity shortcut, batch statistics;
- bn_relu (conv_bn_relu after its convolution): relu(bn(y)), batch statistics.
eager: F.batch_norm + add + relu and autograd. pyfast: bn_stats -> bn_act_forward, then
bn_act_backward_reduce -> bn_act_backward_elemt, with the per-channel arithmetic of the op layer.
Run with `pytest --benchmark benchmarks/test_bench_cpu_bn.py`.
"""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("pytest_benchmark")
pytest.importorskip("pyfast._C")
pytestmark = pytest.mark.benchmark

SHAPE = (32, 256, 56, 56)
EPS = 1e-5
FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
ops = torch.ops.pyfast


def eager_step(y, shortcut, weight, bias, grad):
    """F.batch_norm(training) [+ shortcut] + relu, forward and backward through autograd."""
    inputs = [t.detach().requires_grad_() for t in (y, weight, bias)]
    y, weight, bias = inputs
    z = F.batch_norm(y, None, None, weight, bias, training=True, eps=EPS)
    if shortcut is not None:
        shortcut = shortcut.detach().requires_grad_()
        inputs.append(shortcut)
        z = z + shortcut
    return torch.autograd.grad(torch.relu(z), inputs, grad)


def pyfast_step(y, shortcut, weight, bias, grad):
    """The same step as the four primitives; returns grad_y, grad_weight, grad_bias, grad_shortcut."""
    mean, var = ops.bn_stats(y)
    invstd = torch.rsqrt(var + EPS)
    scale = weight * invstd
    shift = bias - mean * scale
    ops.bn_act_forward(y, scale, shift, shortcut, None, None, True)
    sum_dz, sum_dz_xhat, _ = ops.bn_act_backward_reduce(grad, y, scale, shift, mean, invstd, shortcut, None, None,
                                                        None, None, True)
    count = y.numel() // y.size(1)
    grad_y, grad_shortcut = ops.bn_act_backward_elemt(grad, y, scale, shift, mean, invstd, shortcut, None, None,
                                                      None, None, True, sum_dz / count, sum_dz_xhat / count, None)
    return grad_y, sum_dz_xhat, sum_dz, grad_shortcut


@pytest.mark.parametrize("provider", ["eager", "pyfast"])
@pytest.mark.parametrize("layout", FORMATS)
@pytest.mark.parametrize("block", ["bn_add_relu", "bn_relu"])
def test_bn_forward_backward(benchmark, block, layout, provider):
    def tensor():
        return torch.randn(SHAPE).contiguous(memory_format=FORMATS[layout])

    y, grad = tensor(), tensor()
    shortcut = tensor() if block == "bn_add_relu" else None
    weight, bias = torch.rand(SHAPE[1]) + 0.5, torch.randn(SHAPE[1])
    step = eager_step if provider == "eager" else pyfast_step
    benchmark.group = f"{block} {layout}"
    benchmark.extra_info.update(shape=SHAPE, dtype="float32", threads=torch.get_num_threads())
    benchmark.pedantic(step, args=(y, shortcut, weight, bias, grad), rounds=5, warmup_rounds=1)
