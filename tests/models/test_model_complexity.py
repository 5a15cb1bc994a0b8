"""The analytic complexity agrees with what the model is: its parameter count, the FLOPs and conv
outputs PyTorch's own counter sees when the model runs (on the meta device: shapes only, no compute),
and the published GFLOPS."""
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pyfast.models import complexity, create, list_models


def meta(name, **kwargs):
    with torch.device("meta"):
        return create(name, **kwargs)


@pytest.mark.parametrize("name", list_models())
def test_complexity_matches_the_running_model(name):
    in_chans = 1 if name in ("regnetx_32", "deresnext") or name.startswith("vionet") else 3
    model = meta(name, in_chans=in_chans, num_classes=10).eval()
    shape = (2, in_chans, 96, 96)
    cx = model.complexity(shape)
    assert cx.params == sum(p.numel() for p in model.parameters())

    acts = []
    hooks = [m.register_forward_hook(lambda m, i, o: acts.append(o.numel()))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with FlopCounterMode(display=False) as counter:
        out = model(torch.empty(shape, device="meta"))
    for h in hooks:
        h.remove()
    assert counter.get_total_flops() == 2 * cx.flops  # the counter counts 2 FLOPs per multiply-add
    assert sum(acts) == cx.acts
    assert cx.units[-1].out_shape == tuple(out.shape) == (2, 10)
    assert cx.input_shape == shape and all(a.out_shape == b.in_shape for a, b in zip(cx.units, cx.units[1:]))


# torchvision's published GFLOPS (multiply-adds, 224x224, 1000 classes), and RegNetX-200MF's name.
PUBLISHED_GFLOPS = {
    "resnet18": 1.81, "resnet34": 3.66, "resnet50": 4.09, "resnet101": 7.80, "resnet152": 11.51,
    "resnext50_32x4d": 4.23, "resnext101_32x8d": 16.41, "regnetx_200mf": 0.20, "regnetx_400mf": 0.41,
    "regnetx_800mf": 0.80, "regnetx_1_6gf": 1.60, "regnetx_3_2gf": 3.18, "regnetx_8gf": 8.00,
    "regnetx_16gf": 15.94, "regnetx_32gf": 31.74,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_GFLOPS))
def test_published_gflops(name):
    assert round(meta(name).complexity().flops / 1e9, 2) == PUBLISHED_GFLOPS[name]


def test_resnet50_units():
    cx = meta("resnet50").complexity((3, 224, 224))
    assert cx.flops == 4_089_184_256 and cx.params == 25_557_032
    names = [u.name for u in cx.units]
    assert names[0] == "stem" and names[1] == "layer1.0" and names[-2] == "layer4.2" and names[-1] == "head"
    assert len(cx.units) == 2 + 16
    stem, first = cx.units[0], cx.units[1]
    assert stem.out_shape == (1, 64, 56, 56) and first.out_shape == (1, 256, 56, 56)
    # first bottleneck: 1x1 64->64, 3x3 64->64, 1x1 64->256, projection 64->256, at 56x56
    assert first.flops == 56 * 56 * (64 * 64 + 9 * 64 * 64 + 64 * 256 + 64 * 256)
    assert first.params == 64 * 64 + 9 * 64 * 64 + 2 * 64 * 256 + 2 * (64 + 64 + 256 + 256)
    # minimal bytes: the block's input and output once, its weights once
    assert first.min_bytes(torch.bfloat16, torch.float32) == (64 + 256) * 56 * 56 * 2 + first.params * 4
    assert "layer4.2" in cx.table()


@pytest.mark.parametrize("name", ["resnet18", "preact_resnet18", "resnet50"])
def test_tflops_are_the_flops_pytorch_counts_per_second(name):
    """`tflops(seconds)` of a forward, and of a forward+backward (input and weight gradients), is what
    PyTorch's FLOP counter sees the model compute, per second. Dense convolutions only: the counter
    (torch 2.14) does not divide a grouped convolution's backward by its groups."""
    model = meta(name, num_classes=10)
    shape = (2, 3, 64, 64)
    cx = model.complexity(shape)
    with FlopCounterMode(display=False) as forward:
        out = model(torch.empty(shape, device="meta", requires_grad=True))
    with FlopCounterMode(display=False) as backward:
        out.sum().backward()
    assert cx.tflops(0.5) == pytest.approx(forward.get_total_flops() / 0.5 / 1e12, rel=1e-12)
    total = forward.get_total_flops() + backward.get_total_flops()
    assert cx.tflops(0.5, backward=True) == pytest.approx(total / 0.5 / 1e12, rel=1e-12)


def test_batch_scales_linearly():
    model = meta("regnetx_400mf")
    one, eight = model.complexity((3, 224, 224)), model.complexity((8, 3, 224, 224))
    assert eight.flops == 8 * one.flops and eight.acts == 8 * one.acts and eight.params == one.params


def test_bad_shapes():
    model = meta("resnet18", in_chans=1)
    with pytest.raises(ValueError, match="expects 1 input channels"):
        model.complexity((3, 224, 224))
    with pytest.raises(ValueError, match="input_shape must be"):
        complexity(model, (224, 224))
    with pytest.raises(TypeError, match="does not describe its units"):
        complexity(nn.Conv2d(1, 1, 1), (1, 8, 8))
