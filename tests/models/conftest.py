"""Model tests: one intra-op thread (the CPU machines are shared: more threads only contend), and the
small instances the forward/backward tests build."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
