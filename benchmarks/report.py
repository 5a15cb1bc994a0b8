"""`python -m pyfast bench`: the model families timed with eager PyTorch, torch.compile and pyfast, in
one run on the device present (the GPU if there is one, else the CPU with smaller defaults).

Prints a table (model, mode, dtype, layout, each provider's median ms, pyfast's speedup over each, the
peak-memory ratio pyfast/eager, pyfast's achieved TFLOP/s, the op backends pyfast's dispatcher chose),
and writes a JSON document (`pyfast-results/<device>-<date>.json` under the current directory, or
`--out`) and a PNG chart of the speedups beside it (when matplotlib is installed). The JSON is
rewritten after every row, so an interrupted run keeps what it measured.
"""
import argparse
import datetime
import os
import re
import time
from typing import Callable, Dict, List, Optional

import torch

from pyfast.ops import backends

from . import results, timing, workloads
from .workloads import DTYPES, LAYOUTS, MODES, Config

RESULTS_DIR = "pyfast-results"  # under the current directory, wherever pyfast is installed
GPU_MODELS = ["regnetx_32", "resnet50", "vionet_d", "vionet_c", "vionet_g", "vionet_b", "deresnext", "resnet18",
              "resnet152", "preact_resnet50", "regnetx_400mf", "regnetx_3_2gf"]
# On the CPU the model compiled comes first, so that the time limit can only cut the models after it.
CPU_MODELS = ["vionet_d", "regnetx_32", "deresnext", "resnet18", "resnet50", "preact_resnet50"]
# torch.compile on the CPU (inductor's C++ backend) costs a minute or more per model and mode on a small
# machine: by default only one small model gets it there.
CPU_COMPILE_MODELS = ["vionet_d"]
CPU_NOTE = ("a CPU run: pyfast's GPU backends (cuda, triton) cannot run here, so these rows time the cpu "
            "backend against eager PyTorch on the CPU, a check of the harness and the CPU kernels; the GPU is "
            "pyfast's target")
CPU_COMPILE_NOTE = ("on the CPU torch.compile runs for vionet_d only by default: inductor's C++ compilation "
                    "took 30-50 s per graph for VioNet-d and 54 s / 181 s for RegNetX-32's inference / training "
                    "graphs on this 2-core machine, which for every model and mode would not fit the 10-minute "
                    "default run; --compile compiles every model, --compile-models chooses, --no-compile none")


def _defaults(gpu: bool) -> dict:
    if gpu:
        return dict(models=GPU_MODELS, modes=list(MODES), dtype=["bf16"], layout=["channels_last"], batch_size=128,
                    image_size=224, repeats=30, warmup=5, compile=True, compile_models=None, budget_s=3.0,
                    time_limit=None)
    # The CPU run must end within 10 minutes on a busy 2-core machine: later configurations give way.
    return dict(models=CPU_MODELS, modes=list(MODES), dtype=["fp32"], layout=["channels_last"], batch_size=4,
                image_size=64, repeats=30, warmup=2, compile=True, compile_models=CPU_COMPILE_MODELS, budget_s=3.0,
                time_limit=480.0)


def _quick(gpu: bool) -> dict:
    if gpu:
        return dict(models=GPU_MODELS[:2], modes=["inference", "train_step"], repeats=10, budget_s=1.0,
                    compile_models=GPU_MODELS[:1])
    return dict(models=["regnetx_32"], modes=["inference", "train_step"], batch_size=2, image_size=32, repeats=5,
                budget_s=1.0, compile=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--models", nargs="+", help="registry names (default: the device's list; 'all': every "
                        "registered model)")
    parser.add_argument("--modes", nargs="+", choices=MODES)
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), help="bf16 = autocast to bfloat16")
    parser.add_argument("--layout", nargs="+", choices=list(LAYOUTS))
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--in-chans", nargs="+", type=int,
                        help="input planes (default: each model's data set: 1 for the FashionMNIST RegNet family, 3 "
                             "for the ResNets)")
    parser.add_argument("--repeats", type=int, help="timed calls per measurement (fewer when a call is slow)")
    parser.add_argument("--quick", action="store_true", help="a short run: fewer models, modes and repeats")
    compile_group = parser.add_mutually_exclusive_group()
    compile_group.add_argument("--no-compile", dest="compile", action="store_false", default=None,
                               help="leave torch.compile out")
    compile_group.add_argument("--compile", dest="compile", action="store_true",
                               help="torch.compile for every model (default: every model on GPU, vionet_d on CPU)")
    parser.add_argument("--compile-models", nargs="+", help="only these models get the torch.compile provider")
    parser.add_argument("--cuda-graphs", action="store_true", help="also time eager's and pyfast's steps captured "
                        "in a CUDA graph and replayed (providers eager+graph, pyfast+graph; GPU only)")
    parser.add_argument("--time-limit", type=float, help="seconds; configurations not started by then are skipped "
                        "(default: none on GPU, 480 on CPU)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's, or 1 when the CPU is already busy)")
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    parser.add_argument("--out", help="JSON path (default: pyfast-results/<device>-<date>.json under the current "
                        "directory); the PNG goes beside it")


