"""pyfast.nn.functional: module state -> op arguments, exactly as nn.BatchNorm2d.forward reads it."""
import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_close
from torch import nn

from pyfast.nn import functional


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("flipped", [False, True], ids=["", "stats_flag_flipped_later"])
def test_batch_norm_args_follow_batchnorm2d_forward(training, track, flipped):
    bn = nn.BatchNorm2d(3, track_running_stats=track if not flipped else True, momentum=None).train(training)
    if flipped:  # buffers exist, but the module no longer tracks (allowed by nn.BatchNorm2d)
        bn.track_running_stats = track
    args, use_batch_stats = functional.batch_norm_args(bn)
    has_buffers = bn.running_mean is not None
    assert use_batch_stats == (training or not has_buffers)
    passes_running = has_buffers and (not training or track)
    assert (args.running_mean is not None) == passes_running
    assert not passes_running or (args.running_mean is bn.running_mean and args.running_var is bn.running_var)
    assert (args.num_batches_tracked is not None) == (training and track and has_buffers)
    assert args.momentum is None and args.eps == bn.eps and args.weight is bn.weight
    # and the result is nn.BatchNorm2d's, state included
    plain = nn.BatchNorm2d(3, track_running_stats=track if not flipped else True, momentum=None).train(training)
    plain.track_running_stats = bn.track_running_stats
    conv = nn.Conv2d(2, 3, 1)
    x = torch.randn(4, 2, 3, 3)
    assert_close(functional.conv_bn_relu(x, conv, bn, relu=False), plain(conv(x)).double(), torch.float32)
    assert bn.state_dict().keys() == plain.state_dict().keys()
    for key, value in bn.state_dict().items():
        assert torch.allclose(value.float(), plain.state_dict()[key].float(), atol=1e-6), key


def test_resolve_padding():
    assert functional.resolve_padding("same", 3, 1) == (1, 1)
    assert functional.resolve_padding("same", (3, 5), (2, 1)) == (2, 2)
    assert functional.resolve_padding("valid", 3, 1) == (0, 0)
    assert functional.resolve_padding(2, 3, 1) == (2, 2)
    with pytest.raises(ValueError, match="padding='same'.*asymmetric"):
        functional.resolve_padding("same", (2, 3), 1)
    with pytest.raises(ValueError, match="padding='full'"):
        functional.resolve_padding("full", 3, 1)


def test_adds_eager_pytorch_would_broadcast_or_promote_take_the_eager_path():
    bn = nn.BatchNorm2d(3)
    y = torch.randn(2, 3, 4, 4)
    bias = torch.randn(1, 3, 1, 1)
    expected = F.relu(nn.BatchNorm2d(3)(y) + bias)
    assert torch.allclose(functional.bn_add_relu(y, bn, bias), expected, atol=1e-6)
    assert bn.num_batches_tracked.item() == 1
    wide = torch.randn(2, 3, 4, 4, dtype=torch.float64)  # float32 + float64 promotes
    out = functional.bn_add_relu(y, bn, wide)
    assert out.dtype == torch.float64
    a = torch.randn(5, 7)  # not 4-D
    assert torch.equal(functional.add_relu(a, a), F.relu(a + a))


def test_bn_add_relu_with_a_shortcut_bn_in_another_mode():
    """A train-mode BN next to an eval-mode shortcut BN: each keeps its own semantics."""
    bn, s_bn = nn.BatchNorm2d(3), nn.BatchNorm2d(3).eval()
    plain, s_plain = nn.BatchNorm2d(3), nn.BatchNorm2d(3).eval()
    y, s = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    out = functional.bn_add_relu(y, bn, s, s_bn)
    assert torch.allclose(out, F.relu(plain(y) + s_plain(s)), atol=1e-6)
    assert bn.num_batches_tracked.item() == 1 and s_bn.num_batches_tracked.item() == 0


@pytest.mark.parametrize("training", [True, False])
def test_bn_relu_matches_batchnorm_then_relu(training):
    bn, ours = nn.BatchNorm2d(6), nn.BatchNorm2d(6)
    ours.load_state_dict(bn.state_dict())
    bn.train(training)
    ours.train(training)
    for _ in range(2):
        x = torch.randn(3, 6, 5, 4).contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(functional.bn_relu(x, ours), torch.relu(bn(x)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.state_dict(), bn.state_dict())
