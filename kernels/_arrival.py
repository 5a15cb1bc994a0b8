"""One launch per reduction: the program that finishes a group's partials combines them.

The reductions of kernels/batch_norm.py and the statistics epilogue of kernels/conv.py split their work over
many programs that each write per-channel partials. Instead of a second launch that combines the partials,
every program arrives at its group's int32 counter after writing them (an atomic add with acq_rel semantics:
its partials are released before it, and the program that completes the count acquires everyone's), and the
program whose arrival completes the count merges the group's partials. It merges them in a fixed order, the
same whichever program arrives last, so the results do not depend on scheduling: deterministic, and no
floating-point atomics (integer counters only). The merging program reads the partials with
cache_modifier=".cg" (from L2, the point of coherence: its SM's L1 may hold lines of them from before).

That program also resets its counter to 0, so the counters are zero before and after every launch and a buffer
of them is cached instead of zero-filled per launch (`arrival_counters`). The cache is per device and per
stream: launches on one stream run one after the other, while launches on two streams may overlap and must not
share counters. A CUDA graph keeps the buffer of the stream it was captured on: replaying it while kernels of
these modules run on that stream outside the graph would share counters.
"""
import torch
import triton
import triton.language as tl

_COUNTERS = {}  # (device, stream or None) -> int32 zeros
_MIN_COUNTERS = 1024


def arrival_counters(device: torch.device, count: int) -> torch.Tensor:
    """At least `count` int32 counters, zero, for a launch on `device`'s current stream."""
    key = (device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None)
    counters = _COUNTERS.get(key)
    if counters is None or counters.numel() < count:
        # Only a larger launch than any before allocates (once); the old buffer is freed in stream order.
        counters = _COUNTERS[key] = torch.zeros(max(count, _MIN_COUNTERS), dtype=torch.int32, device=device)
    return counters


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
