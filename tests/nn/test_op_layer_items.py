"""Issue 13's items that need the op layer (pyfast/ops), as reproducers through the modules, each a strict
xfail until the op layer is fixed: remove the mark with the fix (a pass while marked fails the suite)."""
import copy

import pytest
import torch
from nn_checks import check, double_copy
from torch import nn

from pyfast.nn import BNAddReLU, BNReLUConv2d, ConvBNReLU2d, fuse


def op_layer(item: int, what: str):
    return pytest.mark.xfail(strict=True, reason=f"op layer: issue 13 item {item} ({what})")


def _empty_batch_cases():
    y = torch.randn(0, 4, 5, 5)
    return [(ConvBNReLU2d(4, 4, 3, padding=1), lambda m, x: m(x), lambda m: m.bn),
            (BNReLUConv2d(4, 4, 3, padding=1), lambda m, x: m(x), lambda m: m.bn),
            (BNAddReLU(4), lambda m, x: m(x, y), lambda m: m)]


@pytest.mark.parametrize("index", range(3), ids=["ConvBNReLU2d", "BNReLUConv2d", "BNAddReLU"])
def test_empty_batch_in_training_gives_zero_gradients(index):
    module, call, bn_of = _empty_batch_cases()[index]
    call(module, torch.randn(0, 4, 5, 5, requires_grad=True)).sum().backward()
    assert torch.equal(bn_of(module).weight.grad, torch.zeros(4))
    assert torch.equal(bn_of(module).bias.grad, torch.zeros(4))


@pytest.mark.parametrize("cls", [ConvBNReLU2d, BNReLUConv2d])
def test_double_backward_names_the_op_and_the_fallback(cls):
    """Issue 13 item 6 allows either: the fused backward kernels are not differentiable, so a second backward
    through them raises an error naming the op and the fallback (backend='reference', which supports it)."""
    module = cls(3, 3, 3, padding=1)
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    (g,) = torch.autograd.grad(module(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"pyfast\.ops\.\w+ does not support double backward.*backend='reference'"):
        g.square().sum().backward()
    plain = double_copy(nn.Sequential(*module))
    grads = []
    for m, xi in ((cls(3, 3, 3, padding=1, backend="reference"), x.detach().clone()), (plain, x.detach().double())):
        m.load_state_dict(module.state_dict())
        xi.requires_grad_()
        (g,) = torch.autograd.grad(m(xi).square().sum(), xi, create_graph=True)
        g.square().sum().backward()
        grads.append(xi.grad)
    check(grads[0], grads[1], kind="backward", what="second-order input gradient through the fallback")


class ShortcutWrittenAfter(nn.Module):
    """relu(bn(y) + s), then an in-place write into s: legal in eager (the add's backward needs no s)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)

    def forward(self, x):
        s = x * 2
        out = torch.relu(self.bn(self.conv(x)) + s)
        s.mul_(3)
        return out + s.mean()


def test_writing_into_the_shortcut_after_the_fused_call_is_legal():
    """Issue 13 item 7's allowed resolution: the fused bn_add_relu keeps its identity shortcut for the backward,
    so fuse does not make a bn_add_relu of a site whose shortcut is written in place later (the conv-BN and the
    add+ReLU, which keeps only its output, are still fused), and the model stays exactly eager's."""
    model = ShortcutWrittenAfter()
    fused, report = fuse(copy.deepcopy(model))
    kinds = [f.kind for f in report.fusions]
    # add_relu saves only its output
    assert not {"bn_add_relu", "conv_bn_add_relu"} & set(kinds) and "add_relu" in kinds, str(report)
    x = torch.randn(2, 3, 4, 4)
    grads = []
    for m in (fused, model):
        xi = x.clone().requires_grad_()
        m(xi).square().sum().backward()
        grads.append(xi.grad)
    check(grads[0], grads[1], kind="backward", what="input gradient")


@pytest.mark.parametrize("seed", range(3))
def test_bn_relu_conv_under_autocast_follows_the_per_op_policy(seed):
    """Eager autocast runs the BN in float32 and casts only the conv's input to bfloat16. An input with a
    large mean shows the difference: cast first, its rounding is large against its spread."""
    torch.manual_seed(seed)
    module = BNReLUConv2d(8, 8, 3, padding=1)
    eager, plain = nn.Sequential(*copy.deepcopy(list(module))), double_copy(nn.Sequential(*module))
    x = torch.randn(4, 8, 6, 6) * 2 + 30
    expected = plain(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, eager_out = module(x), eager(x)
    check(out, expected, eager_out, what="bfloat16 output")


@pytest.mark.parametrize("cls", [ConvBNReLU2d, BNReLUConv2d])
def test_eps_zero_is_refused_in_training_like_batchnorm(cls):
    x = torch.randn(2, 3, 5, 5)
    with pytest.raises(ValueError, match="eps"):
        nn.BatchNorm2d(3, eps=0)(x)
    with pytest.raises(ValueError, match="eps"):
        cls(3, 3, 3, eps=0)(x)
