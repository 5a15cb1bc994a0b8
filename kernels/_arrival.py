"""One launch per reduction: the program that finishes a group's partials combines them.

The reductions of kernels/batch_norm.py and the statistics epilogue of kernels/conv.py split their work over
many programs that each write per-channel partials. Instead of a second launch that combines the partials,
every program arrives at its group's int32 counter after writing them (an atomic add with acq_rel semantics:
its partials are released before it, and the program that completes the count acquires everyone's), and the
program whose arrival completes the count merges the group's partials. It merges them in a fixed order, the
same whichever program arrives last, so the results do not depend on scheduling: deterministic, and no
floating-point atomics (integer counters only). The merging program reads the partials with
cache_modifier=".cg" (from L2, the point of coherence: its SM's L1 may hold lines of them from before).

That program also resets its counter to 0, so the counters are zero before and after every launch. Counters that
two launches running at the same time share would mix their counts and could be left non-zero, and a non-zero
counter makes the wrong program combine on every later launch: `arrival_counters` gives no two such launches the
same counters.

* Eager launches share a cached buffer per device and stream (launches on one stream run one after the other;
  on two streams they may overlap), zero-filled once instead of per launch. No buffer is ever freed, an outgrown
  one included (they are a few KB): no address a launch or a graph may still use is handed to other memory.
* A launch captured into a CUDA graph gets its own buffer, zero-filled inside the graph: a graph never shares
  counters with eager launches or with another graph (two graphs may be replayed at the same time), every replay
  starts from zeros, and the buffer lives in the graph's memory pool as long as the graph does.

`stuck_counters` lists the cached buffers that are not all zero (it synchronizes): the GPU check runs it after
its launches.
"""
import contextlib

import torch
import triton
import triton.language as tl

_COUNTERS = {}  # (device, stream or None) -> the newest int32 zeros of eager launches on that stream
_OUTGROWN = []  # buffers that _COUNTERS replaced with larger ones, kept alive (see the module docstring)
_MIN_COUNTERS = 1024


def _capturing(device: torch.device) -> bool:
    """Whether a launch on `device` is being captured into a CUDA graph: the current stream, which Triton launches
    on, is capturing (a CPU device, under Triton's interpreter, never is)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _stream_key(device: torch.device):
    return (device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None)


def launch_device(device: torch.device):
    """A context making `device` current for a launch on its tensors: Triton launches on the current device and its
    current stream, while the counters are those of `device`'s stream. A no-op when it is current already."""
    if device.type != "cuda" or device.index in (None, torch.cuda.current_device()):
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def arrival_counters(device: torch.device, count: int) -> torch.Tensor:
    """At least `count` int32 counters, zero, for a launch on `device`'s current stream: a buffer of its own
    under CUDA-graph capture, else the stream's cached one."""
    if _capturing(device):
        return torch.zeros(count, dtype=torch.int32, device=device)  # a fill node in the graph: zeros per replay
    key = _stream_key(device)
    counters = _COUNTERS.get(key)
    if counters is None or counters.numel() < count:
        if counters is not None:
            _OUTGROWN.append(counters)
        counters = _COUNTERS[key] = torch.zeros(max(count, _MIN_COUNTERS), dtype=torch.int32, device=device)
    return counters


def stuck_counters() -> list:
    """(device, stream) of every cached buffer with a counter left non-zero, which would make the wrong program
    combine in later launches; synchronizes with the devices."""
    return [key for key, counters in _COUNTERS.items() if bool(counters.any())]


@triton.jit
def _last_to_arrive(counter_ptr, arrivals):
    """Arrive at the counter that `arrivals` programs share, after this program's partials are stored: True in
    the program that completes the count (it then sees every partial of the group) and resets the counter."""
    tl.debug_barrier()  # every thread of the program has stored its partials before the release below
    last = tl.atomic_add(counter_ptr, 1, sem="acq_rel") == arrivals - 1
    if last:
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed")  # nobody else touches it again in this launch
    tl.debug_barrier()  # the partials are read after the acquire, by every thread
    return last
