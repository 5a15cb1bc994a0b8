"""Fused calls memoized whole (pyfast.ops._common.memoized_call): a repeated eval call skips every check
and backend lookup, and still computes what the reference does after any change of its tensors, its inputs'
layout or the backend settings; calls that may not be memoized take the general path."""
import copy
import sys

import pytest
import torch
from torch import nn

import pyfast
from pyfast import ops
from pyfast.ops import BatchNormArgs, backends, reference
from pyfast.ops._conv import ConvParams

from tolerances import assert_close, assert_sum_backward_close

pytestmark = pytest.mark.skipif(ops.BACKENDS["cpu"].unavailable() is not None, reason="pyfast._C is not built")


def _bn(channels=6):
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.copy_(torch.randn(channels))
        bn.running_var.copy_(torch.rand(channels) + 0.5)
    return bn.eval()


def _args(bn):
    return BatchNormArgs(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.momentum,
                         bn.eps)


@pytest.fixture
def selections(monkeypatch):
    """The (op, backend) of every call that reached the backend lookup (a memoized call does not)."""
    calls = []
    original = ops.conv_bn_relu.__globals__["select"]

    def counting(*args, **kwargs):
        chosen = original(*args, **kwargs)
        calls.append((args[0], chosen.name))
        return chosen

    for module in ("pyfast.ops.conv_bn_relu", "pyfast.ops.bn_add_relu", "pyfast.ops.bn_relu_conv"):  # not the functions
        monkeypatch.setattr(sys.modules[module], "select", counting)
    return calls


def _conv_bn_relu(x, conv, bn):
    return ops.conv_bn_relu(x, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                            training=False, padding=1, backend="cpu")


def _expected(x, conv, bn):
    return reference.conv_bn_relu(x, conv.weight, conv.bias, _args(bn), False, ConvParams.of(1, 1, 1, 1), True)


@torch.no_grad()
def test_conv_bn_relu_memo_skips_the_lookup_and_follows_every_change(selections):
    conv, bn = nn.Conv2d(4, 6, 3, padding=1), _bn()
    x = torch.randn(2, 4, 5, 5)
    assert_close(_conv_bn_relu(x, conv, bn), _expected(x, conv, bn))
    resolved = len(selections)
    for _ in range(3):
        x = torch.randn(2, 4, 5, 5)  # new activations of the same layout
        assert_close(_conv_bn_relu(x, conv, bn), _expected(x, conv, bn))
    assert len(selections) == resolved, "a repeated inference call went through the checks again"

    bn.running_var.mul_(3)  # an in-place write: a new version
    conv.weight.add_(1)
    assert_close(_conv_bn_relu(x, conv, bn), _expected(x, conv, bn))
    for x in (torch.randn(3, 4, 7, 6), x.contiguous(memory_format=torch.channels_last), x.double()):
        if x.dtype == torch.double:
            conv.double(), bn.double()
        assert_close(_conv_bn_relu(x, conv, bn), _expected(x, conv, bn))
    assert len(selections) == resolved + 4


@torch.no_grad()
def test_bn_add_relu_memo_follows_the_shortcut_and_its_bn(selections):
    bn, shortcut_bn = _bn(), _bn()
    y, s = torch.randn(2, 6, 4, 4), torch.randn(2, 6, 4, 4)

    def fused(y, s, sbn):
        return ops.bn_add_relu(y, bn.weight, bn.bias, bn.running_mean, bn.running_var, shortcut=s,
                               shortcut_bn=sbn, backend="cpu")

    for sbn in (None, _args(shortcut_bn)):
        expected = reference.bn_add_relu(y, _args(bn), s, sbn, False, True)
        assert_close(fused(y, s, sbn), expected)
        resolved = len(selections)
        assert_close(fused(y, s, sbn), expected)
        assert len(selections) == resolved
    shortcut_bn.running_mean.add_(1)
    s_last = s.contiguous(memory_format=torch.channels_last)  # the shortcut in another layout than y
    for shortcut in (s, s_last):
        assert_close(fused(y, shortcut, _args(shortcut_bn)), reference.bn_add_relu(y, _args(bn), s, _args(shortcut_bn),
                                                                                   False, True))


