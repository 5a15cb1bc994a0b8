"""kernels/conv.py around its launch: tuning (PYFAST_TRITON_AUTOTUNE=1), CUDA graph capture, the weight copy's
cache and the device guard. The GPU behaviour cannot run here: these check the launcher's logic on CPU, the
tuning timer replaced by a stand-in that launches each candidate once (under the interpreter) and scores it,
capture and devices faked where the launcher asks about them."""
import contextlib
import math

import pytest
import torch
import triton.testing
from triton.runtime.errors import OutOfResources

from pyfast.kernels import _arrival as arrival
from pyfast.kernels import conv

f32, bf16 = torch.float32, torch.bfloat16


def _problem(**flags):
    return conv.Problem(8, 64, 28, 28, 64, 3, 3, (1, 1), (1, 1), (1, 1), 1, bf16, **flags)


@pytest.fixture
def tuning(monkeypatch):
    """Tuning on, with empty caches, and a timer that runs each candidate once and ranks 64x32 tiles first;
    returns the list of configs timed."""
    monkeypatch.setattr(conv, "_INTERPRET", False)
    monkeypatch.setattr(conv, "_AUTOTUNE", True)
    monkeypatch.setattr(conv, "_TUNED", {})
    monkeypatch.setattr(conv, "_CHOSEN", {})
    timed = []

    def do_bench(fn, **kwargs):
        config = fn()
        timed.append(config)
        return abs(config.block_m - 64) + abs(config.block_n - 32)

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    return timed


def _returning_config(config):
    return lambda: config


def _config_of(launch):
    """The Config of a Launch (tile sizes, warps, stages), for the stand-in timer."""
    block_m, block_n, block_k = (int(v) for v in launch.config.split()[0].split("x"))
    return conv.Config(block_m, block_n, block_k, launch.num_warps, launch.num_stages)


def test_tuning_skips_candidates_that_fail(tuning):
    """A candidate that runs out of resources is skipped, as Triton's autotuner skips it; the best of the others
    is chosen."""
    def make_run(config):
        if (config.block_m, config.block_n) == (64, 32):  # the one the timer would rank first
            def run():
                raise OutOfResources(300000, 232448, "shared memory")
            return run
        return _returning_config(config)

    config = conv._choose_config(_problem(), make_run)
    assert (config.block_m, config.block_n) != (64, 32) and len(tuning) == len(conv.candidates(_problem())) - 1


def test_tuning_raises_when_no_candidate_runs(tuning):
    def make_run(config):
        def run():
            raise OutOfResources(300000, 232448, "shared memory")
        return run

    with pytest.raises(OutOfResources):
        conv._choose_config(_problem(), make_run)


def test_no_tuning_under_graph_capture(tuning, monkeypatch):
    """Timing synchronizes: during a capture the default config launches, untimed and not remembered, and the
    next call outside the capture tunes."""
    problem = _problem()
    monkeypatch.setattr(conv, "_capturing", lambda device: True)
    assert conv._choose_config(problem, _returning_config, torch.device("cuda:0")) == conv._default_config(problem)
    assert not tuning and not conv._TUNED and not conv._CHOSEN
    monkeypatch.setattr(conv, "_capturing", lambda device: False)
    config = conv._choose_config(problem, _returning_config, torch.device("cuda:0"))
    assert tuning and (config.block_m, config.block_n) == (64, 32)
    monkeypatch.setattr(conv, "_capturing", lambda device: True)  # tuned already: a capture launches its choice
    assert conv._choose_config(_problem(has_bias=True), _returning_config, torch.device("cuda:0")) == config


def test_capturing_asks_cuda_only_for_cuda_devices(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: asked.append(True) or True)
    assert not conv._capturing(torch.device("cpu")) and not conv._capturing(None) and not asked
    assert conv._capturing(torch.device("cuda:0")) and asked


def test_tuning_key_holds_the_int64_flag(monkeypatch):
    """A config tuned without int64 offsets is not reused for a problem of the same M bucket that needs them."""
    problem = _problem()
    key = problem.tuning_key()
    monkeypatch.setattr(conv, "_MAX_INT32_NUMEL", problem.m * problem.c_out - 1)  # the output now needs int64
    assert problem.int64 and problem.tuning_key() != key


