"""pyfast.fuse keeps what a traced graph would freeze or drop: train/eval-dependent code, activation
checkpointing; it says in the report what it left alone and why, and print() shows what it fused."""
import copy

import pytest
import torch
import torch.nn.functional as F
from nn_checks import double_copy, train_and_compare
from torch import nn
from torch.utils.checkpoint import checkpoint

import pyfast
from pyfast.nn import FusedSequential, fuse


def conv_bn_relu(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class ModeDropout(nn.Module):
    """Reads self.training in its forward, as functional dropout is usually written."""

    def __init__(self):
        super().__init__()
        self.features = conv_bn_relu(3, 4)

    def forward(self, x):
        return F.dropout(self.features(x), 0.5, training=self.training)


class WithAuxHead(nn.Module):
    """googlenet's layout: an auxiliary head that runs, and is returned, in training only."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn_relu(3, 4)
        self.body = ModeDropout()
        self.aux = nn.Sequential(nn.Flatten(), nn.LazyLinear(2))
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        if self.training:
            return self.head(x), self.aux(x)
        return self.head(x)


@pytest.mark.parametrize("fuse_in", ["train", "eval"])
def test_fused_model_follows_train_and_eval(fuse_in):
    model = WithAuxHead()
    model(torch.randn(2, 3, 6, 6))  # initializes the lazy head
    getattr(model, fuse_in)()
    fused, report = fuse(model)
    assert "self.training" in report.not_traced[""]  # the root's own code depends on the mode
    assert isinstance(fused.stem, FusedSequential) and isinstance(fused.body.features, FusedSequential)
    assert "self.training" in report.not_traced["body"]
    x = torch.randn(2, 3, 6, 6)
    model.eval(), fused.eval()
    running = fused.stem[1].running_mean.clone()
    assert torch.allclose(fused(x), model(x), atol=1e-5)
    assert torch.equal(fused.stem[1].running_mean, running)
    model.train(), fused.train()
    out, aux = fused(x)
    assert aux.shape == (2, 2) and out.shape == (2, 2, 6, 6)
    assert not torch.equal(fused.stem[1].running_mean, running)
    torch.manual_seed(1)
    body = fused.body(x)
    torch.manual_seed(1)
    assert torch.allclose(body, model.body(x), atol=1e-5) and (body == 0).float().mean() > 0.2  # dropout on


def test_timm_batchnorm_act_follows_train_and_eval():
    timm = pytest.importorskip("timm")
    model = timm.create_model("regnetx_002", num_classes=10)
    fused, report = fuse(model)
    assert report.counts() == {"conv_bn_add_relu": 13, "conv_bn_relu": 27}, str(report)
    x = torch.randn(2, 3, 32, 32)
    model.eval(), fused.eval()
    running = fused.stem.bn.running_mean.clone()
    expected = model(x)
    assert ((fused(x) - expected).norm() / expected.norm()).item() < 1e-4
    assert torch.equal(fused.stem.bn.running_mean, running)


@pytest.mark.parametrize("fuse_in", ["train", "eval"])
def test_googlenet_aux_heads_follow_train_and_eval(fuse_in):
    models = pytest.importorskip("torchvision.models")
    model = getattr(models.googlenet(num_classes=10, aux_logits=True, init_weights=True), fuse_in)()
    fused, report = fuse(model)
    assert report.counts() == {"conv_bn_relu": 59} and "self.training" in report.not_traced[""]
    x = torch.randn(2, 3, 64, 64)
    fused.eval()
    out = fused(x)
    assert isinstance(out, torch.Tensor)
    assert torch.allclose(out, model.eval()(x), rtol=1e-4, atol=1e-4)
    fused.train()
    assert type(fused(x)).__name__ == "GoogLeNetOutputs"


class Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = conv_bn_relu(3, 4)
        self.head = conv_bn_relu(4, 4)

    def forward(self, x):
        return self.head(checkpoint(self.block, x, use_reentrant=False))


def test_checkpointed_regions_keep_their_recomputation():
    model = Checkpointed()
    plain, eager = double_copy(model), copy.deepcopy(model)
    fused, report = fuse(model)
    assert "torch.utils.checkpoint.checkpoint" in report.not_traced[""]
    assert "left unfused" in report.not_traced["block"]
    assert [f.modules[0] for f in report.fusions] == ["head.0"]  # the region itself stays as in eager
    train_and_compare(fused, plain, lambda: torch.randn(2, 3, 5, 5), steps=1, eager=eager)
    # the region ran twice in the training step (forward, then recomputed in backward): its BN counted
    # two batches, as in eager (compare_state checked them equal to the float64 copy's)
    assert fused.block[1].num_batches_tracked.item() == 2 and fused.head[1].num_batches_tracked.item() == 1


def test_timm_gradient_checkpointing_is_kept():
    """timm's checkpoint_seq over a list of stages: each stage stays unfused, as the checkpoint runs it."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", num_classes=4)
    model.set_grad_checkpointing()
    fused, report = fuse(model)
    assert "checkpoint_seq" in report.not_traced[""]
    assert all("left unfused" in report.not_traced[f"layer{i}"] for i in range(1, 5)), str(report)
    assert report.fusions == [] and fused is model  # the stem's conv, bn, act are leaves of the root


def test_pre_activation_models_use_bn_relu_conv():
    model = pyfast.models.create("preact_resnet18", num_classes=4, backend="eager")
    plain, eager = double_copy(model), copy.deepcopy(model)
    fused, report = fuse(model)
    counts = report.counts()
    assert counts["bn_relu_conv"] >= 4 and counts["bn_relu_conv"] > counts.get("conv_bn_relu", 0), str(report)
    assert report.left_alone == [] and report.not_traced == {}
    train_and_compare(fused, plain, lambda: torch.randn(2, 3, 32, 32), steps=1, eager=eager, eval_step=False)


def test_timm_pre_activation_and_silu_models_report_every_candidate():
    timm = pytest.importorskip("timm")
    _, report = fuse(timm.create_model("resnetv2_50"))
    assert report.counts() == {"conv_bn_relu": 8, "bn_relu_conv": 36}, str(report)
    model = timm.create_model("efficientnet_b0")
    _, report = fuse(model)
    silu_bns = [name for name, m in model.named_modules() if type(m).__name__ == "BatchNormAct2d"
                and isinstance(m.act, nn.SiLU)]
    reported = {entry.modules[-1] for entry in report.left_alone}
    assert set(silu_bns) <= reported, sorted(set(silu_bns) - reported)
    assert all("SiLU" in entry.reason for entry in report.left_alone)


def test_print_shows_what_was_fused():
    model = nn.Sequential(conv_bn_relu(3, 4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    fused, report = fuse(model)
    text = str(fused)
    assert "pyfast.fuse: 2 fusions (1 conv_bn_relu, 1 conv_bn)" in text
    assert "conv_bn_relu     0.0 -> 0.1 -> 0.2" in text and "conv_bn          1 -> 2" in text
    assert "def forward" not in text  # the generated code stays in fused.code
    assert repr(fused) == text


def test_torchscript_is_refused_clearly():
    module = pyfast.nn.ConvBNReLU2d(3, 4, 3).eval()
    x = torch.randn(2, 3, 5, 5)
    with pytest.raises(RuntimeError, match="torch.jit.trace"):
        torch.jit.trace(module, x)
    for target in (module, pyfast.nn.BNAddReLU(4), pyfast.nn.AddReLU(), fuse(conv_bn_relu(3, 4))[0]):
        with pytest.raises(RuntimeError, match="torch.jit.script cannot compile"):
            torch.jit.script(target)
