"""The cpu backend's BN work against eager PyTorch on CPU, forward + backward, as users call it.

On a 32x256x56x56 float32 activation in NCHW and channels_last, the BN parts of two fusions:
- bn_add_relu: relu(bn(y) + shortcut), identity shortcut, batch statistics;
- bn_relu, the BN+ReLU part of conv_bn_relu (what follows its convolution): relu(bn(y)).
eager is `backend="reference"` (F.batch_norm [+ add] + relu, PyTorch's autograd); pyfast is
`backend="cpu"` (the csrc kernels: statistics + one elementwise pass forward, one reduction + one
elementwise pass backward). Run with `pytest --benchmark benchmarks/test_bench_cpu_bn.py`.
"""
import pytest
import torch

from pyfast import ops

pytest.importorskip("pytest_benchmark")
pytestmark = [pytest.mark.benchmark,
              pytest.mark.skipif(ops.BACKENDS["cpu"].unavailable() is not None, reason="pyfast._C not built")]

SHAPE = (32, 256, 56, 56)
FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
BACKENDS = {"eager": "reference", "pyfast": "cpu"}


def step(y, shortcut, weight, bias, running_mean, running_var, grad, backend):
    """One training-mode forward of relu(bn(y) [+ shortcut]), and its backward when grad is given."""
    out = ops.bn_add_relu(y, weight, bias, running_mean, running_var, training=True, shortcut=shortcut,
                          backend=backend)
    if grad is None:
        return out
    inputs = [t for t in (y, shortcut, weight, bias) if t is not None]
    return torch.autograd.grad(out, inputs, grad)  # fresh gradients: no accumulation pass into .grad


@pytest.mark.parametrize("provider", BACKENDS)
@pytest.mark.parametrize("passes", ["forward", "forward+backward"])
@pytest.mark.parametrize("layout", FORMATS)
@pytest.mark.parametrize("block", ["bn_add_relu", "bn_relu"])
def test_bn(benchmark, block, layout, passes, provider):
    def tensor(grad=False):
        return torch.randn(SHAPE).contiguous(memory_format=FORMATS[layout]).requires_grad_(grad)

    backward = passes == "forward+backward"
    y, grad = tensor(grad=backward), tensor() if backward else None
    shortcut = tensor(grad=backward) if block == "bn_add_relu" else None
    weight = (torch.rand(SHAPE[1]) + 0.5).requires_grad_(backward)
    bias = torch.randn(SHAPE[1]).requires_grad_(backward)
    args = (y, shortcut, weight, bias, torch.zeros(SHAPE[1]), torch.ones(SHAPE[1]), grad, BACKENDS[provider])
    benchmark.group = f"{block} {layout} {passes}"
    benchmark.extra_info.update(shape=SHAPE, dtype="float32", threads=torch.get_num_threads())
    benchmark.pedantic(step, args=args, rounds=7, warmup_rounds=1)
