"""The timing helper on a fake clock: statistics, rotation, repeat planning; no real timing."""
import numpy as np
import pytest
import torch

from pyfast.benchmarks import timing


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize("n", [1, 2, 5, 10, 37])
def test_percentile_matches_numpy(n):
    samples = torch.rand(n, generator=torch.Generator().manual_seed(n)).tolist()
    for q in (0, 20, 50, 80, 100):
        assert timing.percentile(samples, q) == pytest.approx(float(np.percentile(samples, q)))


def test_percentile_of_nothing_raises():
    with pytest.raises(ValueError, match="no samples"):
        timing.percentile([], 50)


def test_measure_on_a_fake_clock():
    clock, warmup = FakeClock(), 2
    durations_ms = iter([5.0, 1.0, 3.0, 2.0, 4.0])
    calls = []

    def fn(tag):
        calls.append(tag)
        if len(calls) > warmup:  # warm-up calls take no (fake) time
            clock.now += next(durations_ms) / 1e3

    m = timing.measure(fn, [[0], [1], [2]], "cpu", warmup=warmup, repeats=5,
                       timer=timing.HostTimer("cpu", clock))
    assert (m.median_ms, m.min_ms, m.repeats) == (pytest.approx(3.0), pytest.approx(1.0), 5)
    assert m.p20_ms == pytest.approx(1.8)  # sorted 1,2,3,4,5: linear interpolation at 0.8
    assert m.p80_ms == pytest.approx(4.2)
    assert calls == [0, 1, 2, 0, 1, 2, 0]  # input sets rotate through warm-up and timed calls alike
    assert m.peak_memory_bytes is None  # the CPU keeps no allocator statistics (see cpu_peak_bytes)
    assert m.first_call_s is not None and m.first_call_s >= 0


def test_measure_flushes_before_every_timed_call():
    events = []
    timing.measure(lambda: events.append("call"), [()], "cpu", warmup=1, repeats=3,
                   flush=lambda: events.append("flush"))
    assert events == ["call"] + ["flush", "call"] * 3


def test_measure_needs_inputs():
    with pytest.raises(ValueError, match="input set"):
        timing.measure(lambda: None, [], "cpu")


def test_budget_cuts_repeats_down_to_the_minimum():
    m = timing.measure(lambda: None, [()], "cpu", warmup=2, repeats=100, min_repeats=4, budget_s=0.0)
    assert m.repeats == 4


@pytest.mark.parametrize("estimate, budget, expected", [(2.0, 50.0, 25), (10.0, 50.0, 5), (0.01, 1e6, 30),
                                                         (100.0, 1.0, 5)])
def test_plan_repeats(estimate, budget, expected):
    assert timing.plan_repeats(estimate, budget, min_repeats=5, max_repeats=30) == expected


@pytest.mark.parametrize("set_bytes, expected", [(1 << 30, 1), (32 << 20, 2), (1 << 20, 8), (0, 1)])
def test_rotation_count(set_bytes, expected):
    assert timing.rotation_count(set_bytes, cache=32 << 20, max_sets=8) == expected


def test_random_input_sets_are_random_and_rotated():
    sets = timing.random_input_sets(lambda: [torch.randn(4, 4), torch.randint(1, 5, (4,))], "cpu")
    assert len(sets) == 8  # 96 bytes a set: as many sets as allowed
    assert all((t != 0).all() for s in sets for t in s)
    assert not torch.equal(sets[0][0], sets[1][0])


def test_cache_bytes_is_positive():
    assert timing.cache_bytes("cpu") > 0


def test_environment_stamp():
    env = timing.environment("cpu")
    for key in ("device", "torch", "triton", "cuda", "date", "python"):
        assert key in env
    assert env["torch"] == torch.__version__
    assert env["device_type"] == "cpu"


def test_choose_cpu_threads_honours_a_request():
    before = torch.get_num_threads()
    try:
        assert timing.choose_cpu_threads(1) == (1, None)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_dtype_names():
    assert timing.dtype_name(torch.bfloat16) == "bf16"
    assert timing.dtype_name(torch.float32) == "fp32"


def test_cpu_peak_bytes_is_the_most_a_call_holds_at_once():
    def call():
        a = torch.empty(1000, dtype=torch.float32)  # 4,000 bytes
        b = torch.empty(500, dtype=torch.float64)  # 4,000 more: 8,000 at once
        del a, b
        c = torch.empty(1500, dtype=torch.float32)  # 6,000 after both are freed
        return c

    assert timing.cpu_peak_bytes(call) == 8000
