"""pyfast.fuse on plain-PyTorch models: same results, same state_dict, a report of every fusion."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from nn_checks import double_copy, train_and_compare
from nn_models import RegNet, expected_regnet_fusions, expected_resnet_fusions, resnet18_style, resnet50_style, settled
from tolerances import assert_close
from torch import nn

import pyfast
from pyfast.nn import FusedGraphModule, FusedSequential, fuse

MODELS = {
    "resnet18_style": (resnet18_style, expected_resnet_fusions),
    "resnet50_style": (resnet50_style, expected_resnet_fusions),
    "regnet_style": (RegNet, expected_regnet_fusions),
}


def kinds_and_names(report):
    return [(f.kind, f.modules) for f in report.fusions]


def assert_same_state(fused, model):
    before, after = model.state_dict(keep_vars=True), fused.state_dict(keep_vars=True)
    assert list(before) == list(after)
    assert all(before[k] is after[k] for k in before)


@pytest.mark.parametrize("name", MODELS)
def test_fused_model_trains_like_the_original(name):
    make, expected = MODELS[name]
    model = settled(make())
    plain, eager = double_copy(model), copy.deepcopy(model)
    fused, report = fuse(model, inplace=True)
    assert isinstance(fused, FusedGraphModule)
    assert_same_state(fused, model)
    assert sorted(kinds_and_names(report)) == sorted(expected(model)), str(report)
    assert report.left_alone == [] and report.not_traced == {}
    assert [n for n, _ in fused.named_modules()] == [n for n, _ in model.named_modules()]
    train_and_compare(fused, plain, lambda: torch.randn(4, 3, 64, 64), steps=2, eager=eager,
                      eval_step=False)


def test_fused_model_moves_converts_and_loads_like_the_original():
    model = resnet18_style(layers=(1, 1, 1, 1))
    fused, _ = fuse(model)
    assert fused is not model and fused.layer1[0].conv1 is not model.layer1[0].conv1  # inplace=False copies
    fused.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    fused_64 = fused.to(torch.float64)
    assert fused_64.conv1.weight.dtype == torch.float64
    assert_close(fused_64(x.double()), double_copy(model)(x.double()), torch.float64)
    fused_64.eval()
    assert not fused_64.layer1[0].bn1.training and fused_64.inplanes == model.inplanes
    plain = double_copy(model).eval()
    plain.load_state_dict(fused_64.state_dict())  # the running statistics the train-mode call updated
    assert_close(fused_64(x.double()), plain(x.double()), torch.float64)


def test_deepcopy_copy_and_pickle_keep_the_hierarchy():
    model = RegNet(depths=(1, 1), widths=(4, 8))
    fused, _ = fuse(model)
    x = torch.randn(2, 3, 16, 16)
    fused.eval()
    expected = fused(x)
    for clone in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused)), copy.copy(fused)):
        assert isinstance(clone, FusedGraphModule)
        assert list(clone.state_dict()) == list(model.state_dict())
        assert [n for n, _ in clone.named_modules()] == [n for n, _ in model.named_modules()]
        assert torch.equal(clone(x), expected)
    assert copy.copy(fused).stem[0] is fused.stem[0] and copy.deepcopy(fused).stem[0] is not fused.stem[0]
    retraced = torch.fx.symbolic_trace(fused)  # fx tooling (feature extraction, ...) still works on it
    assert sum(node.target is pyfast.nn.functional.conv_bn_relu for node in retraced.graph.nodes) == 5
    assert torch.equal(retraced(x), expected)


class SpelledBlock(nn.Module):
    """The patterns written with functions, methods and in-place ops."""

    def __init__(self, c=4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=True), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)
        self.bn3, self.conv3 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding="same")
        self.bn4 = nn.BatchNorm2d(c)
        self.conv5, self.bn5 = nn.Conv2d(c, c, 1), nn.BatchNorm2d(c, momentum=None)

    def forward(self, x):
        a = F.relu(self.bn1(self.conv1(x)), inplace=True)     # conv_bn_relu (F.relu, in place)
        b = torch.relu(torch.add(self.bn2(self.conv2(a)), x))  # conv_bn_add_relu (torch.add, torch.relu)
        c = self.conv3(self.bn3(b).relu_())                    # bn_relu_conv (Tensor.relu_)
        d = self.bn4(c).add_(b).relu()                         # bn_add_relu (add_, Tensor.relu; conv3 is
                                                               # bn_relu_conv's)
        e = self.bn5(self.conv5(d))                            # conv_bn (no ReLU), its output used twice
        return F.relu(e + d) + e                               # add_relu


def test_every_spelling_is_fused_and_exact():
    model = SpelledBlock()
    plain, eager = double_copy(model), copy.deepcopy(model)
    fused, report = fuse(model)
    assert kinds_and_names(report) == [
        ("conv_bn_relu", ("conv1", "bn1", "F.relu")),
        ("conv_bn_add_relu", ("conv2", "bn2", "torch.add", "torch.relu")),
        ("bn_relu_conv", ("bn3", ".relu_()", "conv3")),
        ("bn_add_relu", ("bn4", ".add_()", ".relu()")),
        ("conv_bn", ("conv5", "bn5")),
        ("add_relu", ("+", "F.relu")),
    ], str(report)
    train_and_compare(fused, plain, lambda: torch.randn(2, 4, 6, 6), steps=2, eager=eager)


class NearMisses(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.circular = nn.Conv2d(c, c, 3, padding=1, padding_mode="circular", bias=False)
        self.bn_circular = nn.BatchNorm2d(c)
        self.shared = nn.Conv2d(c, c, 1, bias=False)
        self.bn_shared = nn.BatchNorm2d(c)
        self.even = nn.Conv2d(c, c, 2, padding="same", bias=False)
        self.bn_even = nn.BatchNorm2d(c)
        self.hooked = nn.Conv2d(c, c, 1)
        self.bn_hooked = nn.BatchNorm2d(c)
        self.hooked.register_forward_hook(lambda module, args, out: out * 2)

    def forward(self, x):
        a = torch.relu(self.bn_circular(self.circular(x))) + x
        y = self.shared(a)
        b = torch.relu(self.bn_shared(y)) + y  # the conv output is read twice
        c = torch.relu(self.bn_even(self.even(b)))
        d = torch.relu(self.bn_hooked(self.hooked(c))) * 2
        d += x  # fx records `+=` as `+` ... then
        return torch.relu(d.add_(x))  # ... in place into a tensor that is not a fresh BN output


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_near_misses_are_left_alone_and_reported():
    model = NearMisses()
    plain, eager = double_copy(model), copy.deepcopy(model)
    fused, report = fuse(model)
    left = {entry.modules[0]: entry for entry in report.left_alone}
    assert report.fusions == []
    assert "padding_mode='circular'" in left["circular"].reason
    assert "also used by" in left["shared"].reason
    assert "padding='same'" in left["even"].reason
    assert "hooks" in left["hooked"].reason
    assert left[".add_()"].kind == "add_relu" and "writes into" in left[".add_()"].reason
    assert fused is model  # nothing fused: the model itself
    assert "left alone" in str(report) and "circular" in str(report)
    train_and_compare(model, plain, lambda: torch.randn(2, 4, 5, 5), steps=1, eager=eager)


def test_nothing_to_fuse_returns_the_model_and_an_empty_report():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    fused, report = fuse(model)
    assert fused is model
    assert report.fusions == [] and report.left_alone == [] and report.not_traced == {}
    assert str(report) == "pyfast.fuse: 0 fusions, 0 left alone"


class DataDependent(nn.Module):
    """A forward fx cannot trace (control flow on a tensor), holding Sequential and traceable children."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 1), nn.Flatten())

    def forward(self, x):
        if x.sum() > 0:
            return self.features(x)
        return self.features(-x)


