"""The modules at the edges of their input domain behave as the plain modules do, or raise an error that
names the argument: input rank, meta tensors, the shortcut_bn argument."""
import pytest
import torch
from torch import nn

from pyfast.nn import BNAddReLU, BNReLUConv2d, ConvBNReLU2d, LazyBNAddReLU


@pytest.mark.parametrize("shape", [(2, 4, 5), (2, 4, 3, 3, 3)])
def test_bn_add_relu_takes_4d_input_only_like_batchnorm2d(shape):
    x = torch.randn(shape)
    with pytest.raises(ValueError, match=r"expected 4D input") as expected:
        nn.BatchNorm2d(4)(x)
    for module in (BNAddReLU(4), LazyBNAddReLU()):
        with pytest.raises(ValueError, match=r"expected 4D input") as raised:
            module(x, x)
        assert str(raised.value) == str(expected.value)


def test_meta_modules_and_inputs_give_the_plain_modules_shapes():
    x = torch.randn(2, 3, 6, 6, device="meta")
    with torch.device("meta"):
        cases = [(ConvBNReLU2d(3, 4, 3, stride=2, padding=1),
                  nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.BatchNorm2d(4))),
                 (BNReLUConv2d(3, 4, 3), nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)))]
        bn_add_relu = BNAddReLU(3)
    for fused, plain in cases:
        for mode in (True, False):
            out = fused.train(mode)(x)
            assert out.is_meta and out.shape == plain.train(mode)(x).shape
    s_bn = nn.BatchNorm2d(3, device="meta")
    out = bn_add_relu(x, x, s_bn)
    assert out.is_meta and out.shape == x.shape


def test_shortcut_bn_must_be_a_batchnorm_module():
    y = torch.randn(2, 4, 3, 3)
    bn_add_relu = BNAddReLU(4)
    for wrong in ((torch.ones(4), torch.zeros(4)), "bn", nn.ReLU()):
        with pytest.raises(TypeError, match=f"shortcut_bn must be an nn.BatchNorm2d module.*{type(wrong).__name__}"):
            bn_add_relu(y, y, wrong)
