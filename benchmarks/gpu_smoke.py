"""The GPU check's correctness smoke (benchmarks/gpu_check.sh, its first step): each fused backend against the
reference before anything is timed, so that a backend computing wrong results is left out of the tables.

Per backend, on one shape per kernel path (the ops of benchmarks/kernels.py: dense 1x1 and 3x3, grouped 3x3
at group width 16 (tensor cores) and 8 (the direct path), the 7x7 stem, the BN+add and pre-activation ops):
  * training forward+backward: output, input gradients and running statistics against the reference backend
    computed in float64 from the same parameters, as relative errors ||out - ref|| / ||ref||;
  * real-size statistics: batch 128 at the layer's real spatial size (the Triton convolution's statistics
    epilogue then combines its partials in two levels), checked through the running statistics;
  * a CUDA graph of the training step, captured after a warm-up and replayed twice with fresh inputs, against
    the same step run eagerly;
  * no arrival counter left non-zero (kernels/_arrival.py) after all of it.
Then each backend's verdict: "ok" when no check failed (a check the time limit skipped fails nothing; the
document says which were skipped).

    python -m pyfast.benchmarks.gpu_smoke --out smoke.json [--tiny] [--time-limit S]
    python -m pyfast.benchmarks.gpu_smoke --passed smoke.json   the backends that passed, for the script
    python -m pyfast.benchmarks.gpu_smoke --stamp               device, versions and date, for the summary

`--tiny` (the dry run on a CPU) shrinks every shape to batch 2 at 8x8 and skips the graphs.
"""
import argparse
import copy
import json
import time

import torch

from . import results, timing
from .kernels import OpCase, fused_backends, op_module
from .workloads import DTYPES, Config

# bf16 against float64: flash-attention's rule of thumb sits near 1e-2; fp32 allows TF32 convolutions.
TOLERANCE = {"bf16": 3e-2, "fp32": 5e-3}


def kernel_path_cases(batch: int, size: int):
    """One op case per kernel path, at batch `batch` and size x size planes."""
    def case(where, op, c_in, c_out=0, kernel=1, stride=1, groups=1, **kw):
        return OpCase("smoke", where, op, batch, c_in, size, size, c_out, kernel, stride, groups, **kw)

    return [case("dense1x1", "conv_bn_relu", 64, 128),
            case("dense3x3", "conv_bn_relu", 64, 64, 3),
            case("gw16", "conv_bn_relu", 128, 128, 3, 1, 8),
            case("gw8-s2", "conv_bn_relu", 64, 64, 3, 2, 8),
            case("stem7x7", "conv_bn_relu", 3, 32, 7, 2),
            case("residual", "conv_bn_add_relu", 64, 128),
            case("bn-add-proj", "bn_add_relu", 128, shortcut_bn=True),
            case("preact3x3", "bn_relu_conv", 64, 64, 3),
            case("add", "add_relu", 64)]


def real_size_case(batch: int, size: int):
    """RegNetX-32's first stage: 32 channels at 56x56, group width 16, batch 128."""
    return OpCase("smoke", "real-size", "conv_bn_relu", batch, 32, size, size, 32, 3, 1, 2)


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _run(module, inputs, grad):
    """Output, input gradients and the BN running statistics after one training forward+backward."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = module(*inputs)
    out.backward(grad)
    stats = [b for name, b in module.named_buffers() if "running" in name]
    return [out.detach()] + [t.grad for t in inputs] + [s.detach().clone() for s in stats]


def check_against_reference(case: OpCase, backend: str, config: Config) -> float:
    """The largest relative error of the backend's training step against the float64 reference."""
    module = op_module(case, backend, config)
    reference = copy.deepcopy(module).double()
    reference.backend = "reference"
    dtype = DTYPES[config.dtype]
    inputs = [torch.randn(*s, device=config.device, dtype=dtype).contiguous(memory_format=config.memory_format)
              for s in case.input_shapes()]
    grad = torch.randn(*case.output_shape(), device=config.device, dtype=dtype).contiguous(
        memory_format=config.memory_format)
    got = _run(module, inputs, grad)
    expected = _run(reference, [t.double() for t in inputs], grad.double())
    return max(_relative_error(g, e) for g, e in zip(got, expected))


