"""pyfast.nn.functional's memo of module pairs in eval: a repeated call on the same modules reads only what its
key holds and skips every lookup, and follows every change of the modules' state or settings (compared with the
plain modules computing the same thing)."""
import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyfast import ops
from pyfast.nn import functional

from tolerances import assert_close, assert_sum_backward_close

pytestmark = pytest.mark.skipif(ops.BACKENDS["cpu"].unavailable() is not None, reason="pyfast._C is not built")


@pytest.fixture
def lookups(monkeypatch):
    """The ops whose calls reached the backend lookup."""
    seen = []
    for name in ("pyfast.ops.conv_bn_relu", "pyfast.ops.bn_add_relu"):
        module = sys.modules[name]
        original = module.select

        def counting(*args, _original=original, **kwargs):
            seen.append(args[0])
            return _original(*args, **kwargs)
        monkeypatch.setattr(module, "select", counting)
    return seen


def _bn(channels):
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(), bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2)
    return bn.eval()


@torch.no_grad()
def test_conv_bn_relu_module_memo_follows_the_modules(lookups):
    conv, bn = nn.Conv2d(4, 6, 3, padding=1), _bn(6)
    x = torch.randn(2, 4, 8, 8)

    def check():
        assert_close(functional.conv_bn_relu(x, conv, bn, backend="cpu"), F.relu(bn(conv(x))))

    check()
    resolved = len(lookups)
    check()
    check()
    assert len(lookups) == resolved, "a repeated eval call went through the op layer's checks again"
    changes = [lambda: setattr(bn, "eps", 1e-1), lambda: bn.running_var.mul_(2),
               lambda: setattr(conv, "stride", (2, 2)), lambda: setattr(conv, "padding", "same"),
               lambda: setattr(bn, "running_mean", torch.randn(6)),
               lambda: conv.load_state_dict({"weight": torch.randn(6, 4, 3, 3), "bias": torch.randn(6)})]
    for change in changes:
        if change is changes[3]:
            conv.stride = (1, 1)  # 'same' padding needs stride 1
        change()
        check()
    assert len(lookups) == resolved + len(changes)


@torch.no_grad()
def test_bn_add_relu_module_memo_follows_both_bns_and_falls_back_for_broadcasts(lookups):
    bn, shortcut_bn = _bn(6), _bn(6)
    y, s = torch.randn(2, 6, 4, 4), torch.randn(2, 6, 4, 4)
    for sbn in (None, shortcut_bn):
        expected = F.relu(bn(y) + (s if sbn is None else sbn(s)))
        assert_close(functional.bn_add_relu(y, bn, s, sbn, backend="cpu"), expected)
        resolved = len(lookups)
        assert_close(functional.bn_add_relu(y, bn, s, sbn, backend="cpu"), expected)
        assert len(lookups) == resolved
    shortcut_bn.running_mean.add_(1)
    assert_close(functional.bn_add_relu(y, bn, s, shortcut_bn, backend="cpu"), F.relu(bn(y) + shortcut_bn(s)))
    row = torch.randn(1, 6, 1, 4)  # broadcasts: the plain modules' own result
    assert_close(functional.bn_add_relu(y, bn, row, backend="cpu"), F.relu(bn(y) + row))
    with pytest.raises(TypeError, match="nn.BatchNorm2d"):
        functional.bn_add_relu(y, bn, s, nn.Identity(), backend="cpu")


def _sgd_steps(forwards, optimizers, x):
    """One SGD step of each forward (the fused one, the plain one) on x, with its optimizer; the outputs."""
    outs = []
    for forward, optimizer in zip(forwards, optimizers):
        optimizer.zero_grad()
        out = forward(x)
        out.sum().backward()
        optimizer.step()
        outs.append(out)
    return outs


def _assert_trained_alike(params, plain_params, bns, plain_bns, steps: int):
    for mine, theirs in zip(params, plain_params):
        assert_close(mine, theirs)
    for mine, theirs in zip(bns, plain_bns):
        assert_close(mine.running_var, theirs.running_var)
        assert mine.num_batches_tracked.item() == theirs.num_batches_tracked.item() == steps


def test_training_module_memo_through_sgd_steps_and_mode_switches(lookups):
    """Training calls memoized on the modules: outputs, gradients and running statistics match the plain modules
    over SGD steps (in-place updates keep the memo), and a changed momentum or a switch to eval resolves again."""
    torch.manual_seed(0)
    conv, bn, last_bn = nn.Conv2d(4, 6, 3, padding=1), _bn(6).train(), _bn(6).train()
    plain = [copy.deepcopy(m) for m in (conv, bn, last_bn)]
    fused_params = [p for m in (conv, bn, last_bn) for p in m.parameters()]
    plain_params = [p for m in plain for p in m.parameters()]
    optimizers = [torch.optim.SGD(fused_params, lr=0.01), torch.optim.SGD(plain_params, lr=0.01)]

    def fused_forward(x):
        h = functional.conv_bn_relu(x, conv, bn, backend="cpu")
        return functional.bn_add_relu(h, last_bn, x.repeat(1, 2, 1, 1)[:, :6], backend="cpu")

    def plain_forward(x):
        p_conv, p_bn, p_last = plain
        return F.relu(p_last(F.relu(p_bn(p_conv(x)))) + x.repeat(1, 2, 1, 1)[:, :6])

    for step in range(5):
        if step == 3:
            bn.momentum = plain[1].momentum = None  # cumulative averages: resolved again
        assert_close(*_sgd_steps((fused_forward, plain_forward), optimizers, torch.randn(2, 4, 8, 8)))
        _assert_trained_alike(fused_params, plain_params, (bn, last_bn), plain[1:], step + 1)
    assert lookups.count("conv_bn_relu") == 2 and lookups.count("bn_add_relu") == 1
    for m in (conv, bn, last_bn, *plain):
        m.eval()
    with torch.no_grad():
        x = torch.randn(2, 4, 8, 8)
        assert_close(fused_forward(x), plain_forward(x))


