"""Training memory, exact on any device: the activation bytes autograd keeps between a forward and its
backward, and a step's peak above what was allocated at its start.

- kept bytes: every tensor autograd saves passes through `torch.autograd.graph.saved_tensors_hooks`; the distinct
  storages among the activation-sized ones (the batch leads their shape; not the model's parameters, buffers or
  autocast's copies of them), in bytes. Deterministic: budgets in
  tests hold it exactly. (pyfast's lean training passes the tensors its recipes keep through the same hooks.)
- peak: on CUDA `torch.cuda.max_memory_allocated`; on a CPU the profiler's allocation and free records, summed
  in order (`timing.cpu_peak_bytes`), which need no allocator statistics.

`python -m pyfast.benchmarks.memory` prints both for the model families, fused against eager in one run, with
lean training on and off, in float32 and under bfloat16 autocast; `--speed` times the fused training step with
lean training on and off, interleaved (what the rebuilt activations cost).
"""
import argparse
import contextlib
import statistics
import time
from typing import Callable, Dict, Optional

import torch
from torch import Tensor, nn

from pyfast.ops.lean import use_lean

from .timing import cpu_peak_bytes


def _storage_key(t: Tensor):
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.device, storage.nbytes()


class SavedTensors:
    """The tensors autograd saves while the context is open, by distinct storage: `.bytes` and `.count`; with
    `batch`, only activations, the tensors of at least two dimensions whose first is `batch`. Saving goes on as
    usual (the hooks hand every tensor back)."""

    def __init__(self, batch: Optional[int] = None) -> None:
        self.batch = batch
        self.storages: Dict[tuple, int] = {}

    def _pack(self, t: Tensor):
        if self.batch is None or (t.dim() >= 2 and t.shape[0] == self.batch):
            key = _storage_key(t)
            self.storages[key] = key[2]
        return t

    def __enter__(self) -> "SavedTensors":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    @property
    def count(self) -> int:
        return len(self.storages)


def autocast_context(device: torch.device, dtype: Optional[torch.dtype]):
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def kept_bytes(model: nn.Module, x: Tensor, autocast_dtype: Optional[torch.dtype] = None) -> int:
    """Activation bytes one training forward of `model` on `x` keeps for the backward (run, then freed)."""
    with SavedTensors(batch=x.shape[0]) as saved, autocast_context(x.device, autocast_dtype):
        out = model(x)
    del out
    return saved.bytes


def step_peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    """The most bytes `step()` has allocated at once above what was allocated when it began (a step that frees
    tensors first, as zero_grad(set_to_none=True) does, can peak below them)."""
    if device.type != "cuda":
        return cpu_peak_bytes(step)
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start


def training_step(model: nn.Module, x: Tensor, autocast_dtype: Optional[torch.dtype] = None) -> Callable[[], None]:
    """forward + backward of a sum loss, with the parameter gradients freed first (set_to_none)."""
    def step():
        model.zero_grad(set_to_none=True)
        with autocast_context(x.device, autocast_dtype):
            loss = model(x).float().sum()
        loss.backward()
    return step


def lean_speed(model: nn.Module, x: Tensor, rounds: int = 6, calls: int = 3) -> float:
    """The fused step's time with lean training off over with it on (above 1: lean is faster), from `rounds`
    interleaved rounds of `calls` steps each, medians of the per-call times."""
    step = training_step(model, x)
    times = {True: [], False: []}
    for _ in range(rounds):
        for on in (True, False):
            with use_lean(on):
                step()  # warm after the switch
                for _ in range(calls):
                    start = time.perf_counter()
                    step()
                    times[on].append(time.perf_counter() - start)
    return statistics.median(times[False]) / statistics.median(times[True])


_MODELS = ("resnet18", "resnet50", "regnetx_32", "regnetx_400mf", "vionet_d", "preact_resnet50",
           "torchvision.resnet50")


def eager_and_fused(name: str):
    """(the eager model, the fused one with its weights): a pyfast model, or "torchvision.NAME" under pyfast.fuse."""
    import pyfast

    if name.startswith("torchvision."):
        import torchvision

        eager = getattr(torchvision.models, name.partition(".")[2])()
        return eager, pyfast.fuse(eager)[0]
    eager = pyfast.models.create(name)
    fused = pyfast.models.create(name, fused=True)
    fused.load_state_dict(eager.state_dict())
    return eager, fused


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(_MODELS),
                        help="pyfast model names, or torchvision.NAME for a torchvision model under pyfast.fuse")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-peak", action="store_true", help="kept bytes only (a step per model is slower)")
    parser.add_argument("--speed", action="store_true", help="also time the fused step, lean on against off")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # shared machines: OpenMP's barriers stall when other processes hold the cores
    header = f"{'model':<16} {'dtype':<6} {'eager MiB':>10} {'fused MiB':>10} {'ratio':>6} {'not lean':>9}"
    if not args.no_peak:
        header += f" {'peak eager':>11} {'peak fused':>11} {'ratio':>6}"
    print(f"training forward, batch {args.batch_size}, {args.image_size}x{args.image_size}, channels_last, "
          f"{device.type}; kept = activation bytes autograd keeps for the backward; peak = a step's peak above "
          f"its start")
    print(header)
    for name in args.models:
        eager, fused = (m.to(device, memory_format=torch.channels_last).train() for m in eager_and_fused(name))
        in_chans = getattr(eager, "in_chans", 3)
        x = torch.randn(args.batch_size, in_chans, args.image_size, args.image_size, device=device)
        x = x.to(memory_format=torch.channels_last)
        for dtype in (None, torch.bfloat16):
            base = kept_bytes(eager, x, dtype)
            with use_lean(True):
                lean = kept_bytes(fused, x, dtype)
            with use_lean(False):
                not_lean = kept_bytes(fused, x, dtype)
            line = (f"{name:<16} {'bf16' if dtype else 'fp32':<6} {base / 2**20:>10.1f} {lean / 2**20:>10.1f} "
                    f"{lean / base:>6.2f} {not_lean / base:>9.2f}")
            if not args.no_peak:
                peaks = [step_peak_bytes(training_step(m, x, dtype), device) for m in (eager, fused)]
                line += f" {peaks[0] / 2**20:>11.1f} {peaks[1] / 2**20:>11.1f} {peaks[1] / peaks[0]:>6.2f}"
            print(line, flush=True)
        if args.speed:
            print(f"{name:<16} fp32   fused step, lean on vs off: {lean_speed(fused, x):.3f}x", flush=True)


if __name__ == "__main__":
    main()
