"""kernels/_arrival.py's counter buffers: which launches share one, and how long one lives.

The lifetime logic runs on CPU tensors, with a CUDA-graph capture stood in for where no GPU is: an outgrown
buffer stays alive, a captured launch gets zeros of its own (two graphs never share counters, and none shares
with eager launches), a counter left non-zero is reported. On a GPU: two graphs captured on the default capture
stream, replayed after an eager launch outgrew the cached buffer, still compute the right statistics.
"""
import gc
import weakref

import pytest
import torch

from pyfast.kernels import _arrival as arrival
from pyfast.kernels import batch_norm as bn

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def own_cache(monkeypatch):
    """An empty cache per test (the launches of other tests keep theirs)."""
    monkeypatch.setattr(arrival, "_COUNTERS", {})


def test_an_outgrown_buffer_stays_alive():
    first = weakref.ref(arrival.arrival_counters(CPU, 10))
    larger = arrival.arrival_counters(CPU, 4 * arrival._MIN_COUNTERS)
    gc.collect()
    assert larger.numel() >= 4 * arrival._MIN_COUNTERS and first() is not None and first() is not larger
    assert arrival.arrival_counters(CPU, 10) is larger  # later launches take the newest buffer


def test_each_captured_launch_gets_zeros_of_its_own(monkeypatch):
    eager = arrival.arrival_counters(CPU, 40)
    monkeypatch.setattr(arrival, "_capturing", lambda device: True)
    graph_1, graph_2 = arrival.arrival_counters(CPU, 40), arrival.arrival_counters(CPU, 40)
    assert len({id(eager), id(graph_1), id(graph_2)}) == 3
    assert len({t.data_ptr() for t in (eager, graph_1, graph_2)}) == 3
    assert all(t.numel() >= 40 and not t.any() for t in (graph_1, graph_2))
    assert list(arrival._COUNTERS.values()) == [eager]  # the cache is the eager launches' alone


def test_streams_do_not_share_a_buffer(monkeypatch):
    keys = iter([(CPU, 1), (CPU, 2), (CPU, 1)])
    monkeypatch.setattr(arrival, "_stream_key", lambda device: next(keys))
    first, second, first_again = (arrival.arrival_counters(CPU, 8) for _ in range(3))
    assert first is first_again and first is not second


def test_a_counter_left_non_zero_is_reported():
    counters = arrival.arrival_counters(CPU, 8)
    assert arrival.stuck_counters() == []
    counters[3] = 2
    assert arrival.stuck_counters() == [(CPU, None)]


@pytest.mark.gpu
def test_two_graphs_replay_right_after_the_cache_grew():
    """bn_stats captured twice on the default capture stream, then an eager launch on a wider tensor outgrows
    the cached buffer; both graphs, replayed back to back (the second while the first may still run: the
    capture stream is the same), give each its own input's statistics, and no counter is left non-zero."""
    xs = [torch.randn(8, 40, 24, 24, device="cuda").contiguous(memory_format=torch.channels_last) for _ in range(2)]
    bn.bn_stats(xs[0])  # compile and tune outside the capture
    torch.cuda.synchronize()
    graphs, outputs = [], []
    for x in xs:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs.append(bn.bn_stats(x))
        graphs.append(graph)
    bn.bn_stats(torch.randn(2, 8 * arrival._MIN_COUNTERS, 2, 2, device="cuda"))
    for _ in range(2):
        for x in xs:
            x.normal_(3.0, 2.0)
        for graph in graphs:
            graph.replay()
        torch.cuda.synchronize()
        for x, (mean, var) in zip(xs, outputs):
            var_ref, mean_ref = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
            torch.testing.assert_close(mean.double(), mean_ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(var.double(), var_ref, rtol=1e-4, atol=1e-5)
    assert arrival.stuck_counters() == []
