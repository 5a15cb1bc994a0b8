"""pyfast.nn modules against the plain PyTorch sequences they replace."""
import pytest
import torch
import torch.nn.functional as F
from nn_checks import double_copy, train_and_compare
from tolerances import assert_close
from torch import nn

import pyfast
from pyfast.nn import AddReLU, BNAddReLU, BNReLUConv2d, ConvBNReLU2d, LazyBNAddReLU, LazyBNReLUConv2d, LazyConvBNReLU2d

BN_CONFIGS = {
    "default": {},
    "momentum_none": {"momentum": None},
    "no_affine": {"affine": False},
    "no_running_stats": {"track_running_stats": False},
}
CONV_CONFIGS = {
    "strided": {"kernel_size": 3, "stride": 2, "padding": 1},
    "grouped_dilated_bias": {"kernel_size": 3, "padding": 2, "dilation": 2, "groups": 2, "bias": True},
    "same": {"kernel_size": 3, "padding": "same"},
}


def plain_conv(cin, cout, conv):
    conv = dict(conv)
    return nn.Conv2d(cin, cout, conv.pop("kernel_size"), bias=conv.pop("bias", False), **conv)


def plain_conv_bn_relu(cin, cout, conv, bn, relu):
    return nn.Sequential(plain_conv(cin, cout, conv), nn.BatchNorm2d(cout, **bn), *([nn.ReLU()] if relu else []))


def plain_bn_relu_conv(cin, cout, conv, bn, relu):
    return nn.Sequential(nn.BatchNorm2d(cin, **bn), *([nn.ReLU()] if relu else []), plain_conv(cin, cout, conv))


def load_into_double(plain, fused):
    """The plain model in float64 with the fused module's weights (load_state_dict across modules)."""
    plain = plain.double()
    plain.load_state_dict(fused.state_dict())
    return plain


# each fused sequence module and the plain sequence it replaces
SEQUENCES = {"conv_bn_relu": (ConvBNReLU2d, plain_conv_bn_relu), "bn_relu_conv": (BNReLUConv2d, plain_bn_relu_conv)}


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("conv", CONV_CONFIGS)
@pytest.mark.parametrize("bn", BN_CONFIGS)
@pytest.mark.parametrize("sequence", SEQUENCES)
def test_sequence_trains_like_the_plain_sequence(sequence, bn, conv, relu):
    fused_cls, make_plain = SEQUENCES[sequence]
    fused = fused_cls(4, 6, **CONV_CONFIGS[conv], **BN_CONFIGS[bn], relu=relu)
    plain = load_into_double(make_plain(4, 6, CONV_CONFIGS[conv], BN_CONFIGS[bn], relu), fused)
    train_and_compare(fused, plain, lambda: torch.randn(3, 4, 7, 7))


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("shortcut", ["identity", "bn"])
@pytest.mark.parametrize("bn", BN_CONFIGS)
def test_bn_add_relu_trains_like_the_plain_modules(bn, shortcut, relu):
    fused = nn.ModuleDict({"bn": BNAddReLU(5, **BN_CONFIGS[bn], relu=relu)})
    plain = nn.ModuleDict({"bn": nn.BatchNorm2d(5, **BN_CONFIGS[bn])})
    if shortcut == "bn":
        fused["shortcut_bn"] = nn.BatchNorm2d(5, momentum=0.3)
        plain["shortcut_bn"] = nn.BatchNorm2d(5, momentum=0.3)
    plain = load_into_double(plain, fused)
    act = F.relu if relu else (lambda t: t)

    def call_fused(y, s):
        return fused["bn"](y, s, fused["shortcut_bn"] if shortcut == "bn" else None)

    def call_plain(y, s):
        return act(plain["bn"](y) + (plain["shortcut_bn"](s) if shortcut == "bn" else s))

    train_and_compare(fused, plain, lambda: (torch.randn(2, 5, 4, 3), torch.randn(2, 5, 4, 3)), call_fused, call_plain)


