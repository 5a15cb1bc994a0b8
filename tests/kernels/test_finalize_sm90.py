"""bn_finalize's Triton kernel compiled for sm_90 without a GPU: the num_batches_tracked increment is race-free.

Every thread of the one program loads num_batches_tracked (a scalar load), and only thread 0 stores the
incremented value. Without a barrier between the two, a warp that is scheduled late can load the value thread 0
has already incremented and weight the running statistics with 1/(tracked + 1) under momentum=None. The
interpreter runs one thread and cannot show it; the PTX can: a barrier (bar.sync) must sit between the load of
num_batches_tracked and its store.

The compile runs in a subprocess with TRITON_INTERPRET unset (tests/conftest.py sets it on machines without a
GPU, and Triton reads it when a kernel is decorated), against a fresh Triton cache.
"""
import json
import os
import re
import subprocess
import sys

import pytest
from test_compile_sm90 import _ptxas_missing

# Every flag on: the cumulative average reads the incremented value; one of four warps would store it.
FLAGS = dict(HAS_WEIGHT=True, HAS_BIAS=True, UPDATE_RUNNING=True, TRACK=True, CUMULATIVE=True, BLOCK_C=1024)
POINTER_TYPES = {"num_batches_tracked_ptr": "*i64"}  # every other pointer: a float32 per-channel vector
SCALAR_TYPES = {"C": "i32", "count": "i32", "momentum": "fp64", "eps": "fp64"}


def _worker(out_path):
    """Compile _bn_finalize_kernel for sm_90 with FLAGS; write its PTX and the index of num_batches_tracked_ptr
    among the kernel's runtime parameters (the PTX names parameters by index) to out_path as JSON."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pyfast.kernels import batch_norm

    fn = batch_norm._bn_finalize_kernel
    signature, constants, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            signature[p.name], constants[(i,)] = "constexpr", tl.float32 if p.name == "ACC" else FLAGS[p.name]
        elif p.name.endswith("_ptr"):
            signature[p.name] = POINTER_TYPES.get(p.name, "*fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[p.name] = SCALAR_TYPES[p.name]
    compiled = triton.compile(ASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=4))
    runtime = [p.name for p in fn.params if not p.is_constexpr]
    with open(out_path, "w") as f:
        json.dump(dict(ptx=compiled.asm["ptx"], tracked_param=runtime.index("num_batches_tracked_ptr")), f)


@pytest.fixture(scope="module")
def finalize_ptx(tmp_path_factory):
    reason = _ptxas_missing()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("finalize-sm90")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(root / "triton-cache")
    out_path = root / "finalize.json"
    run = subprocess.run([sys.executable, __file__, str(out_path)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(out_path.read_text())


def test_num_batches_tracked_is_loaded_by_all_before_it_is_stored(finalize_ptx):
    lines = finalize_ptx["ptx"].splitlines()
    param = re.compile(rf"ld\.param\.[bu]64\s+(%rd\d+),\s*\[\w+_param_{finalize_ptx['tracked_param']}\]")
    address = next(m.group(1) for line in lines if (m := param.search(line)))
    through = rf"\[\s*{re.escape(address)}(\s*\+\s*0)?\s*\]"
    load = next(i for i, line in enumerate(lines) if re.search(r"\bld\.global\.\S+.*" + through, line))
    store = next(i for i, line in enumerate(lines) if re.search(r"\bst\.global\.\S+\s*" + through, line))
    barriers = [i for i in range(load + 1, store) if re.search(r"\b(bar|barrier)\.sync\b", lines[i])]
    assert load < store and barriers, (
        "no barrier between the load of num_batches_tracked and thread 0's store:\n" + "\n".join(lines[load:store + 1]))


if __name__ == "__main__":
    _worker(sys.argv[1])
