"""A Triton cache that travels between machines: packed by one GPU-check call (or a CPU machine's ahead-of-time
compile), unpacked by the next, so that the next call compiles nothing it already compiled.

Triton finds a kernel through a group file (`__grp__<name>.json`) whose `child_paths` name each of the kernel's
files by absolute path, and it recompiles when one of them is missing. So a cache is used at the absolute path it
was written at (benchmarks/gpu_check.sh uses CACHE_PATH on both machines), and the pack keeps what a launch needs,
the metadata (.json), the binary (.cubin) and the compiled launcher modules (.so), with the group files rewritten
to name only those: the IRs (.ttir, .ttgir, .llir, .ptx, .source) would make it several times larger.

    python -m pyfast.benchmarks.triton_cache pack CACHE_DIR OUT.tar.gz
    python -m pyfast.benchmarks.triton_cache unpack IN.tar.gz CACHE_DIR
"""
import argparse
import io
import json
import os
import tarfile
from pathlib import Path

CACHE_PATH = "/tmp/pyfast-triton-cache"
KEPT_SUFFIXES = (".json", ".cubin", ".so")


def _kept(path: Path) -> bool:
    return path.suffix in KEPT_SUFFIXES


def pack(cache_dir: str, out: str) -> int:
    """Writes the launch-ready part of `cache_dir` to the gzipped tar `out`; returns the kernels it holds."""
    root = Path(cache_dir)
    kernels = 0
    with tarfile.open(out, "w:gz", compresslevel=9) as tar:
        for path in sorted(p for p in root.rglob("*") if p.is_file() and _kept(p)):
            name = str(path.relative_to(root))
            if path.name.startswith("__grp__"):
                group = json.loads(path.read_text())
                group["child_paths"] = {k: v for k, v in group.get("child_paths", {}).items() if _kept(Path(v))}
                data = json.dumps(group).encode()
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                kernels += 1
            else:
                tar.add(path, arcname=name)
    return kernels


def unpack(archive: str, cache_dir: str) -> int:
    """Extracts a pack into `cache_dir` (where it was written, for its group files to hold); returns its kernels."""
    os.makedirs(cache_dir, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and not os.path.isabs(m.name) and ".." not in m.name]
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python's own check where it has one
        tar.extractall(cache_dir, members=members, **safe)
    return sum(Path(m.name).name.startswith("__grp__") for m in members)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pyfast.benchmarks.triton_cache", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    p = verbs.add_parser("pack")
    p.add_argument("cache_dir")
    p.add_argument("out")
    u = verbs.add_parser("unpack")
    u.add_argument("archive")
    u.add_argument("cache_dir")
    args = parser.parse_args(argv)
    if args.verb == "pack":
        print(f"packed {pack(args.cache_dir, args.out)} kernels into {args.out}")
    else:
        print(f"unpacked {unpack(args.archive, args.cache_dir)} kernels into {args.cache_dir}")


if __name__ == "__main__":
    main()
