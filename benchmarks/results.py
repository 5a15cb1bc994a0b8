"""Benchmark results as data: the JSON documents (schema + check), the printed tables, the PNG chart.

A model-report document (`python -m pyfast bench`):

    {"schema": "pyfast-bench/1", "environment": {...}, "ceilings": {"copy_gbps", "matmul_tflops": {dtype: ..}},
     "settings": {...}, "notes": [str], "skipped": [str],
     "rows": [{"model", "mode", "dtype", "layout", "batch_size", "image_size", "in_chans", "num_classes",
               "flops", "params", "pyfast_backend" (the dispatcher's choices: "cuda", "cuda 34 + triton 12"),
               "pyfast_dispatch": {"<op> <backend>": calls}, "rel_err_vs_eager", "speedup_vs_eager",
               "speedup_vs_compile", "compile_vs_eager", "memory_ratio", "graphed_speedup_vs_eager" (eager+graph
               over pyfast+graph, with --cuda-graphs), "env": {device, torch, triton, cuda, date},
               "providers": {"eager" | "compile" | "pyfast" | "eager+graph" | "pyfast+graph":
                   {"median_ms", "p20_ms", "p80_ms", "min_ms", "repeats", "peak_memory_bytes", "first_call_s",
                    "tflops"}  or  {"error": str}  or  {"skipped": str}}}]}

A kernels document (`python -m pyfast.benchmarks.kernels`) has "schema": "pyfast-kernels/1" and rows with
"case", "mode", "dtype", "layout", "flops", "min_bytes" and "backends" (the same measurement fields plus
"gbps", "bandwidth_fraction", "tflops", "tflops_fraction", "roofline_fraction", "speedup_vs_eager").

`python -m pyfast.benchmarks.results` also prints pytest-benchmark's own JSON (`pytest --benchmark
--benchmark-json=...`, e.g. benchmarks/results/cpu-bn-*.json).
"""
import json
import os
from typing import Iterable, List, Optional

BENCH_SCHEMA = "pyfast-bench/1"
KERNELS_SCHEMA = "pyfast-kernels/1"
STAMP_KEYS = ("device", "torch", "triton", "cuda", "date")
ROW_KEYS = ("model", "mode", "dtype", "layout", "batch_size", "image_size", "in_chans", "providers", "env",
            "speedup_vs_eager", "speedup_vs_compile", "memory_ratio")
MEASUREMENT_KEYS = ("median_ms", "p20_ms", "p80_ms", "repeats", "peak_memory_bytes")


def stamp(env: dict) -> dict:
    """The part of the environment every row carries."""
    return {key: env.get(key) for key in STAMP_KEYS}


def ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    return numerator / denominator if numerator and denominator else None


def summarize_row(row: dict) -> dict:
    """Adds the speedups and the memory ratio derived from the providers' measurements."""
    median = {name: p.get("median_ms") for name, p in row["providers"].items()}
    memory = {name: p.get("peak_memory_bytes") for name, p in row["providers"].items()}
    row["speedup_vs_eager"] = ratio(median.get("eager"), median.get("pyfast"))
    row["speedup_vs_compile"] = ratio(median.get("compile"), median.get("pyfast"))
    row["compile_vs_eager"] = ratio(median.get("eager"), median.get("compile"))
    row["memory_ratio"] = ratio(memory.get("pyfast"), memory.get("eager"))
    row["graphed_speedup_vs_eager"] = ratio(median.get("eager+graph"), median.get("pyfast+graph"))
    return row


def validate(doc: dict) -> None:
    """Raises ValueError naming every way `doc` departs from the model-report schema."""
    problems = []
    if doc.get("schema") != BENCH_SCHEMA:
        problems.append(f"schema is {doc.get('schema')!r}, not {BENCH_SCHEMA!r}")
    for key in ("environment", "ceilings", "settings", "rows", "notes", "skipped"):
        if key not in doc:
            problems.append(f"missing {key!r}")
    for i, row in enumerate(doc.get("rows", [])):
        problems += [f"rows[{i}] lacks {key!r}" for key in ROW_KEYS if key not in row]
        problems += [f"rows[{i}].env lacks {key!r}" for key in STAMP_KEYS if key not in row.get("env", {})]
        for name, entry in row.get("providers", {}).items():
            if "error" in entry or "skipped" in entry:
                continue
            problems += [f"rows[{i}].providers.{name} lacks {key!r}" for key in MEASUREMENT_KEYS if key not in entry]
            if not entry.get("p20_ms", 0) <= entry.get("median_ms", 0) <= entry.get("p80_ms", 0):
                problems.append(f"rows[{i}].providers.{name}: percentiles out of order")
    if problems:
        raise ValueError("invalid benchmark document: " + "; ".join(problems))


