"""PYFAST_TRITON_AUTOTUNE=0 skips tuning (GPU test runs): the conv launches its default config without timing
any, batch_norm keeps one config per kernel. With tuning on, the conv times each candidate once per tuning
key, M bucketed to a power of two. Checked in fresh interpreters, outside TRITON_INTERPRET, with a stand-in
for triton.testing.do_bench (no GPU here) that ranks the configs by a fixed score."""
import os
import subprocess
import sys

import pytest

SCRIPT = """
import torch, triton.testing
from pyfast.kernels import batch_norm, conv

timed = []
def do_bench(fn, **kwargs):
    config = fn()
    timed.append(config)
    return abs(config.block_m - 64) + abs(config.block_n - 32)  # 64x32 is the "fastest"
triton.testing.do_bench = do_bench

def choose(batch):
    problem = conv.Problem(batch, 64, 28, 28, 64, 3, 3, (1, 1), (1, 1), (1, 1), 1, torch.bfloat16)
    return conv._choose_config(problem, lambda config: lambda: config)

first = choose(8)
count = len(timed)
same_bucket = choose(7)  # M = 5488 and 6272: both bucket to 8192
other_bucket = choose(32)
print(first.block_m, first.block_n, count, len(timed) - count,
      len(batch_norm._ELEMENTWISE_CONFIGS), len(batch_norm._REDUCTION_CONFIGS))
"""


def run_script(**env):
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environment.update(env)
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return [int(n) for n in result.stdout.split()]


@pytest.mark.parametrize("switch", ["1", "0"])
def test_autotune_switch(switch):
    block_m, block_n, first_timings, later_timings, *bn_counts = run_script(PYFAST_TRITON_AUTOTUNE=switch)
    if switch == "0":
        assert first_timings == later_timings == 0 and bn_counts == [1, 1]
    else:
        assert (block_m, block_n) == (64, 32)  # the best timed
        assert first_timings > 1 and later_timings == first_timings  # once for batch 8 and 7, again for 32
        assert min(bn_counts) > 1