def settings(args: argparse.Namespace) -> dict:
    """The run's settings: the device's defaults, then --quick's, then what the command line gave."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device == "cuda"
    chosen = {**_defaults(gpu), **(_quick(gpu) if args.quick else {}), "device": device}
    for key in ("models", "modes", "dtype", "layout", "batch_size", "image_size", "repeats", "compile", "time_limit"):
        if getattr(args, key, None) is not None:
            chosen[key] = getattr(args, key)
    chosen["in_chans"] = args.in_chans
    chosen["cuda_graphs"] = bool(getattr(args, "cuda_graphs", False))
    if args.compile:  # --compile: every model, unless --compile-models narrows it
        chosen["compile_models"] = None
    if getattr(args, "compile_models", None):
        chosen["compile"], chosen["compile_models"] = True, args.compile_models
    if chosen["models"] == ["all"]:
        from pyfast import models
        chosen["models"] = models.list_models()
    return chosen


def default_out(device: str, env: dict) -> str:
    name = re.sub(r"\([^)]*\)", "", env["device"])  # drop "(R)", "(2 threads)"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40]
    date = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join(RESULTS_DIR, f"{device}-{slug}-{date}.json")


def dispatch_summary(seen) -> str:
    """'cuda' when every op call ran on one backend, else e.g. 'cuda 34 + triton 12' (calls per backend),
    from the dispatcher's own answers (`pyfast.ops.backends.record_choices`)."""
    per_backend = {}
    for (_op, backend), count in seen.items():
        per_backend[backend] = per_backend.get(backend, 0) + count
    if len(per_backend) == 1:
        return next(iter(per_backend))
    return " + ".join(f"{name} {count}" for name, count in sorted(per_backend.items(), key=lambda kv: -kv[1]))


def configurations(s: dict) -> List[tuple]:
    """(model, in_chans, num_classes, Config) in run order: model by model, so a time limit cuts whole
    models, the most important (listed first) kept."""
    out = []
    for model in s["models"]:
        chans, classes = workloads.native_input(model)
        for in_chans in s["in_chans"] or [chans]:
            for dtype in s["dtype"]:
                for layout in s["layout"]:
                    for mode in s["modes"]:
                        out.append((model, in_chans, classes, Config(mode, dtype, layout, s["device"])))
    return out


def relative_error(eager, fast, x: torch.Tensor, config: Config) -> Optional[float]:
    """||pyfast - eager|| / ||eager|| of the logits in eval mode on one input (same weights)."""
    try:
        with torch.no_grad(), config.autocast():
            ref, out = eager.eval()(x).float(), fast.eval()(x).float()
        return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    except Exception as error:  # noqa: BLE001 - recorded, not fatal: the timings still mean something
        return f"error: {error}"[:200]


# On the CPU the providers are timed in interleaved rounds, their samples pooled: the machines are shared and
# their speed drifts, which one provider timed after another would read as a ratio. (GPUs time one provider at a
# time, alone on the device, so that each peak memory is its own.)
CPU_ROUNDS = 6


def provider_step(module: torch.nn.Module, name: str, config: Config, sets) -> Callable:
    """The timed step of one provider's model (compiled, or captured in a CUDA graph, as `name` says)."""
    if name == "compile":
        module = workloads.compiled(module)
    step = workloads.make_step(module, config)
    if name in workloads.GRAPHED:
        step = workloads.cuda_graphed(step, sets[0])
    return step


def _entry(m: timing.Measurement, config: Config, cost) -> dict:
    entry = m.as_dict()
    entry["tflops"] = cost.tflops(m.median_ms * 1e-3, backward=config.backward) if cost else None
    return entry


