"""`python -m pyfast bench`: the model families timed with eager PyTorch, torch.compile and pyfast, in
one run on the device present (the GPU if there is one, else the CPU with smaller defaults).

Prints a table (model, mode, dtype, layout, each provider's median ms, pyfast's speedup over each, the
peak-memory ratio pyfast/eager, pyfast's achieved TFLOP/s), and writes a JSON document
(`benchmarks/results/<device>-<date>.json`, or `--out`) and a PNG chart of the speedups beside it.
The JSON is rewritten after every row, so an interrupted run keeps what it measured.
"""
import argparse
import datetime
import os
import re
import time
from typing import Callable, List, Optional

import torch

from . import results, timing, workloads
from .workloads import DTYPES, LAYOUTS, MODES, Config

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
GPU_MODELS = ["regnetx_32", "resnet50", "vionet_d", "vionet_c", "vionet_g", "vionet_b", "deresnext", "resnet18",
              "resnet152", "preact_resnet50", "regnetx_400mf", "regnetx_3_2gf"]
CPU_MODELS = ["regnetx_32", "vionet_d", "deresnext", "resnet18", "resnet50", "preact_resnet50"]
# torch.compile on the CPU (inductor's C++ backend) costs minutes per model and mode on a small machine:
# off by default there; --compile turns it on.
CPU_COMPILE_NOTE = ("torch.compile is off by default on the CPU: inductor's C++ compilation took 54 s for "
                    "RegNetX-32's inference graph and 181 s for its training graph on this 2-core machine, "
                    "so compiling every model and mode does not fit the 10-minute default run; "
                    "--compile includes it")


def _defaults(gpu: bool) -> dict:
    if gpu:
        return dict(models=GPU_MODELS, modes=list(MODES), dtype=["bf16"], layout=["channels_last"], batch_size=128,
                    image_size=224, repeats=30, warmup=5, compile=True, budget_s=3.0, time_limit=None)
    # The CPU run must end within 10 minutes on a busy 2-core machine: later configurations give way.
    return dict(models=CPU_MODELS, modes=list(MODES), dtype=["fp32"], layout=["channels_last"], batch_size=4,
                image_size=64, repeats=10, warmup=2, compile=False, budget_s=3.0, time_limit=480.0)


def _quick(gpu: bool) -> dict:
    if gpu:
        return dict(models=GPU_MODELS[:2], modes=["inference", "train_step"], repeats=10, budget_s=1.0)
    return dict(models=CPU_MODELS[:1], modes=["inference", "train_step"], batch_size=2, image_size=32, repeats=5,
                budget_s=1.0)


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
                               help="include torch.compile (default on GPU only)")
    parser.add_argument("--time-limit", type=float, help="seconds; configurations not started by then are skipped "
                        "(default: none on GPU, 480 on CPU)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's, or 1 when the CPU is already busy)")
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    parser.add_argument("--out", help="JSON path (default: benchmarks/results/<device>-<date>.json); the PNG goes "
                        "beside it")


def settings(args: argparse.Namespace) -> dict:
    """The run's settings: the device's defaults, then --quick's, then what the command line gave."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device == "cuda"
    chosen = {**_defaults(gpu), **(_quick(gpu) if args.quick else {}), "device": device}
    for key in ("models", "modes", "dtype", "layout", "batch_size", "image_size", "repeats", "compile", "time_limit"):
        if getattr(args, key, None) is not None:
            chosen[key] = getattr(args, key)
    chosen["in_chans"] = args.in_chans
    if chosen["models"] == ["all"]:
        from pyfast import models
        chosen["models"] = models.list_models()
    return chosen


def default_out(device: str, env: dict) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")[:40]
    date = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join(RESULTS_DIR, f"{device}-{slug}-{date}.json")


def pyfast_backend(device: str) -> str:
    """The op backend pyfast's `auto` dispatch picks first on this device (for the record)."""
    from pyfast.ops import backends

    if backends.get_backend() != "auto":
        return backends.get_backend()
    for name in backends.PRIORITY.get(device, ["reference"]):
        b = backends.BACKENDS[name]
        if b.unavailable() is None and device in b.device_types:
            return name
    return "reference"


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


