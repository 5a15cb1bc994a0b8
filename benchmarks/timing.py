"""The one timing helper every pyfast benchmark uses.

- `measure(fn, input_sets, device)`: warm-up, then many timed calls, each on the next input set
  (rotated, so that repeated calls do not just re-read a cache), timed with CUDA events on a GPU and
  `time.perf_counter` on the CPU; returns the median with the 20th/80th percentiles and the peak memory.
- `synchronize(device)` / `peak_memory(fn, args, device)`: for loops that someone else runs
  (pytest-benchmark's `pedantic`).
- `ceilings(device)`: the measured device-to-device copy bandwidth (bytes read + written) and matmul
  rate per dtype, against which achieved GB/s and TFLOP/s are reported.
- `environment(device)`: the stamp every result row carries (device, versions, date).

Inputs are random normal, never zeros (zeros hide unwritten outputs and can run faster than real data).
"""
import datetime
import importlib.metadata
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

Args = Sequence[object]


# -- statistics ------------------------------------------------------------------------------------
def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's
    default), so the median of an even count is the mean of the two middle samples."""
    if not samples:
        raise ValueError("percentile of no samples")
    ordered = sorted(samples)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class Measurement:
    """One timed function: milliseconds per call, and the peak memory of a call (bytes, None where
    the device keeps no allocator statistics: the CPU)."""
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    repeats: int
    peak_memory_bytes: Optional[int] = None
    first_call_s: Optional[float] = None  # the first warm-up call (torch.compile's compilation lands here)

    @classmethod
    def of(cls, samples_ms: Sequence[float], **extra) -> "Measurement":
        return cls(median_ms=percentile(samples_ms, 50), p20_ms=percentile(samples_ms, 20),
                   p80_ms=percentile(samples_ms, 80), min_ms=min(samples_ms), repeats=len(samples_ms), **extra)

    def as_dict(self) -> dict:
        return asdict(self)


# -- clocks ----------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class HostTimer:
    """Host clock around each call; the device is synchronized before each reading, so the time is
    the device's too. `clock` is injectable (tests use a fake one)."""

    def __init__(self, device="cpu", clock: Callable[[], float] = time.perf_counter):
        self.device, self.clock = torch.device(device), clock

    def mark(self):
        synchronize(self.device)
        return self.clock()

    def finish(self) -> None:
        synchronize(self.device)

    @staticmethod
    def elapsed_ms(start, end) -> float:
        return (end - start) * 1e3