@torch.no_grad()
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_conv_bn_add_relu_memo_follows_the_weights_the_shortcut_bn_and_layouts(selections, backend):
    """Inference conv_bn_add_relu binds the folded convolution and the shortcut BN's affine map: a repeated call
    skips the lookup, and an in-place weight update, a new shortcut-BN eps or running mean, or a shortcut in another
    layout computes what the reference does."""
    if ops.BACKENDS[backend].why_not("conv_bn_add_relu", torch.device("cpu"), torch.float32):
        pytest.skip(f"{backend} does not run on CPU tensors here")
    conv, bn, shortcut_bn = nn.Conv2d(4, 6, 3, padding=1), _bn(), _bn()
    x, s = torch.randn(2, 4, 5, 5), torch.randn(2, 6, 5, 5)

    def check(shortcut=s):
        expected = reference.bn_add_relu(nn.functional.conv2d(x, conv.weight, conv.bias, padding=1), _args(bn), s,
                                         _args(shortcut_bn), False, True)
        actual = ops.conv_bn_add_relu(x, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                      padding=1, shortcut=shortcut, shortcut_bn=_args(shortcut_bn), backend=backend)
        assert_close(actual, expected, what=f"{backend} inference")

    check()
    resolved = len(selections)
    check()
    assert len(selections) == resolved, "a repeated eval call went through the checks again"
    changes = [lambda: conv.weight.mul_(1.5), lambda: setattr(shortcut_bn, "eps", 0.1),
               lambda: shortcut_bn.running_mean.add_(1), lambda: bn.running_var.mul_(2)]
    for change in changes:
        change()
        check()
    check(s.contiguous(memory_format=torch.channels_last))
    assert len(selections) == resolved + len(changes) + 1


def test_calls_that_are_not_memoized_take_the_general_path(selections):
    conv, bn = nn.Conv2d(4, 6, 3, padding=1), _bn()
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    with torch.no_grad():
        _conv_bn_relu(x, conv, bn)
    first = len(selections)
    out = _conv_bn_relu(x, conv, bn)  # records a graph: the general path, with gradients
    assert out.grad_fn is not None and len(selections) == first + 1
    out.sum().backward()
    assert x.grad is not None and conv.weight.grad is not None
    with torch.no_grad(), backends.record_choices() as seen:
        _conv_bn_relu(x, conv, bn)
    assert seen[("conv_bn_relu", "cpu")] == 1  # recorded choices see every call
    with torch.no_grad(), pyfast.use_backend("reference"):
        assert_close(ops.conv_bn_relu(x, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
                                      bn.running_var, padding=1), _expected(x, conv, bn))


@torch.no_grad()
def test_bad_input_still_raises_after_a_memoized_call():
    conv, bn = nn.Conv2d(4, 6, 3, padding=1), _bn()
    _conv_bn_relu(torch.randn(2, 4, 5, 5), conv, bn)
    with pytest.raises(ValueError, match="channels"):
        _conv_bn_relu(torch.randn(2, 5, 5, 5), conv, bn)
    with pytest.raises(ValueError, match="smaller than the kernel"):
        ops.conv_bn_relu(torch.randn(2, 4, 1, 1), conv.weight, None, bn.weight, bn.bias, bn.running_mean,
                         bn.running_var, backend="cpu")
    with pytest.raises(ValueError, match="dtype"):
        _conv_bn_relu(torch.randn(2, 4, 5, 5, dtype=torch.float64), conv, bn)
    with pytest.raises(ValueError, match="running_mean"):
        ops.bn_add_relu(torch.randn(2, 6, 4, 4), bn.weight, bn.bias, None, None, backend="cpu")
    with pytest.raises(TypeError, match="BatchNormArgs"):
        ops.bn_add_relu(torch.randn(2, 6, 4, 4), bn.weight, bn.bias, bn.running_mean, bn.running_var,
                        shortcut=torch.randn(2, 6, 4, 4), shortcut_bn=(1, 2), backend="cpu")


