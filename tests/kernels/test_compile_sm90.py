"""Ahead-of-time compile of the Triton kernels (kernels/conv.py, kernels/batch_norm.py) for an H100, without a GPU.

`triton.compile` runs the whole pipeline (Triton IR -> TTGIR -> LLVM -> PTX -> ptxas cubin) for
target sm_90, so a kernel that only breaks in the real compiler (the interpreter accepts far more:
layouts, tl.dot shapes, dtypes of loop-carried values, shared memory) fails here, on the CPU CI.

Every value of every constexpr flag is compiled at least once (not their product), with the launch
specialization the JIT would use (pointers 16-byte aligned, ints divisible by 16 marked so, ints equal
to 1 and absent (None) pointers constexpr), each case with the largest or the smallest of the autotune
configs that the kernel's own pruning keeps for the case's shape:
  conv: dot / direct, prologue on / off, stats on / off (its combine in one level and in two), int64 on /
        off, fp32 (tf32 and ieee) / bf16 / fp16;
  batch_norm: each of its four kernels in NCHW and in channels_last, with representative flags.
Checks: the compile succeeds, shared memory fits the 227 KB an H100 block may use, the tl.dot path
runs on tensor cores (wgmma / mma in the PTX, HGMMA / HMMA in the SASS where cuobjdump is there) and
the direct path and the exact-fp32 dot do not.

The compiles run in subprocesses that import fresh copies of the kernel modules with TRITON_INTERPRET
unset (conftest sets it on machines without a GPU, and Triton reads it when a kernel is decorated),
two at a time, against a fresh Triton cache. Skipped only when Triton's ptxas cannot be found.
"""
import inspect
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

SMEM_LIMIT = 227 * 1024  # opt-in shared memory per block on sm_90
WORKERS = 2
WORKER_TIMEOUT_S = 300
# Pointer arguments in the input dtype; every other pointer is a per-channel vector / buffer in acc dtype.
DATA_POINTERS = {"x_ptr", "w_ptr", "out_ptr", "res_ptr", "grad_ptr", "grad_x_ptr", "grad_res_ptr"}
INT32_POINTERS = {"counter_ptr"}  # the reductions' arrival counters (kernels/_arrival.py)


# ---------------------------------------------------------------------------------------------------------------
# The cases: plain data, shipped to the worker as JSON
# ---------------------------------------------------------------------------------------------------------------


def _conv(dtype, shape, config, mma, prologue=False, in_relu=False, bias=True, relu=False, stats=False,
          precision="tf32", residual=False):
    """The conv2d launches for x (n, c_in, *hw), a k x k kernel, stride, padding and groups, with the largest or
    the smallest of the candidate configs; the worker compiles them from `conv.launch_plan`."""
    n, c_in, (h, w), c_out, k, stride, pad, groups = shape
    problem = dict(n=n, c_in=c_in, h=h, w=w, c_out=c_out, kh=k, kw=k, stride=(stride, stride), padding=(pad, pad),
                   dilation=(1, 1), groups=groups, dtype=dtype, has_bias=bias, has_scale=prologue, has_shift=prologue,
                   in_relu=in_relu, relu=relu, stats=stats, has_residual=residual, has_res_scale=residual,
                   has_res_shift=residual, tf32=precision == "tf32")
    return dict(module="conv", problem=problem, config=config, mma=mma)