def test_add_relu_is_relu_of_the_sum_and_broadcasts_like_eager():
    a, b = torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 3, 4, 4, requires_grad=True)
    out = AddReLU()(a, b)
    assert_close(out, F.relu(a.double() + b.double()), torch.float32)
    out.sum().backward()
    assert_close(a.grad, (a + b > 0).double(), torch.float32)
    bias = torch.randn(3, 1, 1)  # not a fused case: eager semantics
    assert torch.equal(AddReLU()(a, bias), F.relu(a + bias))
    assert torch.equal(AddReLU()(a[0, 0], b[0, 0]), F.relu(a[0, 0] + b[0, 0]))


# -- state_dict, sharing, construction ------------------------------------------------------------------

@pytest.mark.parametrize("make_fused, make_plain", [
    (lambda: ConvBNReLU2d(3, 4, 3, padding=1), lambda: plain_conv_bn_relu(3, 4, CONV_CONFIGS["same"], {}, True)),
    (lambda: ConvBNReLU2d(3, 4, 3, padding=1, relu=False),
     lambda: plain_conv_bn_relu(3, 4, CONV_CONFIGS["same"], {}, False)),
    (lambda: BNReLUConv2d(3, 4, 3, padding=1), lambda: plain_bn_relu_conv(3, 4, CONV_CONFIGS["same"], {}, True)),
    (lambda: BNAddReLU(3), lambda: nn.BatchNorm2d(3)),
], ids=["conv_bn_relu", "conv_bn", "bn_relu_conv", "bn_add_relu"])
def test_state_dict_round_trips_both_ways(make_fused, make_plain):
    fused, plain = make_fused(), make_plain()
    assert list(fused.state_dict()) == list(plain.state_dict())
    for t in plain.state_dict().values():  # distinct values, so a swapped key would show
        t.copy_(torch.rand_like(t.float()).to(t.dtype) if t.is_floating_point() else t + 7)
    fused.load_state_dict(plain.state_dict())
    for key, value in fused.state_dict().items():
        assert torch.equal(value, plain.state_dict()[key]), key
    back = make_plain()
    back.load_state_dict(make_fused().state_dict())
    back.load_state_dict(fused.state_dict())
    for key, value in back.state_dict().items():
        assert torch.equal(value, fused.state_dict()[key]), key


def test_from_modules_shares_parameters_and_buffers():
    conv, bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
    fused = ConvBNReLU2d.from_modules(conv, bn)
    assert fused.conv is conv and fused.bn is bn and fused[0].weight is conv.weight
    assert list(fused.state_dict()) == list(nn.Sequential(conv, bn, nn.ReLU()).state_dict())
    fused(torch.randn(2, 3, 5, 5))
    assert bn.num_batches_tracked.item() == 1 and bn.running_mean.abs().sum() > 0
    pre = BNReLUConv2d.from_modules(nn.BatchNorm2d(3), conv, relu=False)
    assert pre.bn.num_features == 3 and pre.conv is conv and not pre.has_relu
    with pytest.raises(ValueError, match="features"):
        ConvBNReLU2d.from_modules(conv, nn.BatchNorm2d(5))
    with pytest.raises(ValueError, match="padding_mode"):
        ConvBNReLU2d.from_modules(nn.Conv2d(3, 4, 3, padding_mode="circular"), bn)
    with pytest.raises(TypeError, match="bn must be"):
        ConvBNReLU2d.from_modules(conv, nn.LayerNorm(4))


def test_backend_override_and_repr():
    module = ConvBNReLU2d(3, 4, 3, padding=1)
    with pyfast.use_backend("auto"):
        assert "backend=auto→" in repr(module)
    with pyfast.use_backend("reference"):
        assert "backend=reference" in repr(module)
    forced = ConvBNReLU2d(3, 4, 3, padding=1, backend="reference")
    assert "backend=reference" in repr(forced)
    forced.load_state_dict(module.state_dict())
    x = torch.randn(2, 3, 5, 5)
    assert_close(forced(x), module.double()(x.double()), torch.float32)
    assert "backend=reference" in repr(BNAddReLU(4, backend="reference"))
    assert "backend=reference" in repr(AddReLU(backend="reference"))
    # the override reaches the op: a backend that cannot take CPU tensors says so
    for cannot in (ConvBNReLU2d(3, 4, 3, backend="cuda"), BNReLUConv2d(3, 4, 3, backend="cuda")):
        with pytest.raises(RuntimeError, match="cuda"):
            cannot(x)
    with pytest.raises(RuntimeError, match="cuda"):
        BNAddReLU(3, backend="cuda")(x, x)
    with pytest.raises(ValueError, match="unknown pyfast backend"):
        ConvBNReLU2d(3, 4, 3, backend="fastest")


