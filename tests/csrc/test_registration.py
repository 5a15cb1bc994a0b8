"""pyfast._C registers a kernel for every op it declares (csrc/ops.cpp) on each device it was built for:
the C++ kernels always, the CUDA kernels when setup.py built them (CI builds them with a CUDA torch,
without a GPU). Checked through the dispatcher's own table, so a kernel that compiled but never
registered fails here."""
import re
from pathlib import Path

import pytest
import torch

from pyfast import _extension

ROOT = Path(__file__).resolve().parents[2]
DECLARED = re.findall(r'm\.def\(\s*"(\w+)\(', (ROOT / "csrc" / "ops.cpp").read_text())

pytestmark = pytest.mark.skipif(not _extension.available(), reason=f"no pyfast._C ({_extension.load_error})")


def _missing(dispatch_key):
    return [op for op in DECLARED
            if not getattr(torch.ops.pyfast, op).default.has_kernel_for_dispatch_key(dispatch_key)]


def test_the_declarations_are_found():
    assert {"bn_stats", "bn_act_forward", "bn_act_backward_reduce", "bn_act_backward_elemt"} <= set(DECLARED)


def test_every_op_has_a_cpu_kernel():
    assert _missing("CPU") == []


def test_every_op_has_a_cuda_kernel_when_built_with_cuda():
    if not _extension.built_with_cuda():
        pytest.skip("pyfast._C was built without its CUDA kernels" if _extension.build else
                    "no build record (pyfast/_build_info.py): rebuild with `pip install --no-build-isolation -e .`")
    assert _missing("CUDA") == []