def test_tuning_trials_write_scratch_buffers(tuning, monkeypatch):
    """The trials of a conv with statistics write outputs and arrival counters of their own, zero at each trial's
    start: the call's results come from its own launch alone, and the shared counters are never a trial's."""
    seen, shared = [], []
    run = conv.Launch.run

    def recording(launch):
        counters = launch.args["counter_ptr"]
        seen.append((launch.args["out_ptr"], launch.args["mean_ptr"], counters, counters.clone()))
        run(launch)
        return _config_of(launch)

    def arrival_counters(device, count):
        shared.append(arrival.arrival_counters(device, count))
        return shared[-1]

    monkeypatch.setattr(conv.Launch, "run", recording)
    monkeypatch.setattr(conv, "arrival_counters", arrival_counters)
    x = torch.randn(1, 16, 5, 5).to(memory_format=torch.channels_last)
    w = torch.randn(16, 16, 3, 3) / 12
    out, mean, var = conv.conv2d(x, w, padding=1, compute_stats=True)
    *trials, final = seen
    assert len(trials) == len(conv.candidates(conv.Problem(1, 16, 5, 5, 16, 3, 3, (1, 1), (1, 1), (1, 1), 1, f32,
                                                           stats=True, tf32=torch.backends.cudnn.allow_tf32))) > 1
    shared = {c.data_ptr() for c in shared}
    for trial_out, trial_mean, counters, at_start in trials:
        assert trial_out is not out and trial_mean is not mean and counters.data_ptr() not in shared
        assert not at_start.any()
    assert final[0] is out and final[1] is mean and final[2].data_ptr() in shared
    ref = torch.nn.functional.conv2d(x.double(), w.double(), padding=1)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mean.double(), ref.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)


# ---- the weight copy and CUDA graphs ----


def test_weight_copy_under_capture_is_made_in_the_capture(monkeypatch):
    """During a capture the weight is copied afresh (the graph remakes the copy at each replay from the weight as it
    is then) and the cache is neither read nor changed: no graph reads a cached copy that a later weight change
    replaces and frees."""
    w = torch.randn(16, 8, 3, 3)
    cached = conv._weight_for(w, direct=False)
    entry = conv._WEIGHTS[(id(w), False)]
    monkeypatch.setattr(conv, "_capturing", lambda device: True)
    first, second = conv._weight_for(w, direct=False), conv._weight_for(w, direct=False)
    assert first is not cached and second is not first and torch.equal(first, w)
    with torch.no_grad():
        w.mul_(2)  # an optimizer step between replays: the capture's copy reads w as it is
    third = conv._weight_for(w, direct=False)
    assert torch.equal(third, w) and conv._WEIGHTS[(id(w), False)] is entry and entry[2] is cached
    monkeypatch.setattr(conv, "_capturing", lambda device: False)
    assert torch.equal(conv._weight_for(w, direct=False), w)  # outside the capture: the change is seen


def test_weight_in_the_paths_layout_is_read_as_it_is(monkeypatch):
    """A weight already dense in the path's layout needs no copy (a graph then reads the weight itself); one with
    the right innermost dim but other strides (a slice) is copied: the kernel takes its strides as multiples of
    the channel counts."""
    monkeypatch.setattr(conv, "_capturing", lambda device: pytest.fail("asked about capture without a copy"))
    w = torch.randn(16, 8, 3, 3).to(memory_format=torch.channels_last)
    assert conv._weight_for(w, direct=False) is w
    sliced = torch.randn(16, 12, 3, 3).to(memory_format=torch.channels_last)[:, :8]
    assert sliced.stride(1) == 1
    monkeypatch.setattr(conv, "_capturing", lambda device: False)
    copy = conv._weight_for(sliced, direct=False)
    assert copy is not sliced and torch.equal(copy, sliced) and copy.stride() == w.stride()


# ---- the device guard ----


def test_device_guard_makes_x_device_current(monkeypatch):
    entered = []

    class Device(contextlib.AbstractContextManager):
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return None

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Device)
    with conv.launch_device(torch.device("cuda:1")):
        pass
    with conv.launch_device(torch.device("cuda:0")), conv.launch_device(torch.device("cpu")):
        pass
    assert entered == [torch.device("cuda:1")]  # the current device needs no switch


def test_launch_and_tuning_run_inside_the_device_guard(tuning, monkeypatch):
    """conv2d's tuning trials, weight copy and launch all run with x's device current."""
    guarded, inside = [], []

    @contextlib.contextmanager
    def guard(device):
        guarded.append(device)
        inside.append(True)
        try:
            yield
        finally:
            inside.pop()

    run = conv.Launch.run
    launched = []

    def checked(launch):
        assert inside, "launched outside the device guard"
        launched.append(launch)
        run(launch)
        return _config_of(launch)

    weight_for = conv._weight_for

    def guarded_weight_for(weight, direct):
        assert inside, "the weight copied outside the device guard"
        return weight_for(weight, direct)

    monkeypatch.setattr(conv, "_weight_for", guarded_weight_for)
    monkeypatch.setattr(conv, "launch_device", guard)
    monkeypatch.setattr(conv.Launch, "run", checked)
    x = torch.randn(1, 16, 5, 5)
    out = conv.conv2d(x, torch.randn(16, 16, 3, 3), padding=1)
    assert guarded == [x.device] and len(launched) > 1 and math.isfinite(out.sum().item())