CONV_CASES = {
    # tl.dot path. The bf16 largest-tile cases are the tensor-core and shared-memory checks of the brief.
    "conv-dot-bf16-largest-bias-relu": _conv("bf16", (8, 64, (56, 56), 64, 3, 1, 1, 1), "largest", True, relu=True),
    "conv-dot-bf16-largest-prologue-stats": _conv(  # one-level statistics combine
        "bf16", (8, 128, (28, 28), 128, 3, 1, 1, 1), "largest", True, prologue=True, in_relu=True, stats=True),
    "conv-dot-bf16-largest-width16-stats": _conv(  # several groups per tile: block-diagonal weights
        "bf16", (8, 128, (28, 28), 128, 3, 1, 1, 8), "largest", True, stats=True),
    "conv-dot-fp32-tf32-largest-1x1": _conv("fp32", (8, 64, (56, 56), 256, 1, 1, 0, 1), "largest", True, bias=False),
    "conv-dot-bf16-largest-1x1-residual-relu": _conv(  # inference conv_bn_add_relu: the BN'd shortcut added
        "bf16", (8, 64, (56, 56), 256, 1, 1, 0, 1), "largest", True, relu=True, residual=True),
    "conv-dot-fp16-smallest-7x7-prologue-int64": _conv(
        "fp16", (40, 16, (2048, 2048), 16, 7, 2, 3, 1), "smallest", True, prologue=True),
    "conv-dot-fp32-ieee-smallest-stats": _conv(  # exact fp32: FMA, no tensor cores
        "fp32", (8, 32, (56, 56), 32, 3, 2, 1, 2), "smallest", False, stats=True, precision="ieee"),
    # direct (CUDA-core) path: depthwise (C_in_g = 1, a constexpr after specialization), narrow groups, stem
    "conv-direct-fp16-largest-depthwise-prologue-stats-int64": _conv(  # two-level combine
        "fp16", (8, 32, (3000, 3000), 32, 3, 1, 1, 32), "largest", False, prologue=True, in_relu=True, stats=True),
    "conv-direct-bf16-smallest-width8": _conv("bf16", (8, 64, (28, 28), 64, 3, 2, 1, 8), "smallest", False,
                                              bias=False),
    "conv-direct-fp16-largest-width8-residual-relu": _conv(
        "fp16", (8, 64, (28, 28), 64, 3, 1, 1, 8), "largest", False, relu=True, residual=True),
    "conv-direct-fp32-largest-stem7x7-prologue-relu": _conv(
        "fp32", (8, 3, (224, 224), 32, 7, 2, 3, 1), "largest", False, prologue=True, relu=True),
}

_FLAGS = ("HAS_SCALE", "HAS_SHIFT", "HAS_RES", "HAS_RES_SCALE", "HAS_RES_SHIFT")
_FLAG_POINTERS = dict(zip(_FLAGS, ("scale_ptr", "shift_ptr", "res_ptr", "res_scale_ptr", "res_shift_ptr"), strict=True))


def _bn(kernel, dtype, shape, fmt, config, int64=False, relu=True, flags=_FLAGS, none=(), **constexprs):
    """A batch_norm kernel compile on an (N, C, H, W) tensor in `fmt`; the worker derives the view's ints as
    the launcher does. Pointers of absent optional tensors are None, as the launchers pass them."""
    flag_values = {f: f in flags for f in _FLAGS} if kernel != "_bn_stats_kernel" else {}
    if kernel != "_bn_stats_kernel":
        constexprs = dict(flag_values, RELU=relu, **constexprs)
    none = list(none) + [_FLAG_POINTERS[f] for f, on in flag_values.items() if not on]
    return dict(module="batch_norm", kernel=kernel, dtype=dtype, acc="fp64" if dtype == "fp64" else "fp32",
                view=dict(shape=shape, channels_last=fmt == "nhwc", int64=int64), constexprs=constexprs,
                config=config, none=none, mma=None)