class TracedWithOpaqueChild(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.body = DataDependent()
        self.bn, self.relu = nn.BatchNorm2d(64), nn.ReLU()

    def forward(self, x):
        return self.body(self.stem(x)[:, :3]).view(-1, 64, 1, 1).relu() + 1


def test_untraceable_modules_fuse_their_sequential_children():
    model = DataDependent()
    plain, eager = double_copy(model), copy.deepcopy(model)
    fused, report = fuse(model)
    assert fused is not model and type(fused) is DataDependent
    assert isinstance(fused.features, FusedSequential)
    assert kinds_and_names(report) == [("conv_bn_relu", ("features.0", "features.1", "features.2")),
                                       ("bn_relu_conv", ("features.3", "features.4", "features.5"))]
    assert "TraceError" in report.not_traced[""] and "not traced" in str(report)
    assert list(fused.state_dict()) == list(model.state_dict())
    assert fused.features[0] is fused.features.get_submodule("0")  # still a Sequential
    train_and_compare(fused, plain, lambda: torch.randn(2, 3, 4, 4), steps=2, eager=eager)

    nested = TracedWithOpaqueChild()
    plain, eager = double_copy(nested), copy.deepcopy(nested)
    fused, report = fuse(nested)
    assert isinstance(fused, FusedGraphModule) and isinstance(fused.body.features, FusedSequential)
    assert list(report.not_traced) == ["body"]
    assert [f.modules[0] for f in report.fusions] == ["stem.0", "body.features.0", "body.features.3"]
    train_and_compare(fused, plain, lambda: torch.randn(2, 3, 4, 4), steps=1, eager=eager)


def test_backend_argument_reaches_every_fused_call():
    model = resnet18_style(layers=(1, 1, 1, 1))
    fused, _ = fuse(model, backend="cuda")  # cannot take CPU tensors: the call says so
    with pytest.raises(RuntimeError, match="cuda"):
        fused(torch.randn(2, 3, 32, 32))
    fused, _ = fuse(model, backend="reference")
    assert "backend = 'reference'" in fused.code
    with pytest.raises(ValueError, match="unknown pyfast backend"):
        fuse(model, backend="nope")


def test_sync_batchnorm_is_fused_and_modules_are_looked_up_at_call_time():
    model = resnet18_style(layers=(1, 1, 1, 1))
    fused, report = fuse(nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)))
    assert len(report.fusions) == len(expected_resnet_fusions(model))
    fused = pyfast.nn.convert_sync_batchnorm(fuse(model)[0])  # after fusing: the graph finds the new BNs
    assert isinstance(fused.layer1[0].bn1, pyfast.nn.SyncBatchNorm2d)
    x = torch.randn(2, 3, 32, 32)
    assert_close(fused.eval()(x), double_copy(model).eval()(x.double()), torch.float32)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside torch.compile
