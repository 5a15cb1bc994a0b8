"""Shared test set-up: seeds, the GPU marker, Triton's interpreter on machines without a GPU, and an
opt-in one-thread fixture."""
import os

import pytest

# Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before pyfast.kernels
# is imported: on a machine without a GPU every Triton kernel runs in the interpreter.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard requirement
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running; still part of the CPU suite")


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_no_tf32():
    """Every test starts from a fixed seed; TF32 is off so float32 comparisons mean float32."""
    import torch

    torch.manual_seed(0)
    if _HAS_CUDA:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, the previous count restored after. Opt-in: a directory whose
    tests all want it requests it from an autouse fixture of its conftest.py."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
