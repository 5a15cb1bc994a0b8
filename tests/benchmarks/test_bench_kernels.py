"""The op cases of kernels.py: shapes against the models' own, FLOP and byte counts, one timed row."""
import argparse

import pytest
import torch

from pyfast import models
from pyfast.benchmarks import kernels
from pyfast.benchmarks.workloads import Config


def test_case_counts_by_hand():
    case = kernels.OpCase("net", "s1", "conv_bn_relu", 2, 32, 8, 8, 64, kernel=3, stride=2, groups=2)
    assert case.output_shape() == (2, 64, 4, 4)
    assert case.flops("inference") == 2 * (2 * 64 * 4 * 4) * 16 * 9
    assert case.flops("train_step") == 3 * case.flops("inference")
    a, o, w = 2 * 32 * 8 * 8 * 2, 2 * 64 * 4 * 4 * 2, 64 * 16 * 9 * 2  # bf16 bytes
    assert case.min_bytes("train_forward", torch.bfloat16) == a + o + w
    assert case.min_bytes("train_step", torch.bfloat16) == 3 * a + 2 * o + 3 * w
    assert case.name == "net.s1 conv_bn_relu 3x3 g2 s2 32->64 @8x8"


def test_elementwise_cases_move_bytes_and_no_flops():
    case = kernels.OpCase("net", "s1", "bn_add_relu", 2, 16, 4, 4, shortcut_bn=True)
    assert case.input_shapes() == [(2, 16, 4, 4)] * 2 and case.flops("train_step") == 0
    assert case.min_bytes("inference", torch.float32) == 3 * 2 * 16 * 4 * 4 * 4
    assert case.name == "net.s1 bn_add_relu 16 proj @4x4"


@pytest.mark.parametrize("net, in_chans", [("regnetx_32", 1), ("resnet50", 3)])
def test_stage_shapes_match_the_models(net, in_chans):
    """Each case's input that is a block's input (all but the 3x3 convolutions inside a block and a block's last
    convolution, conv_bn_add_relu, whose output is the block's) has a shape the model's complexity reports for one
    of its blocks."""
    with torch.device("meta"):
        model = models.create(net, in_chans=in_chans)
    units = model.complexity((128, in_chans, 224, 224)).units
    block_inputs = {u.in_shape for u in units if u.name not in ("stem", "head")}
    block_outputs = {u.out_shape for u in units if u.name not in ("stem", "head")}
    cases = kernels.NETS[net](128, 224)
    assert cases[0].input_shapes()[0] == units[0].in_shape[:1] + (cases[0].c_in,) + units[0].in_shape[2:]
    assert cases[0].output_shape()[1:] == (units[0].out_shape[1], 112, 112)
    for case in cases[1:]:
        if case.op == "conv_bn_add_relu":
            assert case.output_shape() in block_outputs, case.name
        elif case.kernel == 1:
            assert case.input_shapes()[0] in block_inputs, case.name


def test_time_case_on_the_cpu(fixed_ceilings):
    case = kernels.OpCase("net", "s1", "conv_bn_relu", 2, 8, 6, 6, 8, kernel=3, groups=2)
    config = Config("train_step", "fp32", "channels_last", "cpu")
    row = kernels.time_case(case, config, ["reference", "cpu", "no-such-backend"], fixed_ceilings, warmup=1,
                            repeats=2)
    ref, cpu = row["backends"]["reference"], row["backends"]["cpu"]
    if "error" not in cpu:  # the speedup of a fused backend is the eager (reference) time over its own
        assert cpu["speedup_vs_eager"] == pytest.approx(ref["median_ms"] / cpu["median_ms"])
    assert ref["tflops"] == pytest.approx(case.flops("train_step") / (ref["median_ms"] * 1e-3) / 1e12)
    assert ref["bandwidth_fraction"] == pytest.approx(ref["gbps"] / fixed_ceilings.copy_gbps)
    assert 0 < ref["roofline_fraction"]
    assert "no-such-backend" in row["backends"]["no-such-backend"]["error"]


def test_time_case_in_bf16(fixed_ceilings):
    """Weights, activations and gradients all in bf16, no autocast (BN parameters stay float32)."""
    case = kernels.OpCase("net", "s1", "bn_relu_conv", 2, 8, 4, 4, 8, kernel=1)
    config = Config("train_step", "bf16", "channels_last", "cpu")
    row = kernels.time_case(case, config, ["reference"], fixed_ceilings, warmup=1, repeats=2)
    assert "median_ms" in row["backends"]["reference"], row["backends"]["reference"]
    assert row["min_bytes"] == case.min_bytes("train_step", torch.bfloat16)


@pytest.mark.parametrize("op", kernels.OPS)
def test_every_op_runs_through_its_module(op):
    shapes = dict(conv_bn_relu=(8, 3, 1), bn_relu_conv=(8, 1, 1), bn_add_relu=(0, 1, 1), conv_bn_add_relu=(8, 1, 1),
                  add_relu=(0, 1, 1))
    c_out, kernel, groups = shapes[op]
    case = kernels.OpCase("net", "s1", op, 2, 8, 4, 4, c_out, kernel=kernel, groups=groups)
    config = Config("train_step", "fp32", "nchw", "cpu")
    module = kernels.op_module(case, "reference", config)
    *inputs, grad = kernels.op_inputs(case, config)()
    out = module(*inputs)
    assert out.shape == case.output_shape() == grad.shape


