"""Model tests: one intra-op thread (the CPU machines are shared: more threads only contend), and the
small instances the forward/backward tests build."""
import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs with one intra-op thread (tests/conftest.py)."""
