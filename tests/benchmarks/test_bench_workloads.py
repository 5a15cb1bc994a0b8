"""Modes, providers and inputs of the benchmarks (workloads.py), on a tiny model."""
import pytest
import torch

from pyfast.benchmarks import workloads
from pyfast.benchmarks.workloads import Config

from bench_standins import tiny_model


def test_config_refuses_unknown_values():
    with pytest.raises(ValueError, match="unknown mode"):
        Config("sideways", "fp32", "nchw", "cpu")
    with pytest.raises(ValueError, match="unknown layout"):
        Config("inference", "fp32", "nhwc", "cpu")


def test_variants_share_the_eager_weights():
    variants = workloads.model_variants("tiny", workloads.PROVIDERS, 10, 1, tiny_model)
    eager = variants["eager"].state_dict()
    for name in ("compile", "pyfast"):
        state = variants[name].state_dict()
        assert all(torch.equal(state[k], eager[k]) for k in eager)
    assert variants["pyfast"].fused and not variants["eager"].fused and variants["compile"] is not variants["eager"]


def test_inputs_follow_the_layout_and_never_are_zero():
    config = Config("train_step", "bf16", "channels_last", "cpu")
    x, labels = workloads.image_batch((2, 3, 8, 8), config, num_classes=5)()
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.requires_grad and (x != 0).all()
    assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < 5
    x, grad = workloads.image_batch((2, 3, 8, 8), config, grad_shape=(2, 4, 4, 4))()
    assert x.requires_grad and grad.dtype == torch.bfloat16 and grad.shape == (2, 4, 4, 4)


def test_inference_step_records_no_graph():
    config = Config("inference", "fp32", "nchw", "cpu")
    model = workloads.place(tiny_model("tiny"), config)
    out = workloads.make_step(model, config)(*workloads.image_batch((2, 1, 16, 16), config, num_classes=10)())
    assert not model.training and not out.requires_grad


def test_train_forward_records_the_graph_in_training_mode():
    config = Config("train_forward", "bf16", "nchw", "cpu")
    model = workloads.place(tiny_model("tiny"), config)
    out = workloads.make_step(model, config)(*workloads.image_batch((2, 1, 16, 16), config, num_classes=10)())
    assert model.training and out.requires_grad and out.dtype == torch.bfloat16  # autocast


def test_train_step_updates_the_weights():
    config = Config("train_step", "fp32", "channels_last", "cpu")
    model = workloads.place(tiny_model("tiny"), config)
    before = model.fc.weight.detach().clone()
    workloads.make_step(model, config)(*workloads.image_batch((2, 1, 16, 16), config, num_classes=10)())
    assert not torch.equal(model.fc.weight, before)


def test_train_step_without_optimizer_returns_gradients_and_accumulates_none():
    config = Config("train_step", "fp32", "nchw", "cpu")
    block = workloads.place(tiny_model("tiny").trunk_output[0], config)
    x, grad = workloads.image_batch((2, 8, 8, 8), config, grad_shape=(2, 8, 4, 4))()
    grads = workloads.make_step(block, config, optimizer=False)(x, grad)
    assert grads[0].shape == x.shape and x.grad is None
    assert all(p.grad is None for p in block.parameters())


def test_blocks_picks_the_first_two_of_each_stage():
    from pyfast import models

    with torch.device("meta"):
        model = models.create("resnet50")
    units = workloads.blocks(model, (2, 3, 64, 64))
    assert [u.name for u in units] == ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1",
                                       "layer4.0", "layer4.1"]
    assert units[2].in_shape == (2, 256, 16, 16) and units[2].out_shape == (2, 512, 8, 8)


def test_native_inputs():
    assert workloads.native_input("regnetx_32") == (1, 10)
    assert workloads.native_input("resnet50") == (3, 1000)