def test_compiled_fused_model_fullgraph():
    """Training through dynamo (fullgraph) + AOTAutograd with the fused ops in the graph; inference through
    inductor. (Inductor's training compile also works but takes ~70 s on these CPUs.)"""
    model = RegNet(depths=(1, 1), widths=(4, 8))
    plain = double_copy(model)
    fused, _ = fuse(model)
    x = torch.randn(2, 3, 16, 16)
    out = torch.compile(fused, fullgraph=True, backend="aot_eager")(x)
    expected = plain(x.double())
    assert_close(out, expected, torch.float32)
    out.square().sum().backward()
    expected.square().sum().backward()
    for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
        assert_close(p.grad, q.grad, torch.float32, kind="backward", what=name)
    for key, value in fused.state_dict().items():  # running statistics, num_batches_tracked
        reference = plain.state_dict()[key]
        assert torch.equal(value, reference) if not value.is_floating_point() else torch.allclose(
            value.double(), reference, rtol=1e-4, atol=1e-6), key
    fused.eval()
    plain.eval()
    with torch.no_grad():
        assert_close(torch.compile(fused, fullgraph=True)(x), plain(x.double()), torch.float32)


def test_hooked_blocks_keep_their_hooks_and_fusing_twice_changes_nothing():
    model = resnet18_style(layers=(1, 1, 1, 1))
    seen = []
    model.layer2[0].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    fused, report = fuse(model)
    assert "hooks" in report.not_traced["layer2.0"]
    inside = [(f.kind, f.modules) for f in report.fusions if f.modules[0].startswith("layer2.0.")]
    assert inside == [("conv_bn", ("layer2.0.downsample.0", "layer2.0.downsample.1"))]  # its one Sequential
    assert len(report.fusions) == len(expected_resnet_fusions(model)) - 2 + 1
    fused(torch.randn(2, 3, 32, 32))
    assert seen == [torch.Size([2, 8, 4, 4])]
    again, second = fuse(fused)
    assert again is fused and second.fusions == [] and second.left_alone == []


def test_fused_model_under_autocast_and_channels_last():
    model = settled(RegNet(depths=(1, 1), widths=(4, 8))).to(memory_format=torch.channels_last)
    for _ in range(2):  # settle the running statistics, then compare in both modes
        model(torch.randn(4, 3, 16, 16))
    reference = double_copy(model)
    fused, _ = fuse(model)
    x = torch.randn(4, 3, 16, 16).to(memory_format=torch.channels_last)
    for mode in ("eval", "train"):
        for m in (model, reference, fused):
            m.train(mode == "train")
        expected = reference(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            eager, out = model(x), fused(x)
        assert out.dtype == eager.dtype
        assert_close(out, expected, torch.bfloat16, eager=eager, what=f"{mode} output")
        assert_close(fused(x), expected, torch.float32, what=f"{mode} float32 channels_last output")