def test_bn_relu_conv_module_memo_in_both_modes(lookups, monkeypatch):
    """The pre-activation unit's memo on its modules: training steps and eval calls match the plain modules, and
    a repeated call skips the op layer's lookup."""
    seen = []
    module = sys.modules["pyfast.ops.bn_relu_conv"]
    original = module.select
    monkeypatch.setattr(module, "select", lambda *args, **kwargs: seen.append(args[0]) or original(*args, **kwargs))
    torch.manual_seed(0)
    bn, conv = _bn(4).train(), nn.Conv2d(4, 6, 3, padding=1)
    plain_bn, plain_conv = copy.deepcopy(bn), copy.deepcopy(conv)
    for training in (True, True, True, False, False):
        for m in (bn, conv, plain_bn, plain_conv):
            m.train(training)
        x = torch.randn(2, 4, 8, 8, requires_grad=training)
        plain_x = x.detach().clone().requires_grad_(training)
        with torch.set_grad_enabled(training):
            out, expected = functional.bn_relu_conv(x, bn, conv, backend="cpu"), plain_conv(F.relu(plain_bn(plain_x)))
        if training:
            assert_sum_backward_close(out, expected, [(x, plain_x), (conv.weight, plain_conv.weight),
                                                      (bn.weight, plain_bn.weight)])
        assert_close(out, expected)
        assert_close(bn.running_mean, plain_bn.running_mean)
    assert seen.count("bn_relu_conv") == 2  # one training resolve, one eval resolve


def test_bn_relu_module_memo(lookups):
    torch.manual_seed(0)
    bn = _bn(6).train()
    plain = copy.deepcopy(bn)
    for training in (True, True, False, False):
        bn.train(training), plain.train(training)
        x = torch.randn(2, 6, 5, 5)
        with torch.set_grad_enabled(training):  # an eval call that records a graph takes the general path
            assert_close(functional.bn_relu(x, bn, backend="cpu"), F.relu(plain(x)))
        assert_close(bn.running_var, plain.running_var)
    assert lookups.count("bn_add_relu") == 2  # once per mode


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_conv_bn_add_relu_module_memo_trains_like_the_plain_modules(lookups, backend):
    """conv_bn_add_relu over modules, training with an optimizer and then in eval, against the plain modules: it
    resolves once per mode (the memo binds the modules' tensors, which the optimizer and the running-statistics
    updates keep), and a broadcasting shortcut takes eager PyTorch's path."""
    if backend == "triton":
        pytest.importorskip("triton")
        if ops.BACKENDS["triton"].why_not("bn_add_relu", torch.device("cpu"), torch.float32):
            pytest.skip("the Triton backend does not run on CPU tensors here (no interpreter)")
    torch.manual_seed(0)
    conv, bn, s_conv, s_bn = nn.Conv2d(4, 6, 3, padding=1, bias=False), _bn(6).train(), nn.Conv2d(4, 6, 1), _bn(6)
    s_bn.train()
    plain = copy.deepcopy((conv, bn, s_conv, s_bn))
    fused_params = [p for m in (conv, bn, s_conv, s_bn) for p in m.parameters()]
    plain_params = [p for m in plain for p in m.parameters()]
    optimizers = [torch.optim.SGD(params, lr=0.1) for params in (fused_params, plain_params)]

    def fused_forward(x):
        return functional.conv_bn_add_relu(x, conv, bn, s_conv(x), s_bn, backend=backend)

    def plain_forward(x):
        p_conv, p_bn, p_s_conv, p_s_bn = plain
        return F.relu(p_bn(p_conv(x)) + p_s_bn(p_s_conv(x)))

    for step in range(3):
        assert_close(*_sgd_steps((fused_forward, plain_forward), optimizers, torch.randn(2, 4, 6, 6)))
        _assert_trained_alike(fused_params, plain_params, (bn, s_bn), plain[1::2], step + 1)
    assert lookups.count("conv_bn_add_relu") == 1
    for m in (conv, bn, s_conv, s_bn, *plain):
        m.eval()
    with torch.no_grad():
        for _ in range(2):
            x = torch.randn(2, 4, 6, 6)
            assert_close(fused_forward(x), plain_forward(x))
        assert lookups.count("conv_bn_add_relu") == 2
        y = torch.randn(2, 4, 6, 6)
        bias = torch.randn(1, 6, 1, 1)  # broadcast: eager's result
        expected = F.relu(plain[1](plain[0](y)) + bias)
        assert_close(functional.conv_bn_add_relu(y, conv, bn, bias, backend=backend), expected)
