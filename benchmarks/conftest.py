"""What the pytest-benchmark suites share (collected only by `pytest --benchmark`, see the root conftest).

Each benchmark runs `benchmark.pedantic` with warm-up rounds, an untimed setup that hands the next of
several random input sets and synchronizes the device, and a target that synchronizes at its end (so
the host clock measures the device's work), then stores in `extra_info` the device stamp, the
configuration, the achieved TFLOP/s or GB/s against the measured ceilings, and the peak memory.
"""
from itertools import cycle

import pytest
import torch

from pyfast.benchmarks import timing
from pyfast.benchmarks.suite import DEVICE, SIZES
from pyfast.benchmarks.workloads import Config

pytest.importorskip("pytest_benchmark")


@pytest.fixture(scope="session")
def env():
    if DEVICE == "cuda":
        torch.backends.cudnn.benchmark = True
    else:
        timing.choose_cpu_threads()
    return timing.environment(DEVICE)


@pytest.fixture(scope="session")
def ceilings():
    return timing.ceilings(DEVICE)


@pytest.fixture
def run(benchmark, env, ceilings):
    """`run(step, sets, config, group=..., flops=..., min_bytes=..., **info)`: times `step(*set)` and
    records what explains the number."""

    def run(step, sets, config: Config, group: str, flops=None, min_bytes=None, rounds=None, **info):
        rotation = cycle(sets)

        def setup():
            timing.synchronize(DEVICE)
            return tuple(next(rotation)), {}

        def target(*args):
            step(*args)
            timing.synchronize(DEVICE)

        benchmark.group = group
        benchmark.pedantic(target, setup=setup, rounds=rounds or SIZES["rounds"], warmup_rounds=SIZES["warmup"])
        seconds = benchmark.stats.stats.median
        extra = {"env": env, "mode": config.mode, "dtype": config.dtype, "layout": config.layout,
                 "peak_memory_bytes": timing.peak_memory(step, sets[0], DEVICE), **info}
        if flops:
            extra["tflops"] = flops / seconds / 1e12
            extra["tflops_fraction"] = extra["tflops"] / ceilings.matmul_tflops[config.dtype]
        if min_bytes:
            extra["gbps"] = min_bytes / seconds / 1e9
            extra["bandwidth_fraction"] = extra["gbps"] / ceilings.copy_gbps
        benchmark.extra_info.update(extra)

    return run