def write_json(doc: dict, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, path)  # a reader never sees half a file, even if the run is killed mid-write
    return path


# -- tables ---------------------------------------------------------------------------------------
def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def format_table(headers: List[str], rows: Iterable[List[str]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    rows = [list(map(str, r)) for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _ms(entry: Optional[dict]) -> str:
    if not entry:
        return "-"
    if "median_ms" in entry:
        ms = entry["median_ms"]
        return f"{ms:.2f}" if ms >= 1 else f"{ms:.3g}"
    return "skip" if "skipped" in entry else "error"


MODEL_HEADERS = ["model", "mode", "dtype", "layout", "eager ms", "compile ms", "pyfast ms", "x eager",
                 "x compile", "mem pyfast/eager", "pyfast TFLOP/s", "pyfast ran on"]


GRAPHED_HEADERS = ["eager+graph ms", "pyfast+graph ms", "x eager graphed"]


def model_table(doc: dict) -> str:
    """One line per row; the CUDA-graph columns where a row has those providers (`--cuda-graphs`)."""
    graphed = any("eager+graph" in r["providers"] for r in doc["rows"])
    rows = []
    for r in doc["rows"]:
        p = r["providers"]
        line = [r["model"], r["mode"], r["dtype"], r["layout"], _ms(p.get("eager")), _ms(p.get("compile")),
                _ms(p.get("pyfast")), _fmt(r["speedup_vs_eager"], ".2f"), _fmt(r["speedup_vs_compile"], ".2f"),
                _fmt(r["memory_ratio"], ".2f"), _fmt((p.get("pyfast") or {}).get("tflops"), ".3g"),
                r.get("pyfast_backend") or "-"]
        if graphed:
            line += [_ms(p.get("eager+graph")), _ms(p.get("pyfast+graph")),
                     _fmt(r.get("graphed_speedup_vs_eager"), ".2f")]
        rows.append(line)
    return format_table(MODEL_HEADERS + (GRAPHED_HEADERS if graphed else []), rows)


def header_lines(doc: dict) -> str:
    env, ceil = doc["environment"], doc.get("ceilings") or {}
    rates = ", ".join(f"{k} {v:.3g}" for k, v in (ceil.get("matmul_tflops") or {}).items())
    lines = [f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda']} | "
             f"{env['date']}"]
    if ceil:
        lines.append(f"measured ceilings: copy {ceil['copy_gbps']:.1f} GB/s (read+write), matmul TFLOP/s: {rates}")
    return "\n".join(lines)


def kernel_row_line(row: dict) -> str:
    parts = []
    for name, e in row["backends"].items():
        if "median_ms" not in e:
            parts.append(f"{name} n/a")
            continue
        rate = f"{e['tflops']:.3g} TF/s" if e.get("tflops") else f"{e['gbps']:.3g} GB/s"
        parts.append(f"{name} {e['median_ms']:.3f} ms x{_fmt(e.get('speedup_vs_eager'), '.2f')} {rate}")
    return f"{row['case']} [{row['mode']} {row['dtype']} {row['layout']}]: " + "; ".join(parts)


def kernel_table(doc: dict) -> str:
    """One line per (case, mode, dtype, layout, backend): time, ratio vs eager, achieved rate and its
    fraction of the measured ceiling."""
    headers = ["case", "mode", "dtype", "layout", "backend", "ms (p20-p80)", "x eager", "GB/s", "%copy",
               "TFLOP/s", "%mm", "%roofline"]
    rows = []
    for r in doc["rows"]:
        for name, e in r["backends"].items():
            if "median_ms" not in e:
                rows.append([r["case"], r["mode"], r["dtype"], r["layout"], name, "n/a: " + e["error"][:40]]
                            + ["-"] * 6)
                continue
            pct = lambda v: _fmt(v and 100 * v, ".0f")  # noqa: E731
            rows.append([r["case"], r["mode"], r["dtype"], r["layout"], name,
                         f"{e['median_ms']:.3f} ({e['p20_ms']:.3f}-{e['p80_ms']:.3f})",
                         _fmt(e.get("speedup_vs_eager"), ".2f"), _fmt(e.get("gbps"), ".0f"),
                         pct(e.get("bandwidth_fraction")), _fmt(e.get("tflops"), ".1f"),
                         pct(e.get("tflops_fraction")), pct(e.get("roofline_fraction"))])
    return header_lines(doc) + "\n" + format_table(headers, rows)


def kernel_summary(doc: dict, dtype: str = "bf16", layout: str = "channels_last") -> str:
    """The short form for a log's tail: per case and mode, eager's time, each fused backend's speedup
    and the best backend's roofline fraction."""
    rows = [r for r in doc["rows"] if r["dtype"] == dtype and r["layout"] == layout]
    fused = sorted({name for r in rows for name in r["backends"] if name != "reference"})
    table = []
    for r in rows:
        b = r["backends"]
        timed = [e for name, e in b.items() if name != "reference" and "median_ms" in e]
        best = min(timed, key=lambda e: e["median_ms"]) if timed else {}
        table.append([r["case"], r["mode"], _ms(b.get("reference"))]
                     + [_fmt(b.get(name, {}).get("speedup_vs_eager"), ".2f") for name in fused]
                     + [_fmt(best.get("roofline_fraction") and 100 * best["roofline_fraction"], ".0f")])
    headers = ["case", "mode", "eager ms"] + [f"x {name}" for name in fused] + ["best %roofline"]
    return f"{dtype} {layout}\n" + format_table(headers, table)


def pytest_benchmark_table(doc: dict) -> str:
    """pytest-benchmark's JSON: one line per benchmark (median, IQR in ms, rounds) under its machine."""
    machine = doc.get("machine_info", {})
    cpu = machine.get("cpu", {})
    header = (f"pytest-benchmark {doc.get('version', '?')} | {cpu.get('brand_raw', machine.get('processor', '?'))} | "
              f"python {machine.get('python_version', '?')} | {doc.get('datetime', '?')}")
    rows = [[b["name"], f"{b['stats']['median'] * 1e3:.3f}", f"{b['stats']['iqr'] * 1e3:.3f}", b["stats"]["rounds"]]
            for b in doc["benchmarks"]]
    return header + "\n" + format_table(["benchmark", "median ms", "iqr ms", "rounds"], rows)


# -- chart ----------------------------------------------------------------------------------------
def chart_unavailable() -> Optional[str]:
    """Why no chart can be drawn here (None: it can)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (`pip install matplotlib`, or pyfast[bench])"
    return None


def plot_speedups(doc: dict, path: str) -> Optional[str]:
    """A horizontal bar chart per row of pyfast's speedup over eager and over torch.compile, and
    torch.compile's over eager (PNG, matplotlib's Agg backend); None when there is nothing to plot or
    matplotlib is missing."""
    rows = [r for r in doc["rows"] if r.get("speedup_vs_eager") or r.get("speedup_vs_compile")]
    if not rows:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels = [f"{r['model']} {r['mode']} {r['dtype']} {r['layout']}" for r in rows]
    series = [("pyfast vs eager", "speedup_vs_eager", "tab:blue"),
              ("pyfast vs torch.compile", "speedup_vs_compile", "tab:orange"),
              ("torch.compile vs eager", "compile_vs_eager", "tab:gray")]
    height = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(9, 1.0 + 0.45 * len(rows)))
    for k, (label, key, color) in enumerate(series):
        ys = [i + (k - (len(series) - 1) / 2) * height for i in range(len(rows))]
        ax.barh(ys, [r.get(key) or 0 for r in rows], height=height, label=label, color=color)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speedup (x, higher is better)")
    env = doc["environment"]
    cpu_run = " (a CPU run: the cpu backend; the GPU is pyfast's target)" if env.get("device_type") == "cpu" else ""
    ax.set_title(f"pyfast speedups on {env['device']}{cpu_run}\ntorch {env['torch']}, {env['date']}", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    """`python -m pyfast.benchmarks.results FILE.json...`: prints saved documents' tables (and draws a
    model report's missing PNG, e.g. after a run was stopped)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pyfast.benchmarks.results", description=main.__doc__)
    parser.add_argument("files", nargs="+")
    parser.add_argument("--short", action="store_true", help="kernels: the bf16 channels_last summary only")
    args = parser.parse_args(argv)
    short = args.short
    for path in args.files:
        with open(path) as f:
            doc = json.load(f)
        print(f"== {path}")
        if "benchmarks" in doc and "machine_info" in doc:
            print(pytest_benchmark_table(doc))
            continue
        if doc.get("schema") == KERNELS_SCHEMA:
            print(kernel_summary(doc) if short else kernel_table(doc))
        else:
            print(header_lines(doc))
            print(model_table(doc))
            png = os.path.splitext(path)[0] + ".png"
            if not os.path.exists(png) and plot_speedups(doc, png):
                print(f"drew {png}")
            elif not os.path.exists(png) and chart_unavailable():
                print(f"chart skipped: {chart_unavailable()}")
        for line in doc.get("skipped", []):
            print(f"skipped: {line}")


if __name__ == "__main__":
    main()
