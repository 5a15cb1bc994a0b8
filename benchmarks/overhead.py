"""What a fused call costs besides its kernels: kernels dispatched and host time, fast against eager.

`python -m pyfast.benchmarks.overhead` prints, in one run, every cost target of the op layer:

- kernels per step: every op dispatched to a kernel (views and allocations aside, counted by a
  TorchDispatchMode) plus every Triton launch, for a training step (forward + backward, no optimizer) and an
  inference call, of RegNetX-32 and ResNet-50 at batch 2, 32x32, on the `cpu` backend and on the `triton`
  backend (under TRITON_INTERPRET=1 where there is no GPU);
- host time per call: thread CPU time of each fused op against its eager sequence on a tiny input at one
  thread (the kernels are then negligible, so this is the Python/dispatch work);
- whole-model host time per step of narrow RegNetX-32 and ResNet-50 (tiny input, one thread);
- CPU speed (batch 8, 112x112, one thread) of the fast model against eager and the *conv-only floor*: the
  eager model with every BatchNorm2d and ReLU replaced by identity, what free BN/ReLU would give;
- `pyfast.fuse` of torchvision resnet50 and regnet_x_400mf against the unfused model.

Providers are interleaved in one run and reported as ratios (these machines are shared: absolute times
swing, ratios measured together do not). Counts are exact; tests/ops/test_dispatch_counts.py holds them to
budgets. `--only kernels,host,models,speed,fuse` picks sections.
"""
import argparse
import contextlib
import copy
import os
import statistics
import sys
import time
from collections import Counter
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
               "lift_fresh", "_unsafe_view", "clone_empty"}