BN_CASES = {
    "bn-stats-nchw-fp32-largest": _bn("_bn_stats_kernel", "fp32", (8, 64, 56, 56), "nchw", "largest"),
    "bn-stats-nhwc-bf16-smallest-int64": _bn("_bn_stats_kernel", "bf16", (8, 24, 112, 112), "nhwc", "smallest",
                                             int64=True),
    "bn-stats-nchw-fp64-odd": _bn("_bn_stats_kernel", "fp64", (3, 17, 9, 11), "nchw", "smallest"),
    "bn-forward-nchw-bf16-largest-all": _bn("_bn_act_forward_kernel", "bf16", (8, 256, 28, 28), "nchw", "largest"),
    "bn-forward-nhwc-fp16-smallest-shift-only-int64": _bn(
        "_bn_act_forward_kernel", "fp16", (8, 152, 14, 14), "nhwc", "smallest", int64=True, relu=False,
        flags=("HAS_SHIFT",)),
    "bn-backward-reduce-nchw-fp32-largest-rhat": _bn(
        "_bn_act_backward_reduce_kernel", "fp32", (8, 64, 56, 56), "nchw", "largest", HAS_RHAT=True),
    "bn-backward-reduce-nhwc-bf16-smallest-identity-int64": _bn(
        "_bn_act_backward_reduce_kernel", "bf16", (8, 128, 28, 28), "nhwc", "smallest", int64=True,
        flags=("HAS_SCALE", "HAS_SHIFT", "HAS_RES"), none=("res_mean_ptr", "res_invstd_ptr", "sum_dz_rhat_ptr"),
        HAS_RHAT=False),
    "bn-backward-elemt-nchw-fp16-largest-train": _bn(
        "_bn_act_backward_elemt_kernel", "fp16", (8, 256, 28, 28), "nchw", "largest", X_TRAIN=True,
        RES_TRAIN=True),
    "bn-backward-elemt-nhwc-bf16-smallest-eval-int64": _bn(
        "_bn_act_backward_elemt_kernel", "bf16", (8, 256, 7, 7), "nhwc", "smallest", int64=True,
        flags=("HAS_SCALE", "HAS_SHIFT"), none=("grad_res_ptr", "res_mean_ptr", "res_invstd_ptr", "mean_dz_ptr",
                                                "mean_dz_xhat_ptr", "mean_dz_rhat_ptr"),
        X_TRAIN=False, RES_TRAIN=False),
}

CASES = {**CONV_CASES, **BN_CASES}

# Grouped convolutions with per-group widths that are not powers of two, beside the models' own
# (n, c_in, size, c_out, kernel, groups): 24 in / 16 out per group (tiles of several groups, K padded to a power of
# two), and RegNetX-8GF's and -32GF's widths 120 and 232 in torchvision (720 and 1392 channels, 6 groups).
NON_POW2_GROUPS = [(128, 48, 28, 32, 3, 2), (128, 96, 14, 64, 3, 4), (128, 72, 28, 48, 3, 3),
                   (128, 720, 7, 720, 3, 6), (128, 1392, 7, 1392, 3, 6)]
MODEL_BATCH = 128


