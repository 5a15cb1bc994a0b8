"""torchvision checkpoints load into the pyfast models of the same architecture, and compute the same.

Without torchvision, the key lists are checked against torchvision's naming written out here (an
excerpt copied from `torchvision.models.resnet50().state_dict()` and `regnet_x_400mf()`, and the
rules that generate the rest); with torchvision importable, against torchvision's models themselves."""
import pytest
import torch

from pyfast.models import REGNETX_CFGS, create

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

# Verbatim torchvision keys.
RESNET50_EXCERPT = [
    "conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked",
    "layer1.0.conv1.weight", "layer1.0.bn1.weight", "layer1.0.conv2.weight", "layer1.0.conv3.weight",
    "layer1.0.bn3.num_batches_tracked", "layer1.0.downsample.0.weight", "layer1.0.downsample.1.weight",
    "layer1.0.downsample.1.running_var", "layer2.0.downsample.0.weight", "layer2.3.conv2.weight",
    "layer3.5.bn2.bias", "layer4.0.downsample.1.running_mean", "layer4.2.conv3.weight", "layer4.2.bn3.bias",
    "fc.weight", "fc.bias",
]
REGNET_X_400MF_EXCERPT = [
    "stem.0.weight", "stem.1.weight", "stem.1.running_var", "trunk_output.block1.block1-0.proj.0.weight",
    "trunk_output.block1.block1-0.proj.1.num_batches_tracked", "trunk_output.block1.block1-0.f.a.0.weight",
    "trunk_output.block1.block1-0.f.a.1.bias", "trunk_output.block1.block1-0.f.b.0.weight",
    "trunk_output.block1.block1-0.f.c.0.weight", "trunk_output.block1.block1-0.f.c.1.running_mean",
    "trunk_output.block2.block2-1.f.b.0.weight", "trunk_output.block4.block4-11.f.c.1.bias", "fc.weight", "fc.bias",
]


def _bn(prefix):
    return [f"{prefix}.{k}" for k in BN]


def torchvision_resnet_keys(layers, bottleneck):
    keys = ["conv1.weight", *_bn("bn1")]
    for i, depth in enumerate(layers, 1):
        for j in range(depth):
            p = f"layer{i}.{j}"
            for k in ((1, 2, 3) if bottleneck else (1, 2)):
                keys += [f"{p}.conv{k}.weight", *_bn(f"{p}.bn{k}")]
            if j == 0 and (bottleneck or i > 1):
                keys += [f"{p}.downsample.0.weight", *_bn(f"{p}.downsample.1")]
    return keys + ["fc.weight", "fc.bias"]


def torchvision_regnet_keys(depths):
    keys = ["stem.0.weight", *_bn("stem.1")]
    for i, depth in enumerate(depths, 1):
        for j in range(depth):
            p = f"trunk_output.block{i}.block{i}-{j}"
            if j == 0:
                keys += [f"{p}.proj.0.weight", *_bn(f"{p}.proj.1")]
            for k in "abc":
                keys += [f"{p}.f.{k}.0.weight", *_bn(f"{p}.f.{k}.1")]
    return keys + ["fc.weight", "fc.bias"]


def meta(name, **kwargs):
    with torch.device("meta"):
        return create(name, **kwargs)


@pytest.mark.parametrize("name, layers, bottleneck", [
    ("resnet18", (2, 2, 2, 2), False), ("resnet34", (3, 4, 6, 3), False), ("resnet50", (3, 4, 6, 3), True),
    ("resnet101", (3, 4, 23, 3), True), ("resnet152", (3, 8, 36, 3), True), ("resnext50_32x4d", (3, 4, 6, 3), True),
    ("resnext101_32x8d", (3, 4, 23, 3), True),
])
def test_resnet_keys_are_torchvisions(name, layers, bottleneck):
    keys = list(meta(name).state_dict())
    assert keys == torchvision_resnet_keys(layers, bottleneck)
    if name == "resnet50":
        assert len(keys) == 320 and set(RESNET50_EXCERPT) <= set(keys)


@pytest.mark.parametrize("name", sorted(REGNETX_CFGS))
def test_regnet_keys_are_torchvisions(name):
    keys = list(meta(name).state_dict())
    assert keys == torchvision_regnet_keys(REGNETX_CFGS[name].anynet().depths)
    if name == "regnetx_400mf":
        assert set(REGNET_X_400MF_EXCERPT) <= set(keys)


@pytest.mark.parametrize("fused", [False, True])
def test_torchvision_layout_checkpoint_loads(fused):
    """A state_dict keyed as torchvision's ResNet-50 loads with nothing missing and nothing unexpected."""
    model = create("resnet50", fused=fused)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    checkpoint = {k: (torch.randn(shapes[k]) if k.rsplit(".", 1)[-1] != "num_batches_tracked"
                      else torch.tensor(7)) for k in torchvision_resnet_keys((3, 4, 6, 3), True)}
    checkpoint = {k: v.abs() if k.endswith("running_var") else v for k, v in checkpoint.items()}
    result = model.load_state_dict(checkpoint, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(model.layer3[5].bn2.running_mean, checkpoint["layer3.5.bn2.running_mean"])


# -- against torchvision itself (where it is installed, e.g. the GPU machines) --------------------------

TORCHVISION_NAMES = {
    "resnet18": "resnet18", "resnet34": "resnet34", "resnet50": "resnet50", "resnet101": "resnet101",
    "resnet152": "resnet152", "resnext50_32x4d": "resnext50_32x4d", "resnext101_32x8d": "resnext101_32x8d",
    "regnetx_400mf": "regnet_x_400mf", "regnetx_800mf": "regnet_x_800mf", "regnetx_1_6gf": "regnet_x_1_6gf",
    "regnetx_3_2gf": "regnet_x_3_2gf", "regnetx_8gf": "regnet_x_8gf", "regnetx_16gf": "regnet_x_16gf",
    "regnetx_32gf": "regnet_x_32gf",
}


@pytest.mark.parametrize("name", sorted(TORCHVISION_NAMES))
def test_same_state_dict_as_torchvision(name):
    tv = pytest.importorskip("torchvision")
    if name.startswith(("resnet", "resnext")):
        with torch.device("meta"):
            theirs = getattr(tv.models, TORCHVISION_NAMES[name])()
    else:  # torchvision's RegNet generator needs real tensors
        theirs = getattr(tv.models, TORCHVISION_NAMES[name])()
    ours = meta(name)
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == \
        [(k, v.shape) for k, v in theirs.state_dict().items()]


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d", "regnetx_400mf"])
@pytest.mark.parametrize("fused", [False, True])
def test_torchvision_weights_compute_the_same(name, fused):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    theirs = getattr(tv.models, TORCHVISION_NAMES[name])(num_classes=10).double()
    ours = create(name, num_classes=10, fused=fused).double()
    result = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)  # float64: see test_model_fused.py
    for mode in ("train", "eval"):
        getattr(theirs, mode)(), getattr(ours, mode)()
        expected, actual = theirs(x), ours(x)
        err = ((actual - expected).norm() / expected.norm()).item()
        assert err <= 1e-8, f"{mode}: relative error {err:.2e}"
    for key, value in theirs.state_dict().items():  # running statistics updated alike
        assert torch.allclose(ours.state_dict()[key], value, rtol=1e-8, atol=1e-12), key
