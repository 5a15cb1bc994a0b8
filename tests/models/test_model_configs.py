"""The configurations build the published architectures: parameter counts, the RegNetX generator's
widths and depths, the exercises' AnyNet designs. Models are built on the meta device (no memory)."""
import numpy as np
import pytest
import torch
from torch import nn

from pyfast.models import REGNETX_CFGS, AnyNetCfg, RegNetCfg, VioNet, create
from pyfast.models.regnet import make_divisible, regnet_stages


def meta(name, **kwargs):
    with torch.device("meta"):
        return create(name, **kwargs)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# torchvision's published num_params (1000 classes); regnetx_200mf from pycls (2.7M), see below
PUBLISHED_PARAMS = {
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032, "resnet101": 44_549_160,
    "resnet152": 60_192_808, "resnext50_32x4d": 25_028_904, "resnext101_32x8d": 88_791_336,
    "regnetx_400mf": 5_495_976, "regnetx_800mf": 7_259_656, "regnetx_1_6gf": 9_190_136,
    "regnetx_3_2gf": 15_296_552, "regnetx_8gf": 39_572_648, "regnetx_16gf": 54_278_536,
    "regnetx_32gf": 107_811_560, "regnetx_200mf": 2_684_792,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_published_parameter_counts(name):
    assert n_params(meta(name)) == PUBLISHED_PARAMS[name]


# (widths, depths, group widths) of every preset: torchvision's BlockParams rule. The seven that
# torchvision ships match its published parameter counts above.
REGNETX_GOLDEN = {
    "regnetx_200mf": ((24, 56, 152, 368), (1, 1, 4, 7), (8, 8, 8, 8)),
    "regnetx_400mf": ((32, 64, 160, 400), (1, 2, 7, 12), (16, 16, 16, 16)),
    "regnetx_600mf": ((48, 96, 240, 528), (1, 3, 5, 7), (24, 24, 24, 24)),
    "regnetx_800mf": ((64, 128, 288, 672), (1, 3, 7, 5), (16, 16, 16, 16)),
    "regnetx_1_6gf": ((72, 168, 408, 912), (2, 4, 10, 2), (24, 24, 24, 24)),
    "regnetx_3_2gf": ((96, 192, 432, 1008), (2, 6, 15, 2), (48, 48, 48, 48)),
    "regnetx_4_0gf": ((120, 240, 560, 1360), (2, 5, 14, 2), (40, 40, 40, 40)),
    "regnetx_6_4gf": ((168, 392, 784, 1624), (2, 4, 10, 1), (56, 56, 56, 56)),
    "regnetx_8gf": ((80, 240, 720, 1920), (2, 5, 15, 1), (80, 120, 120, 120)),
    "regnetx_12gf": ((224, 448, 896, 2240), (2, 5, 11, 1), (112, 112, 112, 112)),
    "regnetx_16gf": ((256, 512, 896, 2048), (2, 6, 13, 1), (128, 128, 128, 128)),
    "regnetx_32gf": ((336, 672, 1344, 2520), (2, 7, 13, 1), (168, 168, 168, 168)),
}


def test_every_preset_is_pinned():
    assert set(REGNETX_GOLDEN) == set(REGNETX_CFGS)


@pytest.mark.parametrize("name", sorted(REGNETX_GOLDEN))
def test_regnetx_golden_widths_and_depths(name):
    widths, depths, group_widths = REGNETX_GOLDEN[name]
    cfg = REGNETX_CFGS[name].anynet()
    assert (cfg.widths, cfg.depths, cfg.group_widths) == (widths, depths, group_widths)
    model = meta(name)
    for i, (w, d, g) in enumerate(zip(widths, depths, group_widths), 1):
        stage = getattr(model.trunk_output, f"block{i}")
        assert len(stage) == d
        first = stage[0]
        assert first.f.c.conv.out_channels == w and first.f.b.conv.stride == (2, 2)
        assert first.f.b.conv.groups == w // g  # bottleneck multiplier 1: w_b = w
        assert first.proj is not None and all(b.proj is None for b in list(stage)[1:])
    assert model.stem.conv.out_channels == 32 and model.fc.in_features == widths[-1]


# -- an independent computation: pycls's rule, in numpy float64 ------------------------------------

def pycls_regnet(depth, w0, wa, wm, group_width):
    """pycls's generate_regnet + adjust_block_compatibility (bottleneck multiplier 1): the width rule
    is the same, the group adjustment rounds half to even and never bumps up by 10%."""
    ws_cont = np.arange(depth) * wa + w0
    ks = np.round(np.log(ws_cont / w0) / np.log(wm))
    ws_all = (np.round(w0 * np.power(wm, ks) / 8) * 8).astype(int)
    ws, ds = np.unique(ws_all, return_counts=True)
    gs = [min(group_width, int(w)) for w in ws]
    ws = [max(g, int(round(w / g) * g)) for w, g in zip(ws, gs)]
    return ws, ds.tolist(), gs


def regnetx_params(widths, depths, group_widths, stem=32, in_chans=3, num_classes=1000):
    """Parameters of a RegNetX counted by hand: 3x3 stem conv + BN; per block 1x1 (w_in -> w), 3x3 with
    w/g groups (9*w*g), 1x1 (w -> w), three BNs, plus a 1x1 conv + BN projection on each stage's
    first block; the classifier's weight and bias."""
    total, w_in = 9 * in_chans * stem + 2 * stem, stem
    for w, d, g in zip(widths, depths, group_widths):
        for i in range(d):
            cin = w_in if i == 0 else w
            total += cin * w + 9 * w * g + w * w + 3 * 2 * w
            if i == 0:
                total += w_in * w + 2 * w
        w_in = w
    return total + w_in * num_classes + num_classes


def test_regnetx_200mf_matches_pycls():
    """torchvision has no 200MF. pycls's RegNetX-200MF (depth 13, w0 24, wa 36.44, wm 2.49, g 8) is
    published as 2.7M parameters; its rule and torchvision's agree on it (every width is a multiple of
    8 = g already), and a hand count of that architecture gives 2,684,792, which the model has."""
    cfg = REGNETX_CFGS["regnetx_200mf"]
    ws, ds, gs = pycls_regnet(cfg.depth, cfg.w0, cfg.wa, cfg.wm, cfg.group_width)
    assert (tuple(ws), tuple(ds), tuple(gs)) == REGNETX_GOLDEN["regnetx_200mf"]
    assert regnetx_params(ws, ds, gs) == 2_684_792 == n_params(meta("regnetx_200mf"))


@pytest.mark.parametrize("name", sorted(REGNETX_GOLDEN))
def test_hand_count_matches_model(name):
    assert regnetx_params(*REGNETX_GOLDEN[name]) == n_params(meta(name))


def test_where_pycls_rounds_differently():
    """docs/DESIGN.md: torchvision's rule is the reference. pycls differs on two presets: 400MF's last stage
    (392 -> 384 by half-to-even, 400 here) and 4.0GF's first (96 with g 40: pycls 80, here 80 < 0.9*96
    bumps to 120); its published 5.2M and 22.1M parameters are those of its own widths."""
    differ = {}
    for name, cfg in REGNETX_CFGS.items():
        ws, ds, _ = pycls_regnet(cfg.depth, cfg.w0, cfg.wa, cfg.wm, cfg.group_width)
        if tuple(ws) != REGNETX_GOLDEN[name][0]:
            differ[name] = ws
            assert tuple(ds) == REGNETX_GOLDEN[name][1]
    assert differ == {"regnetx_400mf": [32, 64, 160, 384], "regnetx_4_0gf": [80, 240, 560, 1360]}
    assert round(regnetx_params(*pycls_regnet(22, 24, 24.48, 2.54, 16)) / 1e6, 1) == 5.2
    assert round(regnetx_params(*pycls_regnet(23, 96, 38.65, 2.43, 40)) / 1e6, 1) == 22.1


def test_generator_steps():
    assert regnet_stages(22, 24, 24.48, 2.54) == ([24, 64, 152, 392], [1, 2, 7, 12])  # before adjustment
    assert make_divisible(392, 16) == 400 and make_divisible(96, 40) == 120 and make_divisible(100, 8) == 104
    with pytest.raises(ValueError, match="invalid RegNet settings"):
        RegNetCfg(depth=13, w0=20, wa=36.44, wm=2.49, group_width=8).anynet()  # w0 not a multiple of 8


# -- ResNet / ResNeXt / pre-activation -------------------------------------------------------------

def test_resnet50_layout():
    """Table 1 of He et al.: 7x7/2 stem, max-pool, [1x1 64, 3x3 64, 1x1 256] x 3 ... x 3 with the
    stride on the 3x3, projection shortcuts with BN on each stage's first block."""
    model = meta("resnet50")
    assert (model.conv1.kernel_size, model.conv1.stride, model.conv1.padding) == ((7, 7), (2, 2), (3, 3))
    assert isinstance(model.maxpool, nn.MaxPool2d) and model.maxpool.stride == 2
    assert [len(model.stages()[i]) for i in range(4)] == [3, 4, 6, 3]
    block = model.layer2[0]
    assert [c.kernel_size for c in (block.conv1, block.conv2, block.conv3)] == [(1, 1), (3, 3), (1, 1)]
    assert (block.conv1.stride, block.conv2.stride) == ((1, 1), (2, 2))
    assert block.downsample[0].stride == (2, 2) and isinstance(block.downsample[1], nn.BatchNorm2d)
    assert model.layer1[0].downsample is not None and model.layer1[1].downsample is None
    assert model.layer4[2].conv3.out_channels == 2048 and model.fc.in_features == 2048


def test_resnext_groups():
    model = meta("resnext101_32x8d")
    conv = model.layer1[0].conv2
    assert (conv.groups, conv.in_channels) == (32, 256)  # 32 groups of 8
    assert model.layer4[0].conv2.in_channels == 2048


def test_preact_unit_layout():
    """Full pre-activation: BN before every conv, nothing after the addition, a final BN; the first
    unit (fed by the stem's BN-ReLU) has no bn1; projections are plain 1x1 convolutions."""
    model = meta("preact_resnet50")
    first, second, down = model.layer1[0], model.layer1[1], model.layer2[0]
    assert first.bn1 is None and isinstance(second.bn1, nn.BatchNorm2d)
    assert second.bn1.num_features == 256 and second.bn3.num_features == 64
    assert isinstance(down.downsample, nn.Conv2d) and down.downsample.stride == (2, 2)
    assert down.conv2.stride == (2, 2) and model.final_bn.num_features == 2048
    # ResNet-18 minus the three projection BNs and the missing bn1, plus narrower bn1s and the final BN
    expected = 11_689_512 - 2 * (128 + 256 + 512) - 2 * 64 - 2 * (64 + 128 + 256) + 2 * 512
    assert n_params(meta("preact_resnet18")) == expected


def test_preact_has_no_relu_after_addition():
    """With every BN at identity and ReLU-free input, a unit is x + F(x) where F can be negative: the
    output of a unit must keep negative values (a ReLU after the add would clip them)."""
    torch.manual_seed(0)
    model = create("preact_resnet18", widths=(4, 8, 8, 8), stem_width=4, num_classes=3).eval()
    x = torch.randn(1, 4, 8, 8)
    assert (model.layer1[1](x) < 0).any()


# -- the exercises' AnyNets ------------------------------------------------------------------------

def _stages(model):
    return [[b for b in stage] for stage in model.trunk_output]


def test_regnetx_32():
    model = meta("regnetx_32", num_classes=10, in_chans=1)
    assert model.stem.conv.in_channels == 1 and model.stem.conv.out_channels == 32
    assert [len(s) for s in _stages(model)] == [4, 6, 8, 16]
    assert [s[0].f.c.conv.out_channels for s in _stages(model)] == [32, 80, 128, 256]
    assert [s[0].f.b.conv.groups for s in _stages(model)] == [2, 5, 8, 16]  # group width 16
    assert model.fc.out_features == 10


def test_deresnext_uses_basic_blocks():
    model = meta("deresnext")
    assert [len(s) for s in _stages(model)] == [5, 6]
    for stage, w in zip(_stages(model), (32, 80)):
        assert [n for n, _ in stage[0].f.named_children()] == ["a", "b"] and stage[0].proj is not None
        assert [m.conv.kernel_size for m in stage[0].f] == [(3, 3), (3, 3)]
        assert stage[0].f.a.conv.stride == (2, 2) and stage[0].f.b.conv.out_channels == w


@pytest.mark.parametrize("name, depths, widths, groups, bottlenecks", [
    ("vionet", (4, 6), (32, 80), (2, 5), (32, 80)),
    ("vionet_d", (6, 4), (32, 80), (2, 5), (32, 80)),
    ("vionet_c", (4, 6), (80, 32), (5, 2), (80, 32)),
    ("vionet_g", (4, 6), (32, 80), (2, 2), (32, 80)),  # 80 // 32 = 2 groups (of 40), as in the exercise
    ("vionet_b", (4, 6), (32, 80), (2, 10), (32, 160)),
])
def test_vionets(name, depths, widths, groups, bottlenecks):
    model = meta(name)
    stages = _stages(model)
    assert tuple(len(s) for s in stages) == depths
    assert tuple(s[-1].f.c.conv.out_channels for s in stages) == widths
    assert tuple(s[-1].f.b.conv.groups for s in stages) == groups
    assert tuple(s[-1].f.b.conv.in_channels for s in stages) == bottlenecks


def test_vionet_constructor_takes_any_tuples():
    model = VioNet(depths=(1, 2, 1), widths=(16, 24, 48), group_widths=(8, 8, 16),
                   bottleneck_multipliers=(1, 0.5, 2), num_classes=5, in_chans=1)
    assert model.cfg == AnyNetCfg((1, 2, 1), (16, 24, 48), (8, 8, 16), (1, 0.5, 2), stem_width=32)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5)


def test_anynet_overrides_and_checks():
    model = meta("anynet", depths=(1, 1, 1), widths=(8, 16, 32), group_widths=8, strides=(1, 2, 2))
    assert [(s.group_width, s.stride) for s in model.cfg.stages()] == [(8, 1), (8, 2), (8, 2)]
    assert model.trunk_output.block1[0].f.b.conv.stride == (1, 1)
    assert model.trunk_output.block1[0].proj is not None  # 32 -> 8 channels
    with pytest.raises(ValueError, match="one value per stage"):
        AnyNetCfg(depths=(1, 2), widths=(8, 16), group_widths=(8, 8, 8))
    with pytest.raises(ValueError, match="equal length"):
        AnyNetCfg(depths=(1, 2), widths=(8,))
    with pytest.raises(ValueError, match="wider than the bottleneck"):
        create("anynet", widths=(8, 16), group_widths=32)
    with pytest.raises(ValueError, match="block must be one of"):
        AnyNetCfg(depths=(1,), widths=(8,), block="inverted")
    with pytest.raises(ValueError, match=r"depths\[1\] must be a positive int"):
        AnyNetCfg(depths=(1, 0), widths=(8, 8))