def _model_problems():
    """conv.Problem of each Triton convolution of a training step of every RegNetX preset and ResNet at batch 128
    (channels_last, bf16 and fp32, as `static_launches` records them), and of NON_POW2_GROUPS with the statistics
    epilogue and with the prologue."""
    import dataclasses

    import torch

    from pyfast import models
    from pyfast.benchmarks import kernels
    from pyfast.kernels import conv

    nets = [net for net in models.list_models() if net.startswith(("regnetx_", "resnet"))]
    problems = []
    with pytest.MonkeyPatch.context() as patch:
        for net in nets:
            patch.setitem(kernels.STATIC_NETS, net, kernels.STATIC_NETS.get(net, 3))
            problems += [problem for _, problem in kernels.static_launches(net, MODEL_BATCH)]
    for n, c_in, size, c_out, k, groups in NON_POW2_GROUPS:
        shape = (n, c_in, size, size, c_out, k, k, (1, 1), (k // 2, k // 2), (1, 1), groups, torch.bfloat16)
        problems += [conv.Problem(*shape, stats=True), conv.Problem(*shape, has_scale=True, has_shift=True,
                                                                   in_relu=True, relu=True)]
    return problems + [dataclasses.replace(p, dtype=torch.float32) for p in problems]


def _channel_alignment(problem):
    """The largest power of two dividing every channel count."""
    counts = math.gcd(problem.c_in, problem.c_out, problem.c_in_g, problem.c_out_g)
    return counts & -counts


def _model_cases():
    """One case per distinct kernel configuration (dtype, constexprs, warps, stages) of the default launches of
    `_model_problems`, at its least aligned channel counts (the JIT marks only ints divisible by 16: the others
    load narrower and hold more registers)."""
    import dataclasses

    from pyfast.kernels import conv

    parameters = inspect.signature(conv._conv2d_kernel.fn).parameters  # the interpreter's kernel has no .params
    constexpr_names = [name for name, p in parameters.items() if "constexpr" in str(p.annotation)]
    configurations = {}
    for problem in _model_problems():
        (launch,) = conv.launch_plan(problem)
        constexprs = tuple(launch.args[name] for name in constexpr_names)
        configurations.setdefault((problem.dtype, constexprs, launch.num_warps, launch.num_stages), []).append(problem)
    cases = {}
    for problems in configurations.values():
        problem = min(problems, key=_channel_alignment)
        fields = dataclasses.asdict(problem)
        fields["dtype"] = {v: k for k, v in DTYPES.items()}[str(problem.dtype).removeprefix("torch.")]
        case_id = (f"{problem.kh}x{problem.kw}-g{problem.groups}-{problem.c_in}to{problem.c_out}-{fields['dtype']}"
                   f"-{conv._default_config(problem)}".replace(" ", "-"))
        cases[case_id] = dict(module="conv", problem=fields, config="default", mma=None, uses=len(problems))
    return cases


# ---------------------------------------------------------------------------------------------------------------
# The worker: run as `python test_compile_sm90.py CASES_JSON RESULTS_JSON` with TRITON_INTERPRET unset
# ---------------------------------------------------------------------------------------------------------------


def _pick_config(configs, which, channels_last=None):
    """The largest (most shared memory, then registers) or the smallest tile of the autotune configs left
    after pruning; for batch_norm, among equal sizes the one widest along the contiguous dim."""
    def size(c):
        kw = c.kwargs
        if "BLOCK_K" in kw:  # conv: operand tiles x stages in shared memory, then the accumulator
            smem = (kw["BLOCK_M"] * kw["BLOCK_K"] + kw["BLOCK_K"] * kw["BLOCK_N"]) * c.num_stages
            return (smem, kw["BLOCK_M"] * kw["BLOCK_N"], c.num_warps) if which == "largest" else \
                (kw["BLOCK_M"] * kw["BLOCK_N"] * kw["BLOCK_K"], smem, c.num_warps)
        wide = kw["BLOCK_C"] if channels_last else kw["BLOCK_L"]
        return kw["BLOCK_C"] * kw["BLOCK_L"], wide if which == "largest" else -wide, c.num_warps
    return max(configs, key=size) if which == "largest" else min(configs, key=size)


def _load_module(name, path):
    import importlib.util

    # inside pyfast.kernels, so that the kernels' relative imports (pyfast._flags, pyfast._shapes) resolve
    spec = importlib.util.spec_from_file_location(f"pyfast.kernels._sm90_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _bn_ints(bn, view):
    """G, C, L (+ splits_per_g, chunk) and the layout constexprs, as bn_stats / bn_act_* compute them."""
    n, c, h, w = view["shape"]
    fmt = "channels_last" if view["channels_last"] else "contiguous_format"
    import torch

    # the kernel module's fresh copy imports its shared part as pyfast.kernels._bn_common
    view_of = sys.modules["pyfast.kernels._bn_common"]._View
    v = view_of(getattr(torch, fmt), *((1, c, n * h * w) if view["channels_last"] else (n, c, h * w)), view["int64"])
    (G, C, L), layout = v.args()
    splits_per_g, chunk = v.splits()
    return dict(G=G, C=C, L=L, splits_per_g=splits_per_g, chunk=chunk), layout


def _sass_mma(cubin):
    """'HGMMA' / 'HMMA' if the SASS has tensor-core instructions, '' if not, None without cuobjdump."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True).stdout
    return "HGMMA" if "HGMMA" in sass else "HMMA" if "HMMA" in sass else ""


def _compile_case(modules, case):
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    tl_acc = {"fp32": tl.float32, "fp64": tl.float64}
    module = modules[case["module"]]
    kernel = getattr(module, case["kernel"])
    configs = getattr(kernel, "configs", None)
    fn = kernel
    while not isinstance(fn, JITFunction):
        fn = fn.fn  # Autotuner / Heuristics -> the JITFunction
    constexprs = dict(case["constexprs"])
    ints = dict(case.get("ints", {}))
    if "view" in case:
        view_ints, layout = _bn_ints(module, case["view"])
        ints.update(view_ints)
        if "count" in (p.name for p in fn.params):  # the elementwise backward divides its sums by it
            n, _, h, w = case["view"]["shape"]
            ints["count"] = n * h * w
        constexprs.update(layout, ACC=tl_acc[case["acc"]])
    num_warps, num_stages = 4, 3  # triton.Config / launch defaults
    config = case["config"]
    if config is not None:
        prune = getattr(kernel, "early_config_prune", None)  # the autotuner's own pruning for this shape
        candidates = prune(configs, {**ints, **constexprs}) if prune else configs
        picked = _pick_config(candidates, config, case.get("view", {}).get("channels_last"))
        constexprs.update(picked.kwargs)
        num_warps, num_stages = picked.num_warps, picked.num_stages
        config = dict(picked.kwargs, num_warps=num_warps, num_stages=num_stages)
    signature, constants, attrs = {}, {}, {}
    aligned = [["tt.divisibility", 16]]
    for i, p in enumerate(fn.params):
        name = p.name
        if p.is_constexpr:
            if name not in constexprs:
                raise KeyError(f"case gives no value for {name}")
            signature[name], constants[(i,)] = "constexpr", constexprs.pop(name)
        elif name in case["none"]:
            signature[name], constants[(i,)] = "constexpr", None
        elif name in INT32_POINTERS:
            signature[name] = "*i32"
            attrs[(i,)] = aligned
        elif name.endswith("_ptr"):
            signature[name] = "*" + (case["dtype"] if name in DATA_POINTERS else case["acc"])
            attrs[(i,)] = aligned
        else:
            if name not in ints:
                raise KeyError(f"case gives no value for {name}")
            value = ints.pop(name)
            if value == 1:  # the JIT turns ints equal to 1 into constants
                signature[name], constants[(i,)] = "constexpr", 1
            else:
                signature[name] = "i32" if value < 2**31 else "i64"
                if value % 16 == 0:
                    attrs[(i,)] = aligned
    unused = set(constexprs) - {"CHANNELS_LAST", "INT64", "ALIGN", "ACC"} | set(ints) - {"splits_per_g", "chunk"}
    if unused:
        raise KeyError(f"case values that {fn.__name__} does not take: {sorted(unused)}")
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx = compiled.asm["ptx"]
    return dict(ok=True, seconds=round(time.perf_counter() - start, 2), config=config,
                shared=compiled.metadata.shared, ptx_wgmma="wgmma.mma_async" in ptx,
                ptx_mma="wgmma.mma_async" in ptx or "mma.sync" in ptx,
                sass_mma=_sass_mma(compiled.asm["cubin"]) if case["mma"] is not None else None)


def _conv_config_size(config, which):
    """Operand tiles x stages in shared memory, then the accumulator (largest); the tile volume (smallest)."""
    smem = (config.block_m * config.block_k + config.block_k * config.block_n) * config.num_stages
    tile = config.block_m * config.block_n
    return (smem, tile, config.num_warps) if which == "largest" else (tile * config.block_k, smem, config.num_warps)


def _conv_launch(case):
    """(problem, config, the one launch of the case: the conv, its statistics combine included)."""
    import torch

    from pyfast.kernels import conv

    fields = dict(case["problem"], dtype=getattr(torch, DTYPES[case["problem"]["dtype"]]))
    fields.update(stride=tuple(fields["stride"]), padding=tuple(fields["padding"]), dilation=tuple(fields["dilation"]))
    problem = conv.Problem(**fields)
    if case["config"] == "default":
        config = conv._default_config(problem)
    else:
        pick = max if case["config"] == "largest" else min
        config = pick(conv.candidates(problem), key=lambda c: _conv_config_size(c, case["config"]))
    (launch,) = conv.launch_plan(problem, config)
    return problem, config, launch


def _compile_conv_case(case):
    from pyfast.benchmarks.kernels import compile_sm90

    start = time.perf_counter()
    problem, config, launch = _conv_launch(case)
    result = compile_sm90(launch)
    if problem.int64 != ("int64" in case.get("id", "")):
        raise AssertionError(f"int64 offsets: {problem.int64}")
    return dict(result, ok=True, seconds=round(time.perf_counter() - start, 2), config=str(config),
                group_tile=config.group_tile)


DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _worker(cases_path, results_path):
    import traceback

    assert "TRITON_INTERPRET" not in os.environ
    spec = json.loads(Path(cases_path).read_text())
    modules = {name: _load_module(name, path) for name, path in spec["modules"].items()}
    results = {}
    for case_id, case in spec["cases"].items():
        try:
            if case["module"] == "conv":
                results[case_id] = _compile_conv_case(dict(case, id=case_id))
            else:
                results[case_id] = _compile_case(modules, case)
        except Exception as e:  # noqa: BLE001 - reported per case by the test
            results[case_id] = dict(ok=False, error=f"{type(e).__name__}: {e}"[-4000:],
                                    traceback=traceback.format_exc()[-4000:])
        Path(results_path).write_text(json.dumps(results))  # partial results survive a crash


# ---------------------------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------------------------


def _ptxas_missing():
    """Why Triton cannot assemble for sm_90 here, or None."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        try:
            tool = get_ptxas(90)  # Triton 3.9 assembles sm_90 with its ptxas-blackwell, older ones with ptxas
        except TypeError:  # triton < 3.4: one ptxas, no arch argument
            tool = get_ptxas()
        if tool is None or not Path(tool.path).exists():
            return "Triton's ptxas is missing"
    except Exception as e:  # noqa: BLE001 - no NVIDIA backend, no ptxas
        return f"Triton's ptxas is missing ({type(e).__name__}: {e})"
    return None


def _module_paths():
    import importlib.util

    return {name: importlib.util.find_spec(f"pyfast.kernels.{name}").origin for name in ("conv", "batch_norm")}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{case id: result} of every case, compiled by WORKERS subprocesses with TRITON_INTERPRET unset."""
    return _compile_in_workers(CASES, tmp_path_factory.mktemp("sm90"))


@pytest.fixture(scope="module")
def models_compiled(tmp_path_factory):
    """{case id: result} of every distinct kernel configuration of the models' convolutions (~40, a few minutes)."""
    return _compile_in_workers(_model_cases(), tmp_path_factory.mktemp("sm90-models"), timeout_s=600)


def _compile_in_workers(cases, root, timeout_s=WORKER_TIMEOUT_S):
    reason = _ptxas_missing()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(root / "triton-cache")  # really compile, and leave ~/.triton alone
    ids = list(cases)
    modules = _module_paths()
    procs = []
    for w in range(WORKERS):
        part = {i: cases[i] for i in ids[w::WORKERS]}
        cases_path, results_path = root / f"cases{w}.json", root / f"results{w}.json"
        cases_path.write_text(json.dumps(dict(modules=modules, cases=part)))
        procs.append((subprocess.Popen([sys.executable, __file__, str(cases_path), str(results_path)], env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
                      results_path))
    results, logs = {}, []
    for proc, results_path in procs:
        try:
            out, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        logs.append(f"worker exit {proc.returncode}:\n{out[-4000:]}")
        if results_path.exists():
            results.update(json.loads(results_path.read_text()))
    for case_id in ids:
        results.setdefault(case_id, dict(ok=False, error="the worker died before this case:\n" + "\n".join(logs)))
    return results


@pytest.mark.parametrize("case_id", CASES)
def test_compiles_for_sm90(compiled, case_id):
    result = compiled[case_id]
    assert result["ok"], f"{case_id} does not compile for sm_90:\n{result['error']}\n{result.get('traceback', '')}"
    assert result["shared"] <= SMEM_LIMIT, (
        f"{case_id} ({result['config']}) needs {result['shared']} B of shared memory, > {SMEM_LIMIT} on an H100")
    expected = CASES[case_id]["mma"]
    if CASES[case_id]["module"] == "conv":
        assert (result["mma"] != "-") == expected, f"{case_id}: SASS MMA {result['mma']!r}"
        return
    if expected is not None:
        assert result["ptx_mma"] == expected, (
            f"{case_id}: tensor-core MMA in the PTX is {result['ptx_mma']}, expected {expected}")
        if result["sass_mma"] is not None:
            assert bool(result["sass_mma"]) == expected, f"{case_id}: SASS MMA {result['sass_mma']!r}"


CONV_IDS = [case_id for case_id in CASES if case_id.startswith("conv-")]


def test_conv_cases_compile_both_statistics_combines():
    """Among the statistics cases, one combines in one level and one in two (the kernel's two variants)."""
    two_level = {_conv_launch(CASES[i])[2].args["STATS_TWO_LEVEL"] for i in CONV_IDS if "stats" in i}
    assert two_level == {False, True}


@pytest.mark.parametrize("case_id", CONV_IDS)
def test_conv_does_not_spill(compiled, case_id):
    """The convolution (its statistics epilogue and combine included) does not spill registers."""
    result = compiled[case_id]
    assert result["ok"], result
    assert result["spills"] == 0 and 0 < result["registers"] <= 255, (case_id, result["config"])


def test_model_convolutions_compile_without_spills(models_compiled):
    """Every RegNetX preset's and ResNet's convolution at batch 128 (bf16 and fp32, channels_last) and the grouped
    shapes of NON_POW2_GROUPS: each distinct kernel configuration of their default launches (autotuning off)
    compiles for sm_90, fits in an H100 block's shared memory and does not spill."""
    bad = {case_id: result.get("error") or {k: result[k] for k in ("config", "registers", "spills", "shared")}
           for case_id, result in models_compiled.items()
           if not result["ok"] or result["spills"] != 0 or not 0 < result["registers"] <= 255
           or result["shared"] > SMEM_LIMIT}
    assert not bad, f"{len(bad)} of {len(models_compiled)} configurations:\n" + "\n".join(
        f"{case_id}: {why}" for case_id, why in bad.items())


@pytest.mark.parametrize("case_id", [case_id for case_id in CONV_IDS if CASES[case_id]["mma"]])
def test_dot_main_loop_is_one_pipelined_loop(compiled, case_id):
    """Taps and channel blocks are one software-pipelined loop (asynchronous copies), not a loop per tap."""
    result = compiled[case_id]
    assert result["ok"] and result["loops"] == 1 and result["pipelined"], result


@pytest.mark.parametrize("case_id", ["conv-dot-bf16-largest-bias-relu", "conv-dot-bf16-largest-prologue-stats",
                                     "conv-dot-bf16-largest-width16-stats"])
def test_bf16_dot_uses_wgmma(compiled, case_id):
    """On sm_90 the large bf16 tiles (4 and 8 warps) get Hopper's warpgroup MMA, not Ampere's mma.sync; a tile of
    several 16-wide groups runs an MMA as wide as the tile."""
    result = compiled[case_id]
    assert result["ok"] and result["mma"].startswith("HGMMA."), result
    if result["group_tile"] > 1:
        assert int(result["mma"].split(".")[1].split("x")[1]) == 16 * result["group_tile"], result


if __name__ == "__main__":
    _worker(*sys.argv[1:3])