def test_arguments():
    parser = argparse.ArgumentParser()
    kernels.add_arguments(parser)
    args = parser.parse_args(["--nets", "resnet50", "--ops", "add_relu", "--dtype", "bf16", "--time-limit", "60"])
    assert (args.nets, args.ops, args.dtype, args.time_limit) == (["resnet50"], ["add_relu"], ["bf16"], 60.0)
    assert kernels.fused_backends("cpu") == ["cpu"]


def test_kernels_main_on_a_tiny_size(tmp_path, fixed_ceilings, capsys):
    parser = argparse.ArgumentParser()
    kernels.add_arguments(parser)
    out = tmp_path / "k.json"
    doc = kernels.main(parser.parse_args(["--nets", "regnetx_32", "--ops", "add_relu", "--modes", "inference",
                                          "--batch-size", "2", "--image-size", "32", "--repeats", "2",
                                          "--out", str(out)]))
    assert len(doc["rows"]) == 4 and out.exists()  # one add_relu per stage
    assert all(r["env"]["torch"] == torch.__version__ for r in doc["rows"])
    assert "x eager" in capsys.readouterr().out


@pytest.mark.parametrize("net, skipped", [("regnetx_32", ".proj.0"), ("resnet50", ".downsample.0")])
def test_static_launches_are_the_fused_convolutions(net, skipped):
    """Every convolution of the training forward but a block's projection (a plain ATen convolution before
    conv_bn_add_relu) is a Triton launch with the statistics epilogue, in forward order: a block's last one too."""
    with torch.device("meta"):
        model = models.create(net, in_chans=kernels.STATIC_NETS[net])
    convs = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    launches = kernels.static_launches(net, batch=2, image=32)
    assert [name for name, _ in launches] == [n for n in convs if not n.endswith(skipped)]
    stem = launches[0][1]
    assert (stem.n, stem.c_in, stem.h, stem.w, stem.dtype) == (2, kernels.STATIC_NETS[net], 32, 32, torch.bfloat16)
    assert all(p.stats and not p.relu for _, p in launches)


def test_static_rows_without_compiling():
    rows = kernels.static_rows(["regnetx_32"], batch=2, image=32, compile=False)
    convs = [r for r in rows if r["kernel"] == "conv2d_kernel"]
    assert sum(r["count"] for r in convs) == len(kernels.static_launches("regnetx_32", 2, 32))
    assert all(r["programs"] == r["grid"][0] * r["grid"][1] * r["grid"][2] > 0 for r in rows)
    assert {r["kernel"] for r in rows} == {"conv2d_kernel"}  # the statistics combine runs inside the conv


def test_dot_loops_counts_the_loops_around_a_dot():
    ttgir = """tt.func @k(%a: i32 {tt.divisibility = 16 : i32}) {
    %0 = scf.for %i = %c0 to %n step %c1 iter_args(%x = %acc) -> (tensor<64x64xf32, #mma>) {
      %1 = scf.for %j = %c0 to %n step %c1 iter_args(%y = %x) -> (tensor<64x64xf32, #mma>) {
        %2 = ttng.warp_group_dot %a, %b, %y {inputPrecision = 0 : i32} : tensor<64x16xbf16, #ttg.dot_op<{opIdx = 0}>>
        scf.yield %2 : tensor<64x64xf32, #mma>
      } {tt.num_stages = 3 : i32}
      scf.yield %1 : tensor<64x64xf32, #mma>
    }
    %3 = scf.for %t = %c0 to %n step %c16 iter_args(%m = %z) -> (tensor<64xf32, #blocked>) {
      scf.yield %m : tensor<64xf32, #blocked>
    }
    tt.return
  }"""
    assert kernels._dot_loops(ttgir) == 2
    assert kernels._dot_loops(ttgir.replace("ttng.warp_group_dot", "arith.addf")) == 0


def test_static_check_reports_each_missed_target():
    good = dict(net="n", conv="3x3 g8 128->128 @14x14", c_out=128, kernel="conv2d_kernel", config="c", programs=196,
                elements=2**21, spills=0, mma="HGMMA.64x64x16.F32.BF16", loops=1, pipelined=True)
    assert kernels.static_check([good]) == []
    bad = [dict(good, spills=8), dict(good, programs=100), dict(good, mma="HGMMA.64x16x16.F32.BF16"),
           dict(good, loops=2), dict(good, pipelined=False)]
    assert [len(kernels.static_check([row])) for row in bad] == [1, 1, 1, 1, 1]
    narrow_layer = dict(good, conv="3x3 g2 32->32 @56x56", c_out=32, mma="HGMMA.64x32x16.F32.BF16")
    assert kernels.static_check([narrow_layer]) == []  # the whole layer is 32 wide
