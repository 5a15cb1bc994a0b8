"""The registry (create, list_models, @register_model) and the errors a user meets first."""
import pytest
import torch

from pyfast import models
from pyfast.models import create, list_models, register_model
from pyfast.models.registry import _MODELS

EXPECTED = (
    ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d"]
    + [f"preact_resnet{d}" for d in (18, 34, 50, 101, 152)]
    + [f"regnetx_{s}" for s in ("200mf", "400mf", "600mf", "800mf", "1_6gf", "3_2gf", "4_0gf", "6_4gf", "8gf",
                                "12gf", "16gf", "32gf")]
    + ["regnetx_32", "anynet", "deresnext", "vionet", "vionet_d", "vionet_c", "vionet_g", "vionet_b"]
)


def test_every_family_is_registered():
    assert sorted(EXPECTED) == list_models()
    assert list_models("preact_*") == sorted(f"preact_resnet{d}" for d in (18, 34, 50, 101, 152))
    assert list_models("nothing*") == []


def test_create_passes_model_arguments():
    model = create("regnetx_32", num_classes=10, in_chans=1, fused=False)
    assert (model.num_classes, model.in_chans, model.fused, model.backend) == (10, 1, False, None)
    assert model.stem.conv.in_channels == 1 and model.fc.out_features == 10
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_create_overrides_config_fields():
    model = create("resnet18", widths=(8, 8, 16, 16), stem_width=8, num_classes=3)
    assert model.cfg.widths == (8, 8, 16, 16) and model.fc.in_features == 16
    assert create("regnetx_400mf", depth=4).cfg.depths == (1, 2, 1)  # the first 4 blocks of the rule
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['widht'\]"):
        create("resnet18", widht=(8, 8, 16, 16))


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'resnet51'; did you mean 'resnet50'"):
        create("resnet51")
    with pytest.raises(ValueError, match="list_models"):
        create("alexnet")
    with pytest.raises(TypeError, match="must be a str"):
        create(None)


@pytest.mark.parametrize("name", ["resnet18", "preact_resnet18", "regnetx_32", "deresnext"])
def test_wrong_input_channels(name):
    model = create(name, in_chans=1, num_classes=10)
    with pytest.raises(ValueError, match=r"built with in_chans=1, but the input has 3 channels"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="takes a 4-D"):
        model(torch.randn(1, 32, 32))


@pytest.mark.parametrize("kwargs, match", [
    (dict(in_chans=0), "in_chans must be a positive int"),
    (dict(num_classes=-1), "num_classes must be a positive int"),
    (dict(in_chans=3.0), "in_chans must be a positive int"),
    (dict(backend="cuda"), "pass fused=True with it"),
    (dict(fused=True, backend="fastest"), "unknown pyfast backend 'fastest'"),
    (dict(fused=True, backend="eager"), "backend names the op backend now"),
])
def test_bad_model_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create("vionet", **kwargs)


def test_register_model():
    @register_model(name="tiny_test_net")
    def tiny(**kwargs):
        return models.create("anynet", depths=(1,), widths=(8,), group_widths=8, **kwargs)

    try:
        assert "tiny_test_net" in list_models()
        assert create("tiny_test_net", num_classes=2)(torch.randn(2, 3, 16, 16)).shape == (2, 2)
        with pytest.raises(ValueError, match="already registered"):
            register_model(lambda **kw: None, name="tiny_test_net")
    finally:
        _MODELS.pop("tiny_test_net")
