"""PYFAST_TRITON_AUTOTUNE=0 leaves one config per Triton kernel (GPU test runs skip the tuning), and
the default keeps the full lists. Checked in fresh interpreters, outside TRITON_INTERPRET."""
import os
import subprocess
import sys

import pytest

SCRIPT = """
from pyfast.kernels import batch_norm, conv
lists = [conv._DOT_CONFIGS, conv._DIRECT_CONFIGS, batch_norm._ELEMENTWISE_CONFIGS, batch_norm._REDUCTION_CONFIGS]
print(" ".join(str(len(configs)) for configs in lists))
"""


def config_counts(**env):
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environment.update(env)
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return [int(n) for n in result.stdout.split()]


@pytest.mark.parametrize("switch", ["1", "0"])
def test_autotune_switch(switch):
    counts = config_counts(PYFAST_TRITON_AUTOTUNE=switch)
    if switch == "0":
        assert counts == [1, 1, 1, 1]
    else:
        assert min(counts) > 1