def check_graph_replay(case: OpCase, backend: str, config: Config) -> float:
    """The largest relative error of two replays of the captured training step against the step run eagerly."""
    module = op_module(case, backend, config)
    twin = copy.deepcopy(module)
    dtype = DTYPES[config.dtype]
    make = lambda shape: torch.randn(*shape, device=config.device, dtype=dtype).contiguous(  # noqa: E731
        memory_format=config.memory_format)
    static = [make(s) for s in case.input_shapes()]
    grad = make(case.output_shape())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles, caches
        for _ in range(2):
            _run(module, static, grad)
            _run(twin, static, grad)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _run(module, static, grad)
    worst = 0.0
    for _ in range(2):
        for t in static:
            t.copy_(torch.randn_like(t))
        graph.replay()
        expected = _run(twin, static, grad)
        torch.cuda.synchronize()
        worst = max([worst] + [_relative_error(g, e) for g, e in zip(captured, expected)])
    return worst


def run(tiny: bool, time_limit: float) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = device == "cuda"
    dtype = "bf16" if gpu else "fp32"
    config = Config("train_step", dtype, "channels_last", device)
    batch, size = (2, 8) if tiny else (8, 28)
    checks = [("path " + c.where, check_against_reference, c) for c in kernel_path_cases(batch, size)]
    checks.append(("real-size statistics", check_against_reference,
                   real_size_case(2, 8) if tiny else real_size_case(128, 56)))
    if gpu:
        checks.append(("graph replay x2", check_graph_replay, kernel_path_cases(batch, size)[2]))
    start = time.monotonic()
    doc = {"env": results.stamp(timing.environment(device)), "dtype": dtype, "tolerance": TOLERANCE[dtype],
           "backends": {}}
    for backend in fused_backends(device):
        checks_done = []
        for name, check, case in checks:
            entry = {"check": name, "case": case.name}
            if time.monotonic() - start > time_limit:
                entry["skipped"] = "time limit"
            else:
                try:
                    entry["error"] = check(case, backend, config)
                    entry["ok"] = entry["error"] <= TOLERANCE[dtype]
                except Exception as error:  # noqa: BLE001 - a failing backend is the finding, not a crash
                    entry.update(ok=False, exception=f"{type(error).__name__}: {error}".splitlines()[0][:300])
            checks_done.append(entry)
            print(f"{backend:8} {name:22} {entry.get('error', entry.get('exception', entry.get('skipped')))}",
                  flush=True)
        doc["backends"][backend] = {"ok": all(c.get("ok", True) for c in checks_done),
                                    "complete": not any("skipped" in c for c in checks_done), "checks": checks_done}
    from pyfast.kernels import _arrival

    stuck = _arrival.stuck_counters() if gpu else []
    doc["stuck_counters"] = [str(key) for key in stuck]
    if stuck:
        for entry in doc["backends"].values():
            entry["ok"] = False
    doc["wall_s"] = round(time.monotonic() - start, 1)
    return doc


def passed(path: str) -> list:
    """The backends a smoke document passes; none when there is no document (the smoke did not finish)."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        return []
    return [backend for backend, entry in doc["backends"].items() if entry["ok"]]


def stamp_line() -> str:
    env = timing.environment("cuda" if torch.cuda.is_available() else "cpu")
    return " | ".join([f"device: {env['device']}", f"torch {env['torch']}", f"triton {env['triton']}",
                       f"CUDA {env['cuda']}", env["date"]])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pyfast.benchmarks.gpu_smoke", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--out", help="run the smoke, writing this JSON file")
    what.add_argument("--passed", metavar="SMOKE_JSON", help="print the backends that passed")
    what.add_argument("--stamp", action="store_true", help="print device, versions and date")
    parser.add_argument("--tiny", action="store_true", help="batch 2 at 8x8, no graphs (the dry run on a CPU)")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds; later checks are skipped")
    args = parser.parse_args(argv)
    if args.passed:
        print(" ".join(passed(args.passed)))
        return
    if args.stamp:
        print(stamp_line())
        return
    doc = run(args.tiny, args.time_limit)
    results.write_json(doc, args.out)
    ok = [b for b, entry in doc["backends"].items() if entry["ok"]]
    print(f"smoke: {', '.join(ok) or 'no backend'} passed; {doc['wall_s']} s; stuck counters: "
          f"{doc['stuck_counters'] or 'none'}")


if __name__ == "__main__":
    main()