@pytest.mark.parametrize("cls", [ConvBNReLU2d, BNReLUConv2d])
def test_bad_convolutions_are_refused_naming_the_argument(cls):
    with pytest.raises(ValueError, match="padding_mode='circular'"):
        cls(3, 4, 3, padding=1, padding_mode="circular")
    with pytest.raises(ValueError, match="padding='same'"):
        cls(3, 4, 2, padding="same")
    cls(3, 4, 2, padding="valid")
    with pytest.raises(ValueError, match="padding_mode"):  # functional: a conv made elsewhere
        pyfast.nn.functional.conv_bn_relu(torch.randn(1, 3, 4, 4), nn.Conv2d(3, 4, 3, padding_mode="reflect"),
                                          nn.BatchNorm2d(4))


def test_bad_input_raises_a_clear_error():
    with pytest.raises(ValueError, match="4-D"):
        ConvBNReLU2d(3, 4, 3)(torch.randn(3, 5, 5))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ConvBNReLU2d(3, 4, 3)(torch.randn(1, 3, 3, 3))


# -- lazy variants ---------------------------------------------------------------------------------------

def test_lazy_modules_infer_channels_and_become_regular():
    x = torch.randn(2, 3, 6, 6)
    cases = [(LazyConvBNReLU2d(4, 3, padding=1), ConvBNReLU2d(3, 4, 3, padding=1), ConvBNReLU2d),
             (LazyBNReLUConv2d(4, 3, padding=1), BNReLUConv2d(3, 4, 3, padding=1), BNReLUConv2d)]
    for lazy, eager, cls in cases:
        lazy(x)
        assert type(lazy) is cls and not any(isinstance(p, nn.UninitializedParameter) for p in lazy.parameters())
        assert list(lazy.state_dict()) == list(eager.state_dict())
        assert all(v.shape == eager.state_dict()[k].shape for k, v in lazy.state_dict().items())
        assert lazy.bn.num_batches_tracked.item() == 1  # the initialization itself counts no batch
        plain = load_into_double(nn.Sequential(*eager), lazy)
        train_and_compare(lazy, plain, lambda: torch.randn(2, 3, 6, 6), steps=1)
    lazy_bn = LazyBNAddReLU()
    lazy_bn(x, x)
    assert type(lazy_bn) is BNAddReLU and lazy_bn.num_features == 3 and lazy_bn.num_batches_tracked.item() == 1


def test_lazy_module_loads_a_checkpoint_before_its_first_call():
    eager = ConvBNReLU2d(3, 4, 3, padding=1)
    eager(torch.randn(2, 3, 5, 5))
    lazy = LazyConvBNReLU2d(4, 3, padding=1)
    lazy.load_state_dict(eager.state_dict())
    eager.eval()
    lazy.eval()
    x = torch.randn(2, 3, 5, 5)
    assert torch.allclose(lazy(x), eager(x)) and type(lazy) is ConvBNReLU2d


# -- autocast and channels_last -------------------------------------------------------------------------

MODULE_CASES = {
    "conv_bn_relu": (lambda: ConvBNReLU2d(4, 6, 3, padding=1), lambda m: m,
                     lambda: plain_conv_bn_relu(4, 6, CONV_CONFIGS["same"], {}, True), 1),
    "bn_relu_conv": (lambda: BNReLUConv2d(4, 6, 3, padding=1), lambda m: m,
                     lambda: plain_bn_relu_conv(4, 6, CONV_CONFIGS["same"], {}, True), 1),
    "bn_add_relu": (lambda: BNAddReLU(4), lambda m: m, lambda: nn.BatchNorm2d(4), 2),
}


def _calls(case, fused, plain):
    if case == "bn_add_relu":
        return (lambda y, s: fused(y, s)), (lambda y, s: F.relu(plain(y) + s))
    return fused, plain


