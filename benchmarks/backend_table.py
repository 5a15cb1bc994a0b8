"""`python -m pyfast.benchmarks.backend_table KERNELS.json... --out auto_table.json`: `auto`'s table
(pyfast/ops/backends/auto_table.json) from per-kernel timings (`python -m pyfast.benchmarks.kernels`).

For each device and shape class (pyfast/ops/backends/auto.py) the table names the backend with the least
total median time over the class's cases and modes, among the backends that ran every one of them; the
totals are kept beside the choice as its evidence. Classes no timing covers are left out: the default
rule decides them. The GPU check (benchmarks/gpu_check.sh) writes it; commit it to
pyfast/ops/backends/auto_table.json.
"""
import argparse
import json
from collections import defaultdict
from typing import Dict, List, Optional

from pyfast.ops.backends import auto

from . import results

ABOUT = ("auto's measured choices per device and shape class (pyfast/ops/backends/auto.py); classes not listed "
         "follow the default rule. Written by `python -m pyfast.benchmarks.backend_table KERNELS.json` from the GPU "
         "check's kernel timings (benchmarks/gpu_check.sh).")


def row_class(row: dict) -> str:
    groups = row.get("groups", 1)
    return auto.shape_class(row["op"], row["dtype"], row["layout"], groups, row.get("c_in", 0) // max(groups, 1),
                            row.get("kernel", 1), row.get("stride", 1))


def choices(docs: List[dict]) -> Dict[str, Dict[str, dict]]:
    """{device type: {shape class: {"use", "ms": {backend: total median ms}, "cases"}}}."""
    totals = defaultdict(lambda: defaultdict(lambda: defaultdict(float)))
    counts = defaultdict(lambda: defaultdict(lambda: defaultdict(int)))
    rows_in = defaultdict(lambda: defaultdict(int))
    for doc in docs:
        device = doc["environment"]["device_type"]
        for row in doc["rows"]:
            key = row_class(row)
            rows_in[device][key] += 1
            for backend, entry in row["backends"].items():
                if "median_ms" in entry:
                    totals[device][key][backend] += entry["median_ms"]
                    counts[device][key][backend] += 1
    table = {}
    for device, classes in totals.items():
        table[device] = {}
        for key, per_backend in sorted(classes.items()):
            complete = {b: ms for b, ms in per_backend.items() if counts[device][key][b] == rows_in[device][key]}
            if complete:
                table[device][key] = {"use": min(complete, key=complete.get),
                                      "ms": {b: round(ms, 4) for b, ms in sorted(complete.items())},
                                      "cases": rows_in[device][key]}
    return table


def build(docs: List[dict], note: Optional[str] = None) -> dict:
    env = docs[0]["environment"] if docs else {}
    measured = {**results.stamp(env), "note": note} if docs else None
    return {"about": ABOUT, "measured": measured, "choices": choices(docs)}


def summary(table: dict) -> str:
    rows = []
    for device, classes in table["choices"].items():
        for key, entry in classes.items():
            rows.append([f"{device} {key}", entry["use"], entry["cases"],
                         ", ".join(f"{b} {ms:.3f}" for b, ms in entry["ms"].items())])
    return results.format_table(["shape class", "auto uses", "cases", "total ms per backend"], rows)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m pyfast.benchmarks.backend_table", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kernels", nargs="+", help="kernel-timing JSON documents (pyfast-kernels/1)")
    parser.add_argument("--out", help="where to write the table (default: print only)")
    parser.add_argument("--note", help="recorded with the measurement, e.g. the autotuning setting")
    args = parser.parse_args(argv)
    docs = []
    for path in args.kernels:
        with open(path) as f:
            doc = json.load(f)
        if doc.get("schema") != results.KERNELS_SCHEMA:
            parser.error(f"{path}: not a kernel-timing document (schema {doc.get('schema')!r})")
        docs.append(doc)
    table = build(docs, args.note)
    print(summary(table))
    if args.out:
        results.write_json(table, args.out)
        print(f"wrote {args.out}")
    return table


if __name__ == "__main__":
    main()
