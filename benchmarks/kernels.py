"""Per-op kernel timings: each fused op on each backend against its eager sequence (`backend="reference"`),
on the shapes of RegNetX-32's stages (FashionMNIST 1x224x224, group width 16) and ResNet-50's
(ImageNet 3x224x224) at batch 128.

For each case: median time (p20-p80), the ratio to eager, and against the measured ceilings the
achieved GB/s (as a fraction of the device-to-device copy bandwidth) for the BN/elementwise ops and
TFLOP/s (as a fraction of the matmul rate in that dtype) for the ops that convolve, plus the roofline
fraction max(FLOPs/rate, bytes/bandwidth) / time. Bytes are the fewest an op must move: each input and
weight read once and each output written once, forward; fwd+bwd (`train_step`) adds the output
gradient read, the inputs re-read and their gradients written (3 A + 2 O + 3 W).

    python -m pyfast.benchmarks.kernels [--dtype bf16 fp32] [--modes inference train_step] [--out f.json]

`--static` needs no GPU: it lists every Triton convolution launch of a RegNetX-32 and a ResNet-50
training step (batch 128, bf16, channels_last; `static_launches`) with its config, grid, elements
touched and, from an sm_90 ahead-of-time compile with Triton's bundled ptxas, registers, spills,
shared memory, MMA instruction and the loops of its main body (`compile_sm90`).

    python -m pyfast.benchmarks.kernels --static [--nets regnetx_32] [--batch-size 128] [--image-size 224]
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List

import torch
from torch import nn

from pyfast._shapes import conv_output_size

from . import results, timing
from .workloads import DTYPES, MODES, Config, compiled, make_step

OPS = ("conv_bn_relu", "bn_add_relu", "conv_bn_add_relu", "add_relu", "bn_relu_conv")


@dataclass(frozen=True)
class OpCase:
    """One op at one shape: x is (n, c_in, h, w); convolving ops map c_in -> c_out with a k x k kernel."""
    net: str
    where: str
    op: str
    n: int
    c_in: int
    h: int
    w: int
    c_out: int = 0
    kernel: int = 1
    stride: int = 1
    groups: int = 1
    shortcut_bn: bool = False

    @property
    def convolves(self) -> bool:
        return self.op in ("conv_bn_relu", "conv_bn_add_relu", "bn_relu_conv")

    @property
    def padding(self) -> int:
        """Same-size padding of the (odd) kernel, as the models' convolutions have it."""
        return (self.kernel - 1) // 2

    @property
    def name(self) -> str:
        if self.convolves:
            group = f" g{self.groups}" if self.groups > 1 else ""
            stride = f" s{self.stride}" if self.stride > 1 else ""
            what = f"{self.kernel}x{self.kernel}{group}{stride} {self.c_in}->{self.c_out}"
        else:
            what = f"{self.c_in}{' proj' if self.shortcut_bn else ''}"
        return f"{self.net}.{self.where} {self.op} {what} @{self.h}x{self.w}"

    def input_shapes(self) -> List[tuple]:
        x = (self.n, self.c_in, self.h, self.w)
        if self.op == "conv_bn_add_relu":
            return [x, self.output_shape()]  # the shortcut is added to the convolution's output
        return [x] if self.convolves else [x, x]

    def output_shape(self) -> tuple:
        if not self.convolves:
            return (self.n, self.c_in, self.h, self.w)
        return (self.n, self.c_out, *conv_output_size(self.h, self.w, self.kernel, self.stride, self.padding))

    def flops(self, mode: str) -> int:
        """Convolution FLOPs (2 per multiply-add); fwd+bwd adds the input and weight gradients (3x)."""
        if not self.convolves:
            return 0
        n, c, h, w = self.output_shape()
        forward = 2 * n * c * h * w * (self.c_in // self.groups) * self.kernel ** 2
        return forward * (3 if mode == "train_step" else 1)

    def min_bytes(self, mode: str, dtype: torch.dtype) -> int:
        size = torch.empty((), dtype=dtype).element_size()
        numel = lambda shape: int(torch.Size(shape).numel())  # noqa: E731
        a = sum(numel(s) for s in self.input_shapes()) * size
        o = numel(self.output_shape()) * size
        w = self.c_out * (self.c_in // self.groups) * self.kernel ** 2 * size if self.convolves else 0
        return 3 * a + 2 * o + 3 * w if mode == "train_step" else a + o + w


def regnetx_32_cases(batch: int = 128, image: int = 224) -> List[OpCase]:
    """RegNetX-32 (stem 32, widths 32/80/128/256, group width 16, bottleneck 1): the stem and each
    stage's stride-1 block (1x1, grouped 3x3, BN+add+ReLU), its projection shortcut, an add+ReLU."""
    cases = [OpCase("regnetx_32", "stem", "conv_bn_relu", batch, 1, image, image, 32, 3, 2)]
    size = image // 2
    for stage, width in enumerate((32, 80, 128, 256), 1):
        size = (size + 1) // 2
        where = f"s{stage}"
        cases += [OpCase("regnetx_32", where, "conv_bn_relu", batch, width, size, size, width, 1),
                  OpCase("regnetx_32", where, "conv_bn_relu", batch, width, size, size, width, 3, 1, width // 16),
                  OpCase("regnetx_32", where, "bn_add_relu", batch, width, size, size),
                  OpCase("regnetx_32", where, "bn_add_relu", batch, width, size, size, shortcut_bn=True),
                  OpCase("regnetx_32", where, "conv_bn_add_relu", batch, width, size, size, width, 1),
                  OpCase("regnetx_32", where, "add_relu", batch, width, size, size)]
    return cases


def resnet50_cases(batch: int = 128, image: int = 224) -> List[OpCase]:
    """ResNet-50 (bottleneck widths 64/128/256/512, x4 out): the 7x7 stem and each stage's stride-1
    bottleneck (1x1 reduce, 3x3, BN+add+ReLU), and the pre-activation block's BN+ReLU+conv pair."""
    cases = [OpCase("resnet50", "stem", "conv_bn_relu", batch, 3, image, image, 64, 7, 2)]
    size = (image // 2 + 1) // 2  # stem stride 2, max-pool stride 2
    for stage, mid in enumerate((64, 128, 256, 512), 1):
        where, out = f"s{stage}", 4 * mid
        cases += [OpCase("resnet50", where, "conv_bn_relu", batch, out, size, size, mid, 1),
                  OpCase("resnet50", where, "conv_bn_relu", batch, mid, size, size, mid, 3),
                  OpCase("resnet50", where, "bn_add_relu", batch, out, size, size),
                  OpCase("resnet50", where, "conv_bn_add_relu", batch, mid, size, size, out, 1),
                  OpCase("resnet50", where, "bn_relu_conv", batch, out, size, size, mid, 1),
                  OpCase("resnet50", where, "bn_relu_conv", batch, mid, size, size, mid, 3)]
        size = (size + 1) // 2
    return cases


NETS = {"regnetx_32": regnetx_32_cases, "resnet50": resnet50_cases}


class OpModule(nn.Module):
    """One fused op with its own parameters, called through `pyfast.ops` with a fixed backend
    (`reference` is the eager sequence the op replaces)."""

    def __init__(self, case: OpCase, backend: str):
        super().__init__()
        self.case, self.backend = case, backend
        channels = case.c_in if case.op == "bn_relu_conv" else case.c_out or case.c_in
        self.bn = nn.BatchNorm2d(channels) if case.op != "add_relu" else None
        self.shortcut_bn = nn.BatchNorm2d(case.c_out or case.c_in) if case.shortcut_bn else None
        if case.convolves:
            self.weight = nn.Parameter(torch.randn(case.c_out, case.c_in // case.groups, case.kernel, case.kernel)
                                       / (case.c_in // case.groups * case.kernel ** 2) ** 0.5)
        for bn in filter(None, (self.bn, self.shortcut_bn)):  # non-trivial affine parameters
            nn.init.uniform_(bn.weight, 0.5, 1.5)
            nn.init.uniform_(bn.bias, -0.5, 0.5)

    def _bn_args(self, bn: nn.BatchNorm2d) -> tuple:
        return bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked, self.training

    def forward(self, x, other=None):
        from pyfast import ops

        c, backend = self.case, self.backend
        if c.op == "conv_bn_relu":
            return ops.conv_bn_relu(x, self.weight, None, *self._bn_args(self.bn), stride=c.stride,
                                    padding=c.padding, groups=c.groups, backend=backend)
        if c.op == "bn_relu_conv":
            return ops.bn_relu_conv(x, *self._bn_args(self.bn), weight=self.weight, stride=c.stride,
                                    padding=c.padding, groups=c.groups, backend=backend)
        if c.op == "add_relu":
            return ops.add_relu(x, other, backend=backend)
        shortcut_bn = None
        if self.shortcut_bn is not None:
            s = self.shortcut_bn
            shortcut_bn = ops.BatchNormArgs(s.weight, s.bias, s.running_mean, s.running_var, s.num_batches_tracked)
        if c.op == "conv_bn_add_relu":
            return ops.conv_bn_add_relu(x, self.weight, None, *self._bn_args(self.bn), stride=c.stride,
                                        padding=c.padding, groups=c.groups, shortcut=other, shortcut_bn=shortcut_bn,
                                        backend=backend)
        return ops.bn_add_relu(x, *self._bn_args(self.bn), shortcut=other, shortcut_bn=shortcut_bn, backend=backend)


def fused_backends(device) -> List[str]:
    """The fused backends worth timing on `device` (the Triton interpreter on a CPU is not)."""
    return ["cuda", "triton"] if torch.device(device).type == "cuda" else ["cpu"]


def op_inputs(case: OpCase, config: Config):
    """A maker of one input set: the op's random activations (requiring grad in training, as inside a
    network), then a random output gradient."""
    dtype = DTYPES[config.dtype]

    def make():
        tensors = [torch.randn(*s, device=config.device, dtype=dtype).contiguous(memory_format=config.memory_format)
                   .requires_grad_(config.training) for s in case.input_shapes()]
        grad = torch.randn(*case.output_shape(), device=config.device, dtype=dtype)
        return tensors + [grad.contiguous(memory_format=config.memory_format)]

    return make


def op_module(case: OpCase, backend: str, config: Config) -> nn.Module:
    """The op's module in the config's dtype (ops take low-precision tensors directly: no autocast;
    BN parameters stay float32 as in a network under autocast)."""
    module = OpModule(case, backend).to(config.device).train(config.training)
    if case.convolves:
        module.weight.data = module.weight.data.to(DTYPES[config.dtype]).contiguous(
            memory_format=config.memory_format)
    return module


def op_step(case: OpCase, backend: str, config: Config, compile: bool = False):
    """`step(*inputs, grad)` of the op in the config's mode: no autocast (the tensors are already in
    the config's dtype) and, in training, forward + `torch.autograd.grad` (no optimizer)."""
    module = op_module(case, backend, config)
    return make_step(compiled(module) if compile else module, config, optimizer=False, autocast=False)


def time_case(case: OpCase, config: Config, backends: List[str], ceil: timing.Ceilings, **measure_args) -> dict:
    """One row: every backend's Measurement (or the reason it could not run) and the derived rates."""
    dtype = DTYPES[config.dtype]
    sets = timing.random_input_sets(op_inputs(case, config), config.device)
    flops, nbytes = case.flops(config.mode), case.min_bytes(config.mode, dtype)
    rate = ceil.matmul_tflops.get(config.dtype) if ceil else None
    row = {"case": case.name, **asdict(case), "mode": config.mode, "dtype": config.dtype, "layout": config.layout,
           "flops": flops, "min_bytes": nbytes, "backends": {}}
    flush = timing.l2_flusher(config.device)
    for backend in backends:
        try:
            m = timing.measure(op_step(case, backend, config), sets, config.device, flush=flush, **measure_args)
        except Exception as error:  # noqa: BLE001 - a backend that cannot run (or fails) must not stop the others
            row["backends"][backend] = {"error": f"{type(error).__name__}: {error}".splitlines()[0][:200]}
            continue
        seconds = m.median_ms * 1e-3
        entry = m.as_dict()
        entry["gbps"] = nbytes / seconds / 1e9
        entry["bandwidth_fraction"] = entry["gbps"] / ceil.copy_gbps if ceil else None
        entry["tflops"] = flops / seconds / 1e12 if flops else None
        entry["tflops_fraction"] = entry["tflops"] / rate if flops and rate else None
        if ceil:
            floor_s = max(flops / (rate * 1e12) if flops and rate else 0.0, nbytes / (ceil.copy_gbps * 1e9))
            entry["roofline_fraction"] = floor_s / seconds
        row["backends"][backend] = entry
    eager = row["backends"].get("reference", {}).get("median_ms")
    for entry in row["backends"].values():
        if eager and "median_ms" in entry:
            entry["speedup_vs_eager"] = eager / entry["median_ms"]
    return row


# -- the static table: Triton conv launches of a training step, compiled for sm_90 without a GPU ------------

STATIC_NETS = {"regnetx_32": 1, "resnet50": 3}  # model name -> input planes


def static_launches(net: str, batch: int = 128, image: int = 224, dtype: torch.dtype = torch.bfloat16):
    """[(layer name, conv.Problem)] of each Triton convolution of `net`'s training forward, in order.

    The model runs on the meta device with a kit that records, for each fused step, the convolution the
    Triton backend launches for it in training: conv_bn_relu and conv_bn_add_relu (a block's last convolution)
    convolve with the statistics epilogue, bn_relu_conv with the scale/shift/ReLU prologue; plain convolutions
    (projections) and the backward go through ATen.
    """
    from pyfast import models
    from pyfast.kernels import conv
    from pyfast.models.layers import EagerKit, set_fused

    problems = []

    class Recorder(EagerKit):
        def _record(self, x, layer, **flags):
            problems.append((names[id(layer)], conv.Problem(
                *x.shape, layer.out_channels, *layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                layer.groups, x.dtype, has_bias=layer.bias is not None, **flags)))

        def conv_bn_relu(self, x, layer, bn, relu=True):
            self._record(x, layer, stats=True)
            return super().conv_bn_relu(x, layer, bn, relu)

        def conv_bn_add_relu(self, x, layer, bn, shortcut, shortcut_bn=None, relu=True):
            self._record(x, layer, stats=True)
            return super().conv_bn_add_relu(x, layer, bn, shortcut, shortcut_bn, relu)

        def bn_relu_conv(self, x, bn, layer):
            self._record(x, layer, has_scale=True, has_shift=True, in_relu=True)
            return super().bn_relu_conv(x, bn, layer)

    with torch.device("meta"):
        model = models.create(net, in_chans=STATIC_NETS[net]).to(dtype=dtype, memory_format=torch.channels_last)
        names = {id(m): name for name, m in model.named_modules()}
        set_fused(model.train(), Recorder())
        model(torch.empty(batch, STATIC_NETS[net], image, image, dtype=dtype).contiguous(
            memory_format=torch.channels_last))
    return problems


def _triton_tool(name: str) -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def _ptxas_sm90() -> Path:
    """The ptxas Triton assembles sm_90 with: its bundled `ptxas` up to Triton 3.8, `ptxas-blackwell` from 3.9
    (whose PTX, version 9.x, the older one refuses)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return Path(get_ptxas(90).path)


def _signature(fn, args: dict):
    """Triton's (signature, constexprs, attrs) for a launch's arguments as the JIT specializes them: pointers
    16-byte aligned, ints equal to 1 and absent pointers constant, ints divisible by 16 marked so."""
    _names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32"}
    signature, constants, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        value = args[p.name]
        if p.is_constexpr or value is None or value == 1 and isinstance(value, int):
            signature[p.name], constants[(i,)] = "constexpr", value
        elif isinstance(value, torch.dtype):
            signature[p.name], attrs[(i,)] = "*" + _names[value], [["tt.divisibility", 16]]
        else:
            signature[p.name] = "i32" if abs(value) < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constants, attrs


def compile_sm90(launch) -> dict:
    """Compile a `conv.Launch` (arguments as dtypes) for sm_90; its resources as ptxas reports them, the
    SASS's MMA instruction and the scf.for loops of its pipelined Triton GPU IR that hold the tl.dot (the
    statistics combine's loops do not count). Needs TRITON_INTERPRET unset."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = launch.kernel
    compiled = triton.compile(ASTSource(fn, *_signature(fn, launch.args)), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=launch.num_warps, num_stages=launch.num_stages))
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        ptx.write_text(compiled.asm["ptx"])
        cubin.write_bytes(compiled.asm["cubin"])
        arch = re.search(r"\.target\s+(\S+)", compiled.asm["ptx"]).group(1)
        info = subprocess.run([str(_ptxas_sm90()), "-v", f"--gpu-name={arch}", str(ptx), "-o", os.devnull],
                              capture_output=True, text=True).stderr
        sass = subprocess.run([str(_triton_tool("cuobjdump")), "-sass", str(cubin)], capture_output=True,
                              text=True).stdout
    registers, spills = (re.search(pattern, info) for pattern in (r"Used (\d+) registers", r"(\d+) bytes spill stores"))
    if not (registers and spills):
        raise RuntimeError(f"ptxas -v printed no resource report for {fn.__name__}:\n{info[-2000:]}")
    mma = re.search(r"\b(HGMMA\.\S+?|HMMA\.\S+?)[ ,;]", sass)
    ttgir = compiled.asm["ttgir"]
    return dict(registers=int(registers.group(1)), spills=int(spills.group(1)),
                shared=compiled.metadata.shared, mma=mma.group(1) if mma else "-", loops=_dot_loops(ttgir),
                pipelined="async_copy" in ttgir or "async_wait" in ttgir)


def _dot_loops(ttgir: str) -> int:
    """How many scf.for loops of the Triton GPU IR hold a tl.dot (a loop nested in another counts too)."""
    holds_dot, open_regions = [], []  # per loop; per open brace, its loop's index or None
    for line in ttgir.splitlines():
        if "tt.dot " in line or "warp_group_dot " in line:
            for loop in open_regions:
                if loop is not None:
                    holds_dot[loop] = True
        opens_loop = "scf.for" in line and line.rstrip().endswith("{")  # its last brace opens the body
        left = line.count("{")
        for ch in line:
            if ch == "{":
                left -= 1
                if opens_loop and left == 0:
                    holds_dot.append(False)
                open_regions.append(len(holds_dot) - 1 if opens_loop and left == 0 else None)
            elif ch == "}":
                open_regions.pop()
    return sum(holds_dot)


def _compile_key(launch):
    """Launches that compile to the same binary: the constexprs, the int specialization and the options."""
    sig, constants, attrs = _signature(launch.kernel, launch.args)
    return (launch.kernel.__name__, tuple(sorted(sig.items())), tuple(sorted(constants.items(), key=str)),
            tuple(sorted(attrs)), launch.num_warps, launch.num_stages)


def static_rows(nets, batch: int = 128, image: int = 224, compile: bool = True) -> List[dict]:
    """One row per distinct Triton launch of each net's training step (identical launches counted)."""
    from pyfast.kernels import conv

    rows, binaries = {}, {}
    for net in nets:
        for layer, problem in static_launches(net, batch, image):
            for launch in conv.launch_plan(problem):
                kernel = launch.kernel.__name__.strip("_")
                what = (f"{problem.kh}x{problem.kw}" + (f" g{problem.groups}" if problem.groups > 1 else "")
                        + (f" s{problem.stride[0]}" if problem.stride[0] > 1 else "")
                        + f" {problem.c_in}->{problem.c_out} @{problem.h}x{problem.w}")
                key = (net, what, kernel, launch.config, launch.grid)
                if key in rows:
                    rows[key]["count"] += 1
                    continue
                compile_key = _compile_key(launch) if compile else None
                if compile and compile_key not in binaries:
                    binaries[compile_key] = compile_sm90(launch)
                rows[key] = dict(net=net, layer=layer, conv=what, c_out=problem.c_out, kernel=kernel,
                                 config=launch.config,
                                 grid=launch.grid, programs=launch.grid[0] * launch.grid[1] * launch.grid[2],
                                 elements=launch.elements, count=1, **binaries.get(compile_key, {}))
    return list(rows.values())


def static_table(rows: List[dict]) -> str:
    columns = ("net", "conv", "kernel", "config", "grid", "programs", "elements", "count", "registers", "spills",
               "shared", "mma", "loops", "pipelined")
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths))  # noqa: E731
    return "\n".join([line(columns)] + [line(row) for row in cells])


def static_check(rows: List[dict]) -> List[str]:
    """Where the rows miss issue 14's targets: spills, launches of >= 2**20 elements on fewer programs than
    SMs, MMA narrower than 64 at group width 16, a tl.dot main loop that is not one pipelined loop."""
    from pyfast.kernels import conv

    misses = []
    for r in rows:
        where = f"{r['net']} {r['conv']} {r['kernel']} {r['config']}"
        if r.get("spills"):
            misses.append(f"{where}: {r['spills']} bytes of spills")
        if r["elements"] >= 2**20 and r["programs"] < conv._SMS:
            misses.append(f"{where}: {r['programs']} programs for {r['elements']} elements")
        if " g" in r["conv"] and "HGMMA" in r.get("mma", "") and _mma_n(r["mma"]) < min(64, r["c_out"]):
            misses.append(f"{where}: MMA {r['mma']} narrower than 64 (or the layer's {r['c_out']} channels)")
        if r.get("mma", "-") != "-" and (r.get("loops") != 1 or not r.get("pipelined")):
            misses.append(f"{where}: {r.get('loops')} loops, pipelined {r.get('pipelined')}")
    return misses


def _mma_n(instruction: str) -> int:
    """N of a Hopper MMA instruction such as HGMMA.64x128x16.F32.BF16."""
    return int(instruction.split(".")[1].split("x")[1])


def static_main(args: argparse.Namespace) -> List[dict]:
    batch, image = args.batch_size or 128, args.image_size or 224
    if os.environ.get("TRITON_INTERPRET", "0") == "1":  # the kernels must be decorated for compiling
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        command = [sys.executable, "-m", "pyfast.benchmarks.kernels", "--static", "--nets", *args.nets,
                   "--batch-size", str(batch), "--image-size", str(image)]
        subprocess.run(command, env=env, check=True)
        return []
    rows = static_rows(args.nets, batch, image)
    print(static_table(rows))
    misses = static_check(rows)
    print("\n".join(["targets missed:"] + misses) if misses else "all targets met")
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    gpu = torch.cuda.is_available()
    parser.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    parser.add_argument("--modes", nargs="+", default=["inference", "train_step"], choices=MODES)
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp32"] if gpu else ["fp32"], choices=list(DTYPES))
    parser.add_argument("--layout", nargs="+", default=["channels_last"], choices=["channels_last", "nchw"])
    parser.add_argument("--batch-size", type=int, default=None, help="default 128 on a GPU and with --static, else 2")
    parser.add_argument("--image-size", type=int, default=None, help="default 224 on a GPU and with --static, else 32")
    parser.add_argument("--repeats", type=int, default=50 if gpu else 5)
    parser.add_argument("--time-limit", type=float, default=None, help="seconds; later cases are skipped")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's, or 1 when the CPU is busy)")
    parser.add_argument("--backends", nargs="*", default=None,
                        help="the fused backends to time beside the reference (default: the device's; the GPU "
                             "check leaves out those that failed its correctness smoke)")
    parser.add_argument("--out", default=None, help="JSON file (default: print only)")
    parser.add_argument("--static", action="store_true",
                        help="no timing: the Triton conv launches of a training step compiled for sm_90 "
                             "(batch 128, 224x224 unless given)")


def main(args: argparse.Namespace) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    else:
        timing.choose_cpu_threads(args.threads)
    start = time.monotonic()
    env, ceil = timing.environment(device), timing.ceilings(device)
    gpu = device == "cuda"
    batch, image = args.batch_size or (128 if gpu else 2), args.image_size or (224 if gpu else 32)
    cases = [c for net in args.nets for c in NETS[net](batch, image) if c.op in args.ops]
    backends = ["reference"] + [b for b in fused_backends(device) if args.backends is None or b in args.backends]
    doc = {"schema": results.KERNELS_SCHEMA, "environment": env, "ceilings": ceil.as_dict(), "rows": [],
           "skipped": []}
    # dtype outermost: under a time limit, the later dtypes (fp32 by default) are what gives way.
    for dtype in args.dtype:
        for case in cases:
            for layout in args.layout:
                for mode in args.modes:
                    config = Config(mode, dtype, layout, device)
                    if args.time_limit is not None and time.monotonic() - start > args.time_limit:
                        doc["skipped"].append(f"{case.name} {mode} {dtype} {layout}: time limit")
                        continue
                    row = time_case(case, config, backends, ceil, warmup=5 if device == "cuda" else 2,
                                    repeats=args.repeats, budget_s=1.0 if device == "cuda" else 0.5)
                    doc["rows"].append({**row, "env": results.stamp(env)})
                    print(results.kernel_row_line(row), flush=True)
                    if args.out:
                        results.write_json(doc, args.out)
    doc["wall_s"] = time.monotonic() - start
    print(results.kernel_table(doc))
    if doc["skipped"]:
        print(f"skipped {len(doc['skipped'])} configurations at the time limit")
    if args.out:
        results.write_json(doc, args.out)
    return doc


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m pyfast.benchmarks.kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    arguments = parser.parse_args()
    static_main(arguments) if arguments.static else main(arguments)
