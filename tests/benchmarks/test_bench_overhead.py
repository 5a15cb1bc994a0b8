"""benchmarks/overhead.py's conv-only floor: the model it times has no BatchNorm and no ReLU left, and keeps
every convolution and residual addition of the model it came from."""
import pytest
import torch

from pyfast.benchmarks.overhead import MODELS, build, conv_only_floor, count_kernels


@pytest.mark.parametrize("name, in_chans", [("regnetx_32", 1), ("resnet50", 3), ("preact_resnet18", 3)])
def test_floor_keeps_convolutions_and_additions_only(name, in_chans):
    overrides = MODELS[name][2] if name in MODELS else {}  # the narrow widths
    model = build(name, False, in_chans=in_chans, num_classes=10, **overrides).eval()
    floor = conv_only_floor(model)
    x = torch.randn(1, in_chans, 32, 32)
    with torch.no_grad():
        full, bare = count_kernels(lambda: model(x)), count_kernels(lambda: floor(x))
    assert not [op for op in bare if "batch_norm" in op or "relu" in op or "threshold" in op or "clamp" in op]
    assert bare["aten.convolution"] == full["aten.convolution"] > 0
    added = sum(n for op, n in full.items() if op.startswith("aten.add"))
    assert sum(n for op, n in bare.items() if op.startswith("aten.add")) == added
    assert any("batch_norm" in op for op in full)