@pytest.mark.parametrize("case", MODULE_CASES)
def test_channels_last(case):
    make_fused, _, make_plain, n_inputs = MODULE_CASES[case]
    fused = make_fused().to(memory_format=torch.channels_last)
    plain = load_into_double(make_plain(), fused)
    call_fused, call_plain = _calls(case, fused, plain)
    inputs = [torch.randn(2, 4, 5, 6).to(memory_format=torch.channels_last) for _ in range(n_inputs)]
    out = call_fused(*inputs)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, call_plain(*[x.double() for x in inputs]), torch.float32)
    train_and_compare(fused, plain, lambda: [x.to(memory_format=torch.channels_last) for x in
                                             torch.randn(n_inputs, 2, 4, 5, 6)], call_fused, call_plain, steps=1)


@pytest.mark.parametrize("case", MODULE_CASES)
def test_autocast_bfloat16(case):
    make_fused, _, make_plain, n_inputs = MODULE_CASES[case]
    fused = make_fused()
    eager = make_plain()
    eager.load_state_dict(fused.state_dict())
    reference = double_copy(eager)
    call_fused, call_eager = _calls(case, fused, eager)
    _, call_reference = _calls(case, fused, reference)
    inputs = [torch.randn(4, 4, 6, 6, requires_grad=True) for _ in range(n_inputs)]
    outs = {}
    for name, call in (("fused", call_fused), ("eager", call_eager)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs[name] = call(*inputs)
        outs[name].float().square().sum().backward()
        outs[name + "_grad"] = [x.grad.clone() for x in inputs]
        for x in inputs:
            x.grad = None
    ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
    ref = call_reference(*ref_inputs)
    ref.square().sum().backward()
    assert outs["fused"].dtype == outs["eager"].dtype
    assert_close(outs["fused"], ref, torch.bfloat16, eager=outs["eager"])
    for got, eager_grad, x in zip(outs["fused_grad"], outs["eager_grad"], ref_inputs):
        assert_close(got, x.grad, torch.bfloat16, eager=eager_grad, kind="backward", what="input grad")


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = ConvBNReLU2d(4, 4, 3, padding=1)
        self.b = BNReLUConv2d(4, 4, 3, padding=1)
        self.c = BNAddReLU(4, momentum=None)
        self.d = AddReLU()

    def forward(self, x):
        y = self.a(x)
        return self.d(self.c(self.b(y), y), x)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside torch.compile
def test_modules_compile_fullgraph():
    """Dynamo (fullgraph) + AOTAutograd through the modules, against the same modules run eagerly in
    float64 (which the tests above hold to plain PyTorch); inductor is exercised in test_fuse."""
    block = _Block()
    eager = double_copy(block)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 4, 5, 5)
    out, expected = compiled(x), eager(x.double())
    assert_close(out, expected, torch.float32)
    out.sum().backward()
    expected.sum().backward()
    for (name, p), q in zip(block.named_parameters(), eager.parameters()):
        assert_close(p.grad, q.grad, torch.float32, kind="backward", what=name)
    assert block.c.num_batches_tracked.item() == 1
    assert_close(block.c.running_var, eager.c.running_var, torch.float32)


@pytest.mark.parametrize("case", MODULE_CASES)
def test_bfloat16_module_in_eval(case):
    """A module converted with .bfloat16() keeps its running statistics in bfloat16 too: the eval path (BN
    folded or its affine map from those statistics) matches eager bfloat16 under the low-precision rule."""
    make_fused, _, make_plain, n_inputs = MODULE_CASES[case]
    fused = make_fused()
    with torch.no_grad():  # statistics that are not the defaults, so the eval affine map matters
        for bn in (m for m in fused.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    eager = make_plain()
    eager.load_state_dict(fused.state_dict())
    reference = double_copy(eager).eval()
    fused, eager = fused.bfloat16().eval(), eager.bfloat16().eval()
    call_fused, call_eager = _calls(case, fused, eager)
    _, call_reference = _calls(case, fused, reference)
    inputs = [torch.randn(2, 4, 5, 6) for _ in range(n_inputs)]
    with torch.no_grad():
        out = call_fused(*[x.bfloat16() for x in inputs])
        expected = call_reference(*[x.double() for x in inputs])
        eager_out = call_eager(*[x.bfloat16() for x in inputs])
    assert out.dtype == torch.bfloat16
    assert_close(out, expected, torch.bfloat16, eager=eager_out)