# -- counting -------------------------------------------------------------------------------------------
class KernelCounter(TorchDispatchMode):
    """Counts what a region dispatches: ATen and pyfast ops that run a kernel (views and allocations are not
    kernels) and Triton launches (which bypass the dispatcher). What Triton's interpreter itself dispatches
    to move a launch's tensors is not counted: on a GPU it does not exist."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.inside_launch = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not (self.inside_launch or func.is_view or name in ALLOCATIONS):
            self.ops[f"{func.namespace}.{name}"] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _triton_launches(mode: KernelCounter, execute: bool = True) -> Iterator[None]:
    """Counts `kernel[grid](...)` launches of Triton kernels (compiled or interpreted) into `mode`. With
    execute=False the launches are counted and not run: how many launches a step makes does not depend on the
    values, and Triton's CPU interpreter takes minutes per model step (the outputs are then garbage, which
    only the counts may be read after)."""
    try:
        from triton.runtime import interpreter, jit
    except ImportError:
        yield
        return
    classes = [jit.KernelInterface, interpreter.InterpretedFunction]
    originals = {cls: cls.__getitem__ for cls in classes}

    def counting(original):
        def getitem(self, grid):
            launch = original(self, grid)

            def run(*args, **kwargs):
                fn = getattr(self, "fn", self)
                mode.ops[f"triton.{getattr(fn, '__name__', type(fn).__name__)}"] += 1
                if not execute:
                    return None
                outer, mode.inside_launch = mode.inside_launch, True
                try:
                    return launch(*args, **kwargs)
                finally:
                    mode.inside_launch = outer
            return run
        return getitem

    for cls in classes:
        cls.__getitem__ = counting(originals[cls])
    try:
        yield
    finally:
        for cls, original in originals.items():
            cls.__getitem__ = original


def count_kernels(fn: Callable[[], object], execute_triton: bool = True) -> Counter:
    """op name -> how many times `fn()` dispatched it (kernels and Triton launches only)."""
    mode = KernelCounter()
    with _triton_launches(mode, execute_triton), mode:
        fn()
    return mode.ops


# -- models -------------------------------------------------------------------------------------------------
def build(name: str, fused: bool, **overrides) -> nn.Module:
    """The registered model `name` built from eager layers or from pyfast's fused ones (same seed, same
    weights)."""
    from pyfast import models

    torch.manual_seed(0)
    return models.create(name, fused=fused, **overrides)


MODELS = {  # name -> (in_chans, num_classes, narrow overrides for the host-time rows)
    "regnetx_32": (1, 10, dict(widths=(8, 16, 32, 64), stem_width=8, group_widths=8)),
    "resnet50": (3, 1000, dict(widths=(8, 16, 32, 64), stem_width=8)),
}


def training_step(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    """Forward, loss and backward of one training step, gradients freed first as `zero_grad` does (no
    optimizer: its kernels are the same for both)."""
    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), labels).backward()
    return step


def inference_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step():
        with torch.no_grad():
            model(x)
    return step


def model_steps(name: str, fused: bool, batch: int, size: int, training: bool, **overrides):
    in_chans, num_classes, _ = MODELS[name]
    model = build(name, fused, in_chans=in_chans, num_classes=num_classes, **overrides).train(training)
    x = torch.randn(batch, in_chans, size, size)
    labels = torch.randint(0, num_classes, (batch,))
    return training_step(model, x, labels) if training else inference_step(model, x)


def kernel_counts(name: str, backend: str, training: bool, batch: int = 2, size: int = 32) -> Dict[str, int]:
    """Kernels per step of `name`, eager and fast on `backend`, after one warm-up step (caches filled). Under
    Triton's CPU interpreter its launches are counted without being run (see _triton_launches)."""
    import pyfast

    execute = not (backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1")
    counts = {}
    for fused in (False, True):
        step = model_steps(name, fused, batch, size, training)
        with pyfast.use_backend(backend):
            with _triton_launches(KernelCounter(), execute):
                step()
            counts["fast" if fused else "eager"] = sum(count_kernels(step, execute).values())
    return counts


# -- host time ------------------------------------------------------------------------------------------
def thread_time_us(fn: Callable[[], object], repeats: int = 7, calls: int = 20) -> float:
    """Median over `repeats` of the thread CPU time of one call of fn, averaged over `calls` calls."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.thread_time()
        for _ in range(calls):
            fn()
        samples.append((time.thread_time() - start) / calls * 1e6)
    return statistics.median(samples)


def interleaved(providers: Dict[str, Callable[[], object]], rounds: int = 5, **kwargs) -> Dict[str, float]:
    """Each provider's median over `rounds` interleaved measurements (so drift hits all of them alike)."""
    samples: Dict[str, List[float]] = {name: [] for name in providers}
    for _ in range(rounds):
        for name, fn in providers.items():
            samples[name].append(thread_time_us(fn, **kwargs))
    return {name: statistics.median(values) for name, values in samples.items()}


def op_cases(backend: str) -> Dict[str, Dict[str, Callable[[], object]]]:
    """case -> {"eager": the PyTorch sequence, "fast": the fused op}, on a 1x16x4x4 input."""
    from pyfast import ops

    x = torch.randn(1, 16, 4, 4)
    conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    bn, bn2 = nn.BatchNorm2d(16), nn.BatchNorm2d(16)
    w, s = conv.weight, torch.randn(1, 16, 4, 4)

    def eager_bn(t, b, training):
        if training:
            b.num_batches_tracked.add_(1)
        return F.batch_norm(t, b.running_mean, b.running_var, b.weight, b.bias, training, 0.1, 1e-5)

    frozen = nn.BatchNorm2d(16).eval()  # the eval cases' own: a training case would change its statistics

    def fast_cbr(training):
        b = bn if training else frozen
        return ops.conv_bn_relu(x, w, None, b.weight, b.bias, b.running_mean, b.running_var,
                                b.num_batches_tracked, training=training, padding=1, backend=backend)

    def fast_bar(training):
        b = bn if training else frozen
        return ops.bn_add_relu(s, b.weight, b.bias, b.running_mean, b.running_var, b.num_batches_tracked,
                               training=training, shortcut=x, backend=backend)

    def fast_cbar(training):
        b = bn if training else frozen
        return ops.conv_bn_add_relu(x, w, None, b.weight, b.bias, b.running_mean, b.running_var,
                                    b.num_batches_tracked, training=training, padding=1, shortcut=s, backend=backend)

    def fast_brc(training):
        return ops.bn_relu_conv(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked,
                                training=training, weight=w, padding=1, backend=backend)

    xg = x.clone().requires_grad_()
    sg = s.clone().requires_grad_()

    def backward(fn):
        def run():
            fn().sum().backward()
        return run

    cases = {
        "conv_bn_relu train fwd": {"eager": lambda: F.relu(eager_bn(F.conv2d(x, w, padding=1), bn2, True)),
                                   "fast": lambda: fast_cbr(True)},
        "conv_bn_relu eval no-grad": {"eager": torch.no_grad()(lambda: F.relu(eager_bn(F.conv2d(x, w, padding=1),
                                                                                       bn2, False))),
                                      "fast": torch.no_grad()(lambda: fast_cbr(False))},
        "bn_add_relu train fwd": {"eager": lambda: F.relu(eager_bn(s, bn2, True) + x), "fast": lambda: fast_bar(True)},
        "bn_add_relu eval no-grad": {"eager": torch.no_grad()(lambda: F.relu(eager_bn(s, bn2, False) + x)),
                                     "fast": torch.no_grad()(lambda: fast_bar(False))},
        "conv_bn_add_relu train fwd": {"eager": lambda: F.relu(eager_bn(F.conv2d(x, w, padding=1), bn2, True) + s),
                                       "fast": lambda: fast_cbar(True)},
        "bn_relu_conv train fwd": {"eager": lambda: F.conv2d(F.relu(eager_bn(x, bn2, True)), w, padding=1),
                                   "fast": lambda: fast_brc(True)},
        "add_relu": {"eager": lambda: F.relu(x + s),
                     "fast": lambda: ops.add_relu(x, s, backend=backend)},
        "conv_bn_relu train fwd+bwd": {
            "eager": backward(lambda: F.relu(eager_bn(F.conv2d(xg, w, padding=1), bn2, True))),
            "fast": backward(lambda: ops.conv_bn_relu(xg, w, None, bn.weight, bn.bias, bn.running_mean,
                                                      bn.running_var, bn.num_batches_tracked, training=True,
                                                      padding=1, backend=backend))},
        "bn_add_relu train fwd+bwd": {
            "eager": backward(lambda: F.relu(eager_bn(sg, bn2, True) + xg)),
            "fast": backward(lambda: ops.bn_add_relu(sg, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                                     bn.num_batches_tracked, training=True, shortcut=xg,
                                                     backend=backend))},
        "bn_relu_conv train fwd+bwd": {
            "eager": backward(lambda: F.conv2d(F.relu(eager_bn(xg, bn2, True)), w, padding=1)),
            "fast": backward(lambda: ops.bn_relu_conv(xg, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                                      bn.num_batches_tracked, training=True, weight=w, padding=1,
                                                      backend=backend))},
    }
    return cases


# -- speed --------------------------------------------------------------------------------------------------
class _Identity(nn.Module):
    def forward(self, x, *args):
        return x


class _ConvOnlyKit:
    """The kit of a pyfast.models block without BN and ReLU: its convolutions and residual additions only (the
    eager kit calls F.relu, which no module replacement reaches)."""

    fused = False
    backend = None

    def scope(self):
        return contextlib.nullcontext()

    def max_pool(self, x, pool):
        return pool(x)

    def conv_bn_relu(self, x, conv, bn, relu=True):
        return conv(x)

    def bn_add_relu(self, y, bn, shortcut, shortcut_bn=None, relu=True):
        return y.add_(shortcut)

    def conv_bn_add_relu(self, x, conv, bn, shortcut, shortcut_bn=None, relu=True):
        return conv(x).add_(shortcut)

    def bn_relu_conv(self, x, bn, conv):
        return conv(x)

    def bn_relu(self, x, bn):
        return x


def conv_only_floor(model: nn.Module) -> nn.Module:
    """`model` with every BatchNorm2d and ReLU replaced by identity: the speed if BN and ReLU were free. The
    blocks of pyfast.models get a kit of their convolutions and additions alone."""
    floor = copy.deepcopy(model)
    for parent in floor.modules():
        if hasattr(parent, "kit"):
            parent.kit = _ConvOnlyKit()
        for name, child in list(parent.named_children()):
            if isinstance(child, (nn.BatchNorm2d, nn.ReLU)):
                setattr(parent, name, _Identity())
    return floor


def wall_ms(fn: Callable[[], object], repeats: int = 5) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def interleaved_wall(providers: Dict[str, Callable[[], object]], rounds: int = 5) -> Dict[str, float]:
    samples: Dict[str, List[float]] = {name: [] for name in providers}
    for _ in range(rounds):
        for name, fn in providers.items():
            samples[name].append(wall_ms(fn, repeats=3))
    return {name: statistics.median(values) for name, values in samples.items()}


# -- report -------------------------------------------------------------------------------------------------
def _ratio_row(label: str, values: Dict[str, float], unit: str, target: Optional[str] = None) -> str:
    ratio = values["fast"] / values["eager"]
    row = f"  {label:34s} eager {values['eager']:9.1f}{unit}  fast {values['fast']:9.1f}{unit}  fast/eager {ratio:5.2f}"
    return row + (f"   (target {target})" if target else "")


def report_kernels(out) -> None:
    print("kernels per step (views and allocations aside), batch 2, 32x32", file=out)
    backends = ["cpu"]
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        backends.append("triton")
    for backend in backends:
        for name in MODELS:
            for training in (True, False):
                target = ("1.0" if training else ("0.7" if backend == "cpu" else "0.5"))
                mode = "training" if training else "inference"
                counts = kernel_counts(name, backend, training)
                print(_ratio_row(f"{backend:6s} {name} {mode}", counts, "", f"<= {target}"), file=out)


def report_host(out) -> None:
    print("host time per call, 1x16x4x4, 1 thread, thread CPU time (us)", file=out)
    for case, providers in op_cases("cpu").items():
        target = "<= 1.3" if "bwd" in case else "<= 1.5"
        print(_ratio_row(case, interleaved(providers), "us", target), file=out)


def report_models(out) -> None:
    print("whole-model host time per step, narrow widths, 2x32x32, 1 thread, thread CPU time (ms)", file=out)
    for name, (_, _, narrow) in MODELS.items():
        for training in (True, False):
            steps = {("fast" if fused else "eager"): model_steps(name, fused, 2, 32, training, **narrow)
                     for fused in (False, True)}
            times = {k: v / 1e3 for k, v in interleaved(steps, rounds=7, repeats=3, calls=3).items()}
            mode = "training" if training else "inference"
            print(_ratio_row(f"{name} {mode}", times, "ms", "<= 1.2" if training else "<= 1.0"), file=out)


def report_speed(out) -> None:
    print("CPU speed, batch 8, 112x112, 1 thread, wall time (ms); floor = eager without BN/ReLU", file=out)
    for name in ("regnetx_32", "regnetx_400mf", "resnet50"):
        in_chans = MODELS.get(name, (3,))[0]
        num_classes = 10 if in_chans == 1 else 1000
        for training in (True, False):
            eager = build(name, False, in_chans=in_chans, num_classes=num_classes).train(training)
            fast = build(name, True, in_chans=in_chans, num_classes=num_classes).train(training)
            floor = conv_only_floor(eager)
            x = torch.randn(8, in_chans, 112, 112)
            labels = torch.randint(0, num_classes, (8,))
            make = (lambda m: training_step(m, x, labels)) if training else (lambda m: inference_step(m, x))
            t = interleaved_wall({"eager": make(eager), "fast": make(fast), "floor": make(floor)})
            speed_fast, speed_floor = t["eager"] / t["fast"], t["eager"] / t["floor"]
            mode = "training" if training else "inference"
            if training:
                share = (speed_fast - 1) / (speed_floor - 1) if speed_floor > 1 else float("nan")
                verdict = f"gain taken {share:5.2f} (target >= 0.5)"
            else:
                verdict = f"fast/floor time {t['fast'] / t['floor']:5.2f} (target <= 1.1)"
            print(f"  {name:14s} {mode:9s} eager {t['eager']:8.1f}  fast {t['fast']:8.1f}  floor {t['floor']:8.1f}"
                  f"  speed vs eager: fast {speed_fast:4.2f}x floor {speed_floor:4.2f}x  {verdict}", file=out)


def report_fuse(out) -> None:
    try:
        import torchvision
    except ImportError as error:
        print(f"fuse: skipped (torchvision not importable: {error})", file=out)
        return
    import pyfast

    print("pyfast.fuse on torchvision models, batch 8, 224x224, default threads, wall time (ms)", file=out)
    for name in ("resnet50", "regnet_x_400mf"):
        for training in (True, False):
            torch.manual_seed(0)
            plain = getattr(torchvision.models, name)().train(training)
            fused, _ = pyfast.fuse(copy.deepcopy(plain))
            fused.train(training)
            x = torch.randn(8, 3, 224, 224)
            labels = torch.randint(0, 1000, (8,))
            make = (lambda m: training_step(m, x, labels)) if training else (lambda m: inference_step(m, x))
            t = interleaved_wall({"unfused": make(plain), "fused": make(fused)}, rounds=4)
            mode = "training" if training else "inference"
            print(f"  {name:16s} {mode:9s} unfused {t['unfused']:8.1f}  fused {t['fused']:8.1f}  "
                  f"speed {t['unfused'] / t['fused']:4.2f}x (target >= 1.0)", file=out)


SECTIONS = {"kernels": report_kernels, "host": report_host, "models": report_models, "speed": report_speed,
            "fuse": report_fuse}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyfast.benchmarks.overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {list(SECTIONS)}")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for section in args.only.split(","):
        if section not in SECTIONS:
            parser.error(f"unknown section {section!r}; choose from {list(SECTIONS)}")
        if section == "fuse":
            torch.set_num_threads(os.cpu_count() or 1)
        SECTIONS[section](sys.stdout)
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
