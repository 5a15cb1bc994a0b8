"""Fixtures of the benchmark harness's tests: fixed ceilings, so that nothing slow is measured."""
import pytest

from pyfast.benchmarks import timing


@pytest.fixture
def fixed_ceilings(monkeypatch):
    """Skips measuring the copy bandwidth and matmul rate (a second of CPU each time)."""
    ceil = timing.Ceilings(copy_gbps=10.0, matmul_tflops={"fp32": 0.1, "bf16": 0.2})
    monkeypatch.setattr(timing, "ceilings", lambda device, dtypes=None: ceil)
    return ceil
