"""pyfast.nn tests: one intra-op thread. These tensors are tiny, and on a shared 2-core machine OpenMP's
thread team costs ~100 ms per op (measured: a 3x4x7x7 float64 conv2d, 0.1 s with 2 threads, 30 us with 1)."""
import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs with one intra-op thread (tests/conftest.py)."""
