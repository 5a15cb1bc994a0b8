"""The two forms of each fused op's autograd (docs/ARCHITECTURE.md section 6) compute the same thing: the C++
Function that eager calls on the cpu backend, and the Python autograd.Function that torch.compile and Triton run,
here forced on the cpu backend. Both call the same primitives in the same order, so outputs, every gradient,
the running statistics and num_batches_tracked must agree exactly, in training and in eval with gradients."""
import copy

import pytest
import torch
from torch import nn

from pyfast import ops

pytestmark = pytest.mark.skipif(ops.BACKENDS["cpu"].unavailable() is not None, reason="pyfast._C is not built")


def _bn(channels):
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return bn


def _args(bn):
    return bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked


CALLS = {
    "conv_bn_relu": lambda t, m, training: ops.conv_bn_relu(t["x"], m["conv"].weight, m["conv"].bias, *_args(m["bn"]),
                                                            training=training, padding=1, groups=2),
    "bn_relu_conv": lambda t, m, training: ops.bn_relu_conv(t["x"], *_args(m["bn"]), training=training,
                                                            weight=m["conv"].weight, bias=m["conv"].bias, padding=1),
    "bn_add_relu": lambda t, m, training: ops.bn_add_relu(t["y"], *_args(m["bn"]), training=training,
                                                          shortcut=t["s"]),
    "bn_add_relu with a BN'd shortcut": lambda t, m, training: ops.bn_add_relu(
        t["y"], *_args(m["bn"]), training=training, shortcut=t["s"],
        shortcut_bn=ops.BatchNormArgs(*_args(m["s_bn"]), 0.1, 1e-5)),
    "conv_bn_add_relu with a BN'd shortcut": lambda t, m, training: ops.conv_bn_add_relu(
        t["x"], m["conv"].weight, m["conv"].bias, *_args(m["bn"]), training=training, padding=1, shortcut=t["s"],
        shortcut_bn=ops.BatchNormArgs(*_args(m["s_bn"]), 0.1, 1e-5)),
    "add_relu": lambda t, m, training: ops.add_relu(t["y"], t["s"]),
}


def _run(call, tensors, modules, training, python_form, monkeypatch):
    tensors = {k: v.detach().clone().requires_grad_() for k, v in tensors.items()}
    modules = copy.deepcopy(modules)
    with monkeypatch.context() as patch:
        if python_form:
            patch.setattr(ops.BACKENDS["cpu"], "eager_autograd", None)
        out = call(tensors, modules, training)
        node = out.grad_fn.name()  # which form ran
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    grads = {k: v.grad for k, v in tensors.items()}
    grads.update({f"{name}.{p}": t.grad for name, m in modules.items() for p, t in m.named_parameters()})
    state = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
    return out, grads, state, node


@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
@pytest.mark.parametrize("op", list(CALLS))
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_cpp_and_python_autograd_agree(op, training, layout, monkeypatch):
    tensors = {name: torch.randn(2, 4, 5, 5).contiguous(memory_format=layout) for name in ("x", "y", "s")}
    modules = {"conv": nn.Conv2d(4, 4, 3, padding=1, groups=2 if op == "conv_bn_relu" else 1), "bn": _bn(4),
               "s_bn": _bn(4)}
    cpp = _run(CALLS[op], tensors, modules, training, False, monkeypatch)
    python = _run(CALLS[op], tensors, modules, training, True, monkeypatch)
    assert "CppNode<pyfast::autograd" in cpp[3] and python[3].startswith("_"), (cpp[3], python[3])
    assert torch.equal(cpp[0], python[0])
    for what in (1, 2):
        assert cpp[what].keys() == python[what].keys()
        for name, value in cpp[what].items():
            other = python[what][name]
            assert (value is None) == (other is None), name
            assert value is None or torch.equal(value, other), name
