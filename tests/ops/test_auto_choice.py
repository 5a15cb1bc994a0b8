"""`auto` chooses per op and shape class: the committed table where a GPU measured the class, else the
default rule (cuDNN + pyfast's BN passes, Triton only for grouped convolutions at RegNet group widths in
channels_last), then the device's fallback order."""
import json

import pytest
import torch

from pyfast import ops
from pyfast.ops import backends
from pyfast.ops._conv import ConvParams
from pyfast.ops.backends import auto

bf16 = torch.bfloat16


@pytest.mark.parametrize("op,groups,group_width,layout,first", [
    ("conv_bn_relu", 1, 64, "channels_last", "cuda"),         # dense: cuDNN
    ("conv_bn_relu", 8, 16, "channels_last", "triton"),       # RegNetX-32's grouped 3x3
    ("bn_relu_conv", 7, 168, "channels_last", "triton"),      # RegNetX-32GF's group width
    ("conv_bn_relu", 8, 16, "nchw", "cuda"),                  # cuDNN is not slow on grouped NCHW
    ("conv_bn_relu", 64, 1, "channels_last", "cuda"),         # depthwise
    ("conv_bn_relu", 32, 4, "channels_last", "cuda"),         # narrower than any RegNet
    ("conv_bn_relu", 2, 512, "channels_last", "cuda"),        # wide groups are dense GEMMs
    ("bn_add_relu", 1, 0, "channels_last", "cuda"),           # no convolution
])
def test_default_rule_on_cuda(op, groups, group_width, layout, first):
    order = backends.auto_order("cuda", op, bf16, layout, groups, group_width, 3, 1)
    assert order[0] == first
    assert sorted(order) == sorted(backends.PRIORITY["cuda"])  # the rest stays as fallback


def test_cpu_keeps_its_order():
    assert backends.auto_order("cpu", "conv_bn_relu", torch.float32, "channels_last", 8, 16, 3, 1) == ["cpu",
                                                                                                        "reference"]


def test_a_measured_class_overrides_the_rule(monkeypatch):
    dense = auto.shape_class("conv_bn_relu", "bf16", "channels_last", 1, 64, 1, 1)
    grouped = auto.shape_class("conv_bn_relu", "bf16", "channels_last", 8, 16, 3, 2)
    monkeypatch.setattr(auto, "TABLE", {"cuda": {dense: "triton", grouped: "reference"}})
    assert backends.auto_order("cuda", "conv_bn_relu", bf16, "channels_last", 1, 64, 1, 1)[0] == "triton"
    assert backends.auto_order("cuda", "conv_bn_relu", bf16, "channels_last", 8, 16, 3, 2)[0] == "reference"
    # another dtype, stride or kernel is another class: the rule again
    assert backends.auto_order("cuda", "conv_bn_relu", torch.float16, "channels_last", 1, 64, 1, 1)[0] == "cuda"
    assert backends.auto_order("cuda", "conv_bn_relu", bf16, "channels_last", 8, 16, 3, 1)[0] == "triton"


@pytest.mark.parametrize("groups,width,kind", [(1, 64, "dense"), (32, 1, "depthwise"), (4, 16, "grouped-gw16"),
                                               (4, 24, "grouped-gw32"), (3, 8, "grouped-gw8"),
                                               (2, 168, "grouped-gw256")])
def test_group_widths_are_bucketed(groups, width, kind):
    assert auto.conv_kind(groups, width) == kind


def test_shape_class_ignores_convolution_fields_of_other_ops():
    assert auto.shape_class("add_relu", "fp32", "nchw", 8, 16, 3, 2) == "add_relu fp32 nchw"
    assert auto.shape_class("conv_bn_relu", "fp32", "nchw", 8, 16, 3, 2) == "conv_bn_relu grouped-gw16 k3 s2 fp32 nchw"


def test_the_committed_table_is_well_formed():
    with open(auto.TABLE_PATH) as f:
        doc = json.load(f)
    for device, choices in doc["choices"].items():
        assert device in backends.PRIORITY
        for key, entry in choices.items():
            assert entry["use"] in backends.BACKENDS, key
            assert key.split()[0] in ("conv_bn_relu", "bn_relu_conv", "bn_add_relu", "add_relu"), key


def _seen_shape_classes(monkeypatch, table):
    """The shape-class arguments select passes to auto's choice, per op, under `table`."""
    x = torch.randn(2, 32, 5, 5).contiguous(memory_format=torch.channels_last)
    w = torch.randn(32, 16, 3, 3)
    seen = {}

    def fake_auto(op, device, dtype, *shape):
        seen[op] = shape
        return "reference"

    monkeypatch.setattr(auto, "TABLE", table)  # a new table: select's memoized answers are dropped
    monkeypatch.setattr(backends, "_auto", fake_auto)
    assert ops.select("conv_bn_relu", x, weight=w, params=ConvParams.of(2, 1, 1, 2)).name == "reference"
    assert ops.select("add_relu", x).name == "reference"
    return seen


def test_select_reads_the_shape_of_a_convolution_where_the_table_has_the_device(monkeypatch):
    seen = _seen_shape_classes(monkeypatch, {"cpu": {}})
    assert seen == {"conv_bn_relu": ("channels_last", 2, 16, 3, 2), "add_relu": ("channels_last", 1, 0, 1, 1)}


def test_select_skips_the_shape_class_where_no_choice_depends_on_it(monkeypatch):
    seen = _seen_shape_classes(monkeypatch, {"cuda": {}})
    assert seen == {"conv_bn_relu": backends._NO_SHAPE_CLASS, "add_relu": backends._NO_SHAPE_CLASS}


def test_select_memoizes_per_call_signature(monkeypatch):
    calls = []
    monkeypatch.setattr(auto, "TABLE", {})
    monkeypatch.setattr(backends, "_auto", lambda op, *args: calls.append(op) or "reference")
    x = torch.randn(2, 4, 5, 5)
    for _ in range(3):
        ops.select("bn_add_relu", x)
    ops.select("bn_add_relu", x.double())
    assert calls == ["bn_add_relu", "bn_add_relu"]  # once per dtype


def test_select_without_shape_arguments_keeps_working():
    x = torch.randn(2, 4, 5, 5)
    expected = "cpu" if ops.BACKENDS["cpu"].unavailable() is None else "reference"
    assert ops.select("conv_bn_relu", x).name == expected
    grouped = ops.select("conv_bn_relu", x, weight=torch.randn(4, 2, 3, 3), params=ConvParams.of(1, 1, 1, 2))
    assert grouped.name == expected


def test_record_choices_counts_the_dispatchers_answers():
    x = torch.randn(2, 4, 5, 5)
    with backends.record_choices() as seen:
        ops.select("add_relu", x, "reference")
        ops.select("add_relu", x, "reference")
        ops.select("bn_add_relu", x)
    expected = "cpu" if ops.BACKENDS["cpu"].unavailable() is None else "reference"
    assert seen == {("add_relu", "reference"): 2, ("bn_add_relu", expected): 1}
    ops.select("add_relu", x)  # outside the block: nothing recorded, no error
    assert sum(seen.values()) == 3