def test_training_memo_keeps_through_optimizer_steps_and_follows_new_tensors(selections):
    """A training call's memo binds the tensors, not their values: running statistics and optimizer steps
    change values in place and the memo still holds; outputs, gradients and running statistics match the
    reference at every step, and a rebound parameter resolves the call again."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)
    ref_conv, ref_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    optimizer = torch.optim.SGD([*conv.parameters(), *bn.parameters()], lr=0.1)
    ref_optimizer = torch.optim.SGD([*ref_conv.parameters(), *ref_bn.parameters()], lr=0.1)

    def step(c, b, opt, backend, x):
        opt.zero_grad()
        out = ops.conv_bn_relu(x, c.weight, c.bias, b.weight, b.bias, b.running_mean, b.running_var,
                               b.num_batches_tracked, training=True, padding=1, backend=backend)
        out.square().sum().backward()
        opt.step()
        return out

    for i in range(4):
        if i == 2:
            conv.weight = nn.Parameter(conv.weight.detach().clone())  # a new tensor: resolved again
            ref_conv.weight = nn.Parameter(ref_conv.weight.detach().clone())
            optimizer.param_groups[0]["params"][0] = conv.weight
            ref_optimizer.param_groups[0]["params"][0] = ref_conv.weight
        x = torch.randn(2, 4, 5, 5)
        assert_close(step(conv, bn, optimizer, "cpu", x), step(ref_conv, ref_bn, ref_optimizer, "reference", x))
        for mine, theirs in ((conv.weight, ref_conv.weight), (bn.weight, ref_bn.weight), (bn.bias, ref_bn.bias),
                             (bn.running_mean, ref_bn.running_mean), (bn.running_var, ref_bn.running_var)):
            assert_close(mine, theirs)
        assert bn.num_batches_tracked.item() == i + 1
    assert selections.count(("conv_bn_relu", "cpu")) == 2  # the first call and the one after the rebinding


def test_bn_relu_conv_memo_in_both_modes(selections):
    torch.manual_seed(0)
    bn, conv = nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1)
    ref_bn, ref_conv = copy.deepcopy(bn), copy.deepcopy(conv)

    def call(b, c, training, backend, x):
        return ops.bn_relu_conv(x, b.weight, b.bias, b.running_mean, b.running_var, b.num_batches_tracked,
                                training=training, weight=c.weight, bias=c.bias, padding=1, backend=backend)

    for training in (True, True, False, False):
        x = torch.randn(2, 4, 5, 5, requires_grad=training)
        ref_x = x.detach().clone().requires_grad_(training)
        with torch.set_grad_enabled(training):
            out, expected = call(bn, conv, training, "cpu", x), call(ref_bn, ref_conv, training, "reference", ref_x)
        if training:
            assert_sum_backward_close(out, expected, [(x, ref_x), (conv.weight, ref_conv.weight)])
        assert_close(out, expected)
        assert_close(bn.running_var, ref_bn.running_var)
    with torch.no_grad():
        bn.running_mean.add_(1)
        ref_bn.running_mean.add_(1)
        assert_close(call(bn, conv, False, "cpu", x), call(ref_bn, ref_conv, False, "reference", x))
    assert selections.count(("bn_relu_conv", "cpu")) == 3  # training once, eval once, eval after the write



def _training_calls(backend):
    """Each fused op's training call of a ModuleDict's tensors (conv, bn, bn2: the shortcut's BN) on `backend`,
    or with backend None the reference composite itself (pyfast.ops.reference, memoized by nothing)."""
    params = ConvParams.of(1, 1, 1, 1)

    def conv_bn_relu(m, x):
        if backend is None:
            return reference.conv_bn_relu(x, m.conv.weight, None, _args(m.bn), True, params, True)
        return ops.conv_bn_relu(x, m.conv.weight, None, *_args(m.bn)[:5], training=True, padding=1, backend=backend)

    def bn_add_relu(m, x):
        if backend is None:
            return reference.bn_add_relu(x, _args(m.bn), x.flip(0), _args(m.bn2), True, True)
        return ops.bn_add_relu(x, *_args(m.bn)[:5], training=True, shortcut=x.flip(0), shortcut_bn=_args(m.bn2),
                               backend=backend)

    def bn_relu_conv(m, x):
        if backend is None:
            return reference.bn_relu_conv(x, _args(m.bn), True, m.conv.weight, None, params, True)
        return ops.bn_relu_conv(x, *_args(m.bn)[:5], training=True, weight=m.conv.weight, padding=1,
                                backend=backend)
    return {"conv_bn_relu": conv_bn_relu, "bn_add_relu": bn_add_relu, "bn_relu_conv": bn_relu_conv}


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("op", ["conv_bn_relu", "bn_add_relu", "bn_relu_conv"])
def test_training_calls_are_memoized_on_every_backend(selections, backend, op):
    """The reference composite and the Python autograd.Function (Triton) are memoized too: a repeated training
    call reaches no check or lookup, and its outputs, gradients and running statistics stay the reference's."""
    if ops.BACKENDS[backend].unavailable() is not None:
        pytest.skip(ops.BACKENDS[backend].unavailable())
    torch.manual_seed(0)
    channels = {"conv_bn_relu": 6, "bn_add_relu": 4, "bn_relu_conv": 4}[op]
    mine = nn.ModuleDict({"conv": nn.Conv2d(4, 6, 3, padding=1, bias=False), "bn": nn.BatchNorm2d(channels),
                          "bn2": nn.BatchNorm2d(4)})
    theirs = copy.deepcopy(mine)
    call, expected_call = _training_calls(backend)[op], _training_calls(None)[op]
    for _ in range(3):
        x = torch.randn(2, 4, 5, 5)
        x_mine, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
        mine.zero_grad()
        theirs.zero_grad()
        assert_sum_backward_close(call(mine, x_mine), expected_call(theirs, x_theirs),
                                  [(x_mine, x_theirs), (mine.bn.weight, theirs.bn.weight)])
        for name, buffer in mine.named_buffers():
            expected = theirs.get_buffer(name)
            if buffer.is_floating_point():
                assert_close(buffer, expected)
            else:
                assert torch.equal(buffer, expected)
    assert selections.count((op, backend)) == 1