def measure_row(model: str, in_chans: int, num_classes: int, config: Config, s: dict,
                factory: Optional[Callable] = None) -> dict:
    """Builds the providers' models (same weights), checks pyfast against eager, times each provider."""
    providers = [p for p in workloads.PROVIDERS if p != "compile" or s["compile"]]
    shape = (s["batch_size"], in_chans, s["image_size"], s["image_size"])
    row = {"model": model, "mode": config.mode, "dtype": config.dtype, "layout": config.layout,
           "batch_size": s["batch_size"], "image_size": s["image_size"], "in_chans": in_chans,
           "num_classes": num_classes, "rel_err_vs_eager": None, "providers": {}}
    variants = workloads.model_variants(model, providers, num_classes, in_chans, factory)
    eager = variants["eager"]
    cost = eager.complexity(shape) if hasattr(eager, "complexity") else None
    row["flops"] = 2 * cost.flops if cost else None
    row["params"] = cost.params if cost else sum(p.numel() for p in eager.parameters())
    sets = workloads.input_sets(workloads.image_batch(shape, config, num_classes=num_classes), config)
    modules = {name: workloads.place(v, config) for name, v in variants.items() if isinstance(v, torch.nn.Module)}
    if "pyfast" in modules:
        row["rel_err_vs_eager"] = relative_error(modules["eager"], modules["pyfast"], sets[0][0], config)
    for name in providers:
        if name not in modules:
            row["providers"][name] = {"error": variants[name]}
            continue
        try:
            module = modules[name].train(config.training)
            if name == "compile":
                module = workloads.compiled(module)
            step = workloads.make_step(module, config)
            m = timing.measure(step, sets, config.device, warmup=s["warmup"], repeats=s["repeats"],
                               min_repeats=min(5, s["repeats"]), budget_s=s["budget_s"])
            entry = m.as_dict()
            entry["tflops"] = cost.tflops(m.median_ms * 1e-3, backward=config.backward) if cost else None
        except Exception as error:  # noqa: BLE001 - one provider failing must not lose the others' timings
            entry = {"error": f"{type(error).__name__}: {error}".splitlines()[0][:300]}
        row["providers"][name] = entry
        step = module = None
    if not s["compile"]:
        row["providers"]["compile"] = {"skipped": "--no-compile" if s["device"] == "cuda" else CPU_COMPILE_NOTE}
    del variants, modules, sets
    workloads.release(config.device)
    return results.summarize_row(row)


def main(args: argparse.Namespace, factory: Optional[Callable] = None) -> dict:
    """Runs the comparison; returns the document it wrote. `factory(name, num_classes=, in_chans=,
    backend=)` builds a model (default `pyfast.models.create`; tests pass a stand-in)."""
    from tqdm import tqdm

    start = time.monotonic()
    s = settings(args)
    device = s["device"]
    notes = [] if s["compile"] or device == "cuda" else [CPU_COMPILE_NOTE]
    if device == "cuda":
        torch.backends.cudnn.benchmark = True  # every provider gets cuDNN's tuned algorithms
    else:
        s["threads"], note = timing.choose_cpu_threads(getattr(args, "threads", None))
        notes += [note] if note else []
    env = timing.environment(device)
    ceil = timing.ceilings(device)
    out = args.out or default_out(device, env)
    doc = {"schema": results.BENCH_SCHEMA, "environment": env, "ceilings": ceil.as_dict(),
           "settings": {**s, "pyfast_backend": pyfast_backend(device)}, "notes": notes, "skipped": [], "rows": []}
    print(results.header_lines(doc))
    print(f"pyfast ops run on the {doc['settings']['pyfast_backend']!r} backend")
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
        row = measure_row(model, in_chans, classes, config, s, factory)
        row["pyfast_backend"] = doc["settings"]["pyfast_backend"]
        row["env"] = results.stamp(env)
        doc["rows"].append(row)
        results.write_json(doc, out)
    bar.close()
    doc["wall_s"] = time.monotonic() - start
    results.write_json(doc, out)
    png = results.plot_speedups(doc, os.path.splitext(out)[0] + ".png")
    print(results.model_table(doc))
    for line in doc["skipped"]:
        print(f"skipped: {line}")
    errors = [(r["model"], r["mode"], n, e["error"]) for r in doc["rows"] for n, e in r["providers"].items()
              if "error" in e]
    for model, mode, name, error in errors:
        print(f"error: {model} {mode} {name}: {error}")
    print(f"wrote {out}" + (f" and {png}" if png else "") + f" in {doc['wall_s']:.0f} s")
    return doc