class CudaEventTimer:
    """CUDA events recorded on the current stream around each call: no host synchronization inside
    the timed loop; `finish()` waits once at the end."""

    def __init__(self, device="cuda"):
        self.device = torch.device(device)

    def mark(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def finish(self) -> None:
        torch.cuda.synchronize(self.device)

    @staticmethod
    def elapsed_ms(start, end) -> float:
        return start.elapsed_time(end)


def timer_for(device) -> "HostTimer | CudaEventTimer":
    return CudaEventTimer(device) if torch.device(device).type == "cuda" else HostTimer(device)


# -- the loop --------------------------------------------------------------------------------------
def plan_repeats(estimate_ms: float, budget_ms: float, min_repeats: int, max_repeats: int) -> int:
    """How many timed calls fit a time budget, given one call's estimated time, within [min, max]."""
    fitting = int(budget_ms / max(estimate_ms, 1e-6))
    return max(min_repeats, min(max_repeats, fitting))


def measure(fn: Callable, input_sets: Sequence[Args], device="cpu", **kwargs) -> Measurement:
    """Times `fn(*input_sets[i % len(input_sets)])`: `sample`'s timings as a Measurement, with the peak memory."""
    samples, first_call_s = sample(fn, input_sets, device, **kwargs)
    return Measurement.of(samples, peak_memory_bytes=max_memory(torch.device(device)), first_call_s=first_call_s)


def sample(fn: Callable, input_sets: Sequence[Args], device="cpu", *, warmup: int = 3, repeats: int = 20,
           min_repeats: int = 5, budget_s: Optional[float] = None, timer=None,
           flush: Optional[Callable[[], None]] = None) -> Tuple[List[float], Optional[float]]:
    """(milliseconds of each timed call of `fn(*input_sets[i % len(input_sets)])`, the first warm-up call's
    seconds).

    warmup: untimed calls first (the first one's wall time is kept as `first_call_s`: compilation,
        autotuning, cuDNN plan search land there).
    repeats: timed calls; with `budget_s`, fewer (never under `min_repeats`) when the warm-up says
        they would not fit the budget.
    flush: called untimed before each timed call (e.g. overwrite the L2 cache).
    timer: a HostTimer/CudaEventTimer-like object (default: by device).
    """
    if not input_sets:
        raise ValueError("measure needs at least one input set")
    device = torch.device(device)
    timer = timer or timer_for(device)
    host = HostTimer(device)
    first_call_s = None
    warm_ms = []
    for i in range(max(warmup, 1)):
        start = host.mark()
        fn(*input_sets[i % len(input_sets)])
        elapsed = host.elapsed_ms(start, host.mark())
        if i == 0:
            first_call_s = elapsed / 1e3
        else:
            warm_ms.append(elapsed)
    if budget_s is not None:
        estimate = min(warm_ms) if warm_ms else first_call_s * 1e3
        repeats = plan_repeats(estimate, budget_s * 1e3, min(min_repeats, repeats), repeats)
    reset_peak_memory(device)
    marks = []
    for i in range(repeats):
        args = input_sets[(i + warmup) % len(input_sets)]
        if flush is not None:
            flush()
        start = timer.mark()
        fn(*args)
        marks.append((start, timer.mark()))
    timer.finish()
    return [timer.elapsed_ms(start, end) for start, end in marks], first_call_s


# -- memory ----------------------------------------------------------------------------------------
def reset_peak_memory(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def max_memory(device) -> Optional[int]:
    """Peak bytes allocated since the last reset (CUDA caching allocator); None on the CPU, whose
    allocator keeps no statistics (cpu_peak_bytes measures a call there)."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def peak_memory(fn: Callable, args: Args, device) -> Optional[int]:
    """Peak memory of one call of `fn(*args)`: on CUDA absolute (parameters and inputs included), on a CPU
    above what was allocated when the call began (cpu_peak_bytes)."""
    if torch.device(device).type != "cuda":
        return cpu_peak_bytes(lambda: fn(*args))
    reset_peak_memory(device)
    fn(*args)
    synchronize(device)
    return max_memory(device)


def cpu_peak_bytes(call: Callable[[], object]) -> int:
    """The most bytes `call()` has allocated at once on a CPU above what was allocated when it began (a call that
    first frees tensors, as zero_grad(set_to_none=True) does, can peak below them): the running sum of the
    profiler's allocation and free records in their order. `call` runs twice: the profiler knows the size of a
    block it frees only if it saw it allocated."""
    for _ in range(2):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            call()
    records = sorted((e for e in prof.profiler.kineto_results.events()
                      if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU),
                     key=lambda e: e.start_ns())
    level = peak = 0
    for record in records:
        level += record.nbytes()
        peak = max(peak, level)
    return peak


# -- inputs ----------------------------------------------------------------------------------------
def cache_bytes(device) -> int:
    """The last-level cache a repeated input could stay in: the GPU's L2, else the CPU's L3 (sysfs),
    else 32 MiB."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    sizes = []
    for index in range(8):
        path = f"/sys/devices/system/cpu/cpu0/cache/index{index}/size"
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes) if sizes else 32 << 20


def rotation_count(set_bytes: int, cache: int, max_sets: int = 8) -> int:
    """How many input sets to rotate through so that together they are at least twice the cache
    (one set when a set alone already is)."""
    if set_bytes <= 0:
        return 1
    return max(1, min(max_sets, math.ceil(2 * cache / set_bytes)))


def random_input_sets(make: Callable[[], Args], device, max_sets: int = 8) -> List[Args]:
    """Input sets from `make()` (which draws random tensors), as many as `rotation_count` asks."""
    first = list(make())
    set_bytes = sum(t.numel() * t.element_size() for t in first if isinstance(t, torch.Tensor))
    count = rotation_count(set_bytes, cache_bytes(device), max_sets)
    return [first] + [list(make()) for _ in range(count - 1)]


def l2_flusher(device) -> Optional[Callable[[], None]]:
    """On a GPU, a function that overwrites a buffer twice the L2's size (as triton's do_bench does)
    so that a timed call does not find the previous call's data in cache; None on the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    buffer = torch.empty(2 * cache_bytes(device) // 4, dtype=torch.int32, device=device)
    return lambda: buffer.fill_(1)


# -- ceilings --------------------------------------------------------------------------------------
@dataclass
class Ceilings:
    copy_gbps: float  # device-to-device copy, (bytes read + bytes written) / time
    matmul_tflops: dict  # dtype name -> TFLOP/s of a large matrix product in that dtype

    def as_dict(self) -> dict:
        return asdict(self)


def copy_bandwidth(device, nbytes: Optional[int] = None, repeats: int = 10) -> float:
    """GB/s of `dst.copy_(src)` counting the bytes read and the bytes written."""
    device = torch.device(device)
    nbytes = nbytes or ((1 << 30) if device.type == "cuda" else (64 << 20))
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    m = measure(lambda: dst.copy_(src), [()], device, warmup=3, repeats=repeats)
    return 2 * nbytes / (m.median_ms * 1e-3) / 1e9


def matmul_rate(device, dtype: torch.dtype, n: Optional[int] = None, repeats: int = 10) -> float:
    """TFLOP/s of an n x n x n matrix product on random data. For float32 on a GPU, TF32 is allowed
    exactly when cuDNN's convolutions are allowed it (the ceiling a float32 convolution can reach)."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
    try:
        m = measure(lambda: torch.mm(a, b), [()], device, warmup=3, repeats=repeats)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return 2 * n ** 3 / (m.median_ms * 1e-3) / 1e12


def ceilings(device, dtypes=(torch.float32, torch.bfloat16)) -> Ceilings:
    return Ceilings(copy_gbps=copy_bandwidth(device),
                    matmul_tflops={dtype_name(d): matmul_rate(device, d) for d in dtypes})


# -- CPU threads ----------------------------------------------------------------------------------
def choose_cpu_threads(requested: Optional[int] = None) -> Tuple[int, Optional[str]]:
    """Sets torch's CPU threads and returns (threads, note). Default: torch's own count, except on a
    machine whose load average already exceeds its cores, where one thread is used: OpenMP threads
    wait at a barrier after every op, and when other processes hold the cores each wait costs a
    time slice (measured here, 2 cores at load 7: a RegNetX-32 training step at 2x1x32x32 took 3 s
    with 2 threads and 0.06 s with 1)."""
    note = None
    if requested is None:
        requested = torch.get_num_threads()
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        if requested > 1 and load > (os.cpu_count() or 1):
            note = (f"the CPU is busy (load {load:.1f} on {os.cpu_count()} cores): timing with 1 thread, since "
                    f"OpenMP barriers stall when other processes hold the cores; --threads overrides")
            requested = 1
    torch.set_num_threads(requested)
    return requested, note


# -- the stamp ------------------------------------------------------------------------------------
def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}[dtype]


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def environment(device) -> dict:
    """Device, versions and date: stamped on every result row."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "python": platform.python_version(),
        "pyfast": _version("pyfast"),
        "tf32_conv": bool(torch.backends.cudnn.allow_tf32) if cuda else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host_cpus": os.cpu_count(),
    }
