"""`python -m pyfast info` prints what each backend can run here; `python -m pyfast bench` runs the
model benchmark against eager PyTorch and torch.compile (pyfast/benchmarks/report.py)."""
import argparse
import sys

import torch


def info(_args) -> None:
    from . import _extension
    from .ops import backends

    print(f"pyfast: torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}, "
          f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
    print(f"extension pyfast._C: {'loaded' if _extension.available() else 'missing: ' + str(_extension.load_error)}")
    print(f"default backend: {backends.get_backend()}; auto order: "
          + "; ".join(f"{device}: {' > '.join(names)}" for device, names in backends.PRIORITY.items()))
    rows = backends.table()
    width = max(len(r["backend"]) for r in rows)
    for r in rows:
        status = "ok" if r["available"] else f"unavailable: {r['why_not']}"
        print(f"  {r['backend']:<{width}}  [{r['devices']}] {r['dtypes']}\n  {'':<{width}}  {r['what']} -- {status}")


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
