"""pyfast._shapes: the conv output size is nn.Conv2d's, and `pair` refuses what a conv would."""
import random

import pytest
import torch
import torch.nn.functional as F

from pyfast._shapes import conv_output_size, pair


def test_conv_output_size_matches_torch():
    rng = random.Random(0)
    for _ in range(50):
        h, w = rng.randint(7, 20), rng.randint(7, 20)
        kernel, stride = (rng.randint(1, 4), rng.randint(1, 4)), (rng.randint(1, 3), rng.randint(1, 3))
        padding, dilation = (rng.randint(0, 2), rng.randint(0, 2)), (rng.randint(1, 2), rng.randint(1, 2))
        expected = F.conv2d(torch.empty(1, 1, h, w), torch.empty(1, 1, *kernel), stride=stride, padding=padding,
                            dilation=dilation).shape[2:]
        assert conv_output_size(h, w, kernel, stride, padding, dilation) == tuple(expected)


def test_pair_accepts_an_int_or_two():
    assert pair(3) == (3, 3)
    assert pair([1, 2]) == (1, 2)
    assert pair(torch.Size([2, 2]), "stride", 1) == (2, 2)


@pytest.mark.parametrize("value", ["same", 1.5, (1, 2, 3), (1.0, 2), None, (0, 1)])
def test_pair_refuses_naming_the_argument(value):
    with pytest.raises(ValueError, match="stride must be an int or a pair of ints >= 1"):
        pair(value, "stride", 1)
