"""`python -m pyfast info` prints what each backend can run here; `python -m pyfast bench` runs the
model benchmark against eager PyTorch and torch.compile (pyfast/benchmarks/report.py)."""
import argparse
import sys

import torch


def _present_devices() -> set:
    return {"cpu", "cuda"} if torch.cuda.is_available() else {"cpu"}


def _status(row: dict) -> str:
    """'ok', or why the backend cannot run on this machine (not built, or no device of its kind here)."""
    if not row["available"]:
        return f"unavailable: {row['why_not']}"
    devices = set(row["devices"].split(", "))
    if not devices & _present_devices():
        why = ("Triton compiles its kernels for a GPU when they are first called" if row["backend"] == "triton"
               else "its kernels are CUDA kernels")
        return (f"cannot run here: {why}, and no CUDA device is visible (torch.cuda.is_available() is False; "
                f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none'})")
    if row["backend"] == "triton" and not torch.cuda.is_available():
        return "ok, in Triton's interpreter on the CPU (TRITON_INTERPRET=1: for correctness tests, not speed)"
    return "ok"


def _extension_line(extension) -> str:
    if not extension.available():
        return f"missing: {extension.load_error}"
    build = extension.build
    if build is None:
        return "loaded, C++ kernels (no build record)"
    # a record written before setup.py recorded the vector ISA has no cpu_vectors
    vectors = getattr(build, "cpu_vectors", "unrecorded")
    cpu = f"C++ kernels ({vectors or 'portable'} vectors)"
    if extension.built_with_cuda():
        archs = build.cuda_archs or "the build machine's GPUs"
        return f"loaded, {cpu} and CUDA kernels (CUDA {build.cuda}, archs {archs})"
    return f"loaded, {cpu}"


def _auto_lines(backends) -> list:
    from .ops.backends import auto

    low, high = auto.TRITON_GROUP_WIDTHS
    measured = auto.TABLE.get("cuda", {})
    lines = [f"auto on cuda: {len(measured)} measured shape classes (pyfast/ops/backends/auto_table.json); "
             f"elsewhere cuda first, triton first for grouped convolutions of group width {low}-{high} in "
             f"channels_last; fallback {' > '.join(backends.PRIORITY['cuda'])}",
             f"auto on cpu: {' > '.join(backends.PRIORITY['cpu'])}"]
    lines += [f"  {key}: {name}" for key, name in sorted(measured.items())]
    return lines


def info(_args) -> None:
    from . import _extension
    from .ops import backends

    print(f"pyfast: torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}, "
          f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu (no CUDA device visible)'}")
    print(f"extension pyfast._C: {_extension_line(_extension)}")
    print(f"default backend: {backends.get_backend()}")
    for line in _auto_lines(backends):
        print(line)
    rows = backends.table()
    width = max(len(r["backend"]) for r in rows)
    for r in rows:
        print(f"  {r['backend']:<{width}}  [{r['devices']}] {r['dtypes']} -- {_status(r)}\n"
              f"  {'':<{width}}  {r['what']}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="pyfast", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="backends and why each can or cannot run here").set_defaults(run=info)
    from .benchmarks import report

    bench = commands.add_parser("bench", help="benchmark the model families against eager PyTorch")
    report.add_arguments(bench)
    bench.set_defaults(run=report.main)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    sys.exit(main())