def _failure(error: Exception) -> dict:
    return {"error": f"{type(error).__name__}: {error}".splitlines()[0][:300]}


def time_provider(module: torch.nn.Module, name: str, config: Config, sets, s: dict, cost) -> dict:
    """One provider's Measurement as a dict (with achieved TFLOP/s), or the error that stopped it."""
    try:
        m = timing.measure(provider_step(module, name, config, sets), sets, config.device, warmup=s["warmup"],
                           repeats=s["repeats"], min_repeats=min(5, s["repeats"]), budget_s=s["budget_s"])
    except Exception as error:  # noqa: BLE001 - one provider failing must not lose the others' timings
        return _failure(error)
    return _entry(m, config, cost)


def time_interleaved(steps: Dict[str, Callable], config: Config, sets, s: dict, cost) -> Dict[str, dict]:
    """The providers' steps timed in CPU_ROUNDS interleaved rounds, each round a share of the repeats (the first
    with the warm-up), each provider's samples pooled into one Measurement; a provider that fails drops out."""
    samples: Dict[str, list] = {name: [] for name in steps}
    first_call = {}
    out: Dict[str, dict] = {}
    repeats = max(1, -(-s["repeats"] // CPU_ROUNDS))
    for round_index in range(CPU_ROUNDS):
        for name, step in steps.items():
            if name in out:
                continue
            try:
                timed, first_call_s = timing.sample(
                    step, sets, config.device, warmup=s["warmup"] if round_index == 0 else 1, repeats=repeats,
                    min_repeats=max(1, min(5, s["repeats"]) // CPU_ROUNDS), budget_s=s["budget_s"] / CPU_ROUNDS)
            except Exception as error:  # noqa: BLE001 - one provider failing must not lose the others' timings
                out[name] = _failure(error)
                continue
            first_call.setdefault(name, first_call_s)
            samples[name] += timed
    for name, step in steps.items():
        if name not in out:  # the peak: above what a call starts with (a CPU keeps no statistics: profiled)
            peak = timing.peak_memory(step, sets[0], config.device)
            out[name] = _entry(timing.Measurement.of(samples[name], peak_memory_bytes=peak,
                                                     first_call_s=first_call[name]), config, cost)
    return {name: out[name] for name in steps}


def compiles(model: str, s: dict) -> bool:
    return bool(s["compile"]) and (s["compile_models"] is None or model in s["compile_models"])


def measure_row(model: str, in_chans: int, num_classes: int, config: Config, s: dict,
                factory: Optional[Callable] = None) -> dict:
    """Builds the providers' models (same weights), checks pyfast's logits against eager's, then times
    each provider with only its own model on the device (so that peak memory is its own)."""
    with_compile = compiles(model, s)
    providers = [p for p in workloads.PROVIDERS if p != "compile" or with_compile]
    graphed = s.get("cuda_graphs") and s["device"] == "cuda"
    providers += list(workloads.GRAPHED) if graphed else []
    shape = (s["batch_size"], in_chans, s["image_size"], s["image_size"])
    row = {"model": model, "mode": config.mode, "dtype": config.dtype, "layout": config.layout,
           "batch_size": s["batch_size"], "image_size": s["image_size"], "in_chans": in_chans,
           "num_classes": num_classes, "rel_err_vs_eager": None, "providers": {}}
    variants = workloads.model_variants(model, providers, num_classes, in_chans, factory)
    cost = variants["eager"].complexity(shape) if hasattr(variants["eager"], "complexity") else None
    row["flops"] = 2 * cost.flops if cost else None
    row["params"] = cost.params if cost else sum(p.numel() for p in variants["eager"].parameters())
    sets = workloads.input_sets(workloads.image_batch(shape, config, num_classes=num_classes), config)
    if isinstance(variants.get("pyfast"), torch.nn.Module):
        eager, fast = (workloads.place(variants[n], config) for n in ("eager", "pyfast"))
        with backends.record_choices() as seen:  # which backend ran each op: the dispatcher's answer
            row["rel_err_vs_eager"] = relative_error(eager, fast, sets[0][0], config)
        row["pyfast_backend"] = dispatch_summary(seen) if seen else None
        row["pyfast_dispatch"] = {f"{op} {backend}": count for (op, backend), count in sorted(seen.items())}
        fast.to("cpu")
        del eager, fast
    interleave = config.device == "cpu"
    steps = {}
    for name in providers:
        variant, variants[name] = variants[name], None
        if isinstance(variant, str):
            row["providers"][name] = {"error": variant}
            continue
        if not interleave:
            row["providers"][name] = time_provider(workloads.place(variant, config), name, config, sets, s, cost)
        else:
            try:
                steps[name] = provider_step(workloads.place(variant, config), name, config, sets)
            except Exception as error:  # noqa: BLE001 - one provider failing must not lose the others' timings
                row["providers"][name] = _failure(error)
        del variant
        workloads.release(config.device)
    row["providers"].update(time_interleaved(steps, config, sets, s, cost) if steps else {})
    if not with_compile:
        cpu_default = s["device"] == "cpu" and s["compile_models"] == CPU_COMPILE_MODELS
        reason = ("--no-compile" if not s["compile"] else "compiled for vionet_d only on the CPU (see the notes)"
                  if cpu_default else "not in --compile-models")
        row["providers"]["compile"] = {"skipped": reason}
    if s.get("cuda_graphs") and not graphed:
        for name in workloads.GRAPHED:
            row["providers"][name] = {"skipped": "CUDA graphs need a GPU"}
    return results.summarize_row(row)


def main(args: argparse.Namespace, factory: Optional[Callable] = None) -> dict:
    """Runs the comparison; returns the document it wrote. `factory(name, num_classes=, in_chans=,
    fused=)` builds a model (default `pyfast.models.create`; tests pass a stand-in)."""
    from tqdm import tqdm

    start = time.monotonic()
    s = settings(args)
    device = s["device"]
    if factory is None:  # a misspelt name fails here, with the registry's suggestion, not minutes later
        from pyfast import models
        for name in s["models"]:
            models.model_entrypoint(name)
    default_cpu_compile = s["compile"] and s["compile_models"] == CPU_COMPILE_MODELS
    notes = [CPU_NOTE] if device == "cpu" else []
    if device == "cpu" and default_cpu_compile and any(not compiles(m, s) for m in s["models"]):
        notes.append(CPU_COMPILE_NOTE)
    if device == "cuda":
        torch.backends.cudnn.benchmark = True  # every provider gets cuDNN's tuned algorithms
    else:
        s["threads"], note = timing.choose_cpu_threads(getattr(args, "threads", None))
        notes += [note] if note else []
    env = timing.environment(device)
    ceil = timing.ceilings(device)
    out = args.out or default_out(device, env)
    doc = {"schema": results.BENCH_SCHEMA, "environment": env, "ceilings": ceil.as_dict(),
           "settings": {**s, "backend": backends.get_backend()}, "notes": notes, "skipped": [], "rows": []}
    print(results.header_lines(doc))
    print(f"pyfast's backend setting: {doc['settings']['backend']!r} (the table's last column: what ran)")
    for note in notes:
        print(f"note: {note}")
    todo = configurations(s)
    bar = tqdm(todo, desc="pyfast bench", unit="config", dynamic_ncols=True)
    for model, in_chans, classes, config in bar:
        label = f"{model} {config.mode} {config.dtype} {config.layout} in{in_chans}"
        if s["time_limit"] is not None and time.monotonic() - start > s["time_limit"]:
            doc["skipped"].append(f"{label}: --time-limit {s['time_limit']:.0f}s reached")
            continue
        bar.set_postfix_str(label)
        try:
            row = measure_row(model, in_chans, classes, config, s, factory)
        except Exception as error:  # noqa: BLE001 - e.g. out of memory building a model: go on with the next
            doc["skipped"].append(f"{label}: {type(error).__name__}: {str(error).splitlines()[0][:300]}")
            workloads.release(device)
            continue
        row["env"] = results.stamp(env)
        doc["rows"].append(row)
        results.write_json(doc, out)
    bar.close()
    doc["wall_s"] = time.monotonic() - start
    results.write_json(doc, out)
    png = results.plot_speedups(doc, os.path.splitext(out)[0] + ".png")
    print(results.model_table(doc))
    if results.chart_unavailable():
        print(f"chart skipped: {results.chart_unavailable()}")
    for line in doc["skipped"]:
        print(f"skipped: {line}")
    errors = [(r["model"], r["mode"], n, e["error"]) for r in doc["rows"] for n, e in r["providers"].items()
              if "error" in e]
    for model, mode, name, error in errors:
        print(f"error: {model} {mode} {name}: {error}")
    print(f"wrote {out}" + (f" and {png}" if png else "") + f" in {doc['wall_s']:.0f} s")
    return doc
