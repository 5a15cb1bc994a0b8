"""What the benchmarks run: the three modes, the three providers, and the module each provider gets at
each level (model, block; ops live in `kernels.py`), shared by `report.py`, `kernels.py` and the
pytest-benchmark suites.

Modes (the same names at every level):
- `inference`: `module.eval()`, no autograd;
- `train_forward`: `module.train()`, the forward of a training step (autograd records);
- `train_step`: forward, backward and, for blocks and models, an SGD step (momentum 0.9). A model's
  loss is the cross-entropy against random labels; a block's or op's backward starts from a random
  output gradient.

Providers: `eager` (PyTorch as the model's eager layers write it: the baseline), `compile`
(`torch.compile` of that same eager module) and `pyfast` (the model built with `fused=True`: the
fused ops, op backend picked by pyfast's dispatcher; ops: each fused backend by name).

dtype `bf16` means `torch.autocast` to bfloat16 with float32 parameters; `fp32` is plain float32
(cuDNN's TF32 convolutions as PyTorch's defaults leave them, stamped on every row).
"""
import contextlib
import copy
import gc
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import timing

MODES = ("inference", "train_forward", "train_step")
PROVIDERS = ("eager", "compile", "pyfast")
# Opt-in providers (`--cuda-graphs`): a provider's whole step captured once in a CUDA graph and replayed, so
# that no host work is left in the timing -> the provider whose model it replays.
GRAPHED = {"eager+graph": "eager", "pyfast+graph": "pyfast"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYOUTS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}

# The input each model was designed for (the seed notebooks: FashionMNIST for the d2l-style RegNet
# family, ImageNet for the ResNets): in_chans, num_classes.
NATIVE_INPUT = {"regnetx_32": (1, 10), "vionet_d": (1, 10), "vionet_c": (1, 10), "vionet_g": (1, 10),
                "vionet_b": (1, 10), "deresnext": (1, 10)}
IMAGENET_INPUT = (3, 1000)


def native_input(model: str) -> Tuple[int, int]:
    """(in_chans, num_classes) of the data set `model` was made for."""
    return NATIVE_INPUT.get(model, IMAGENET_INPUT)


@dataclass(frozen=True)
class Config:
    """How one workload runs: mode, dtype and memory layout on a device."""
    mode: str
    dtype: str
    layout: str
    device: str

    def __post_init__(self):
        for value, allowed, what in ((self.mode, MODES, "mode"), (self.dtype, DTYPES, "dtype"),
                                     (self.layout, LAYOUTS, "layout")):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; choose from {list(allowed)}")

    @property
    def memory_format(self) -> torch.memory_format:
        return LAYOUTS[self.layout]

    @property
    def training(self) -> bool:
        return self.mode != "inference"

    @property
    def backward(self) -> bool:
        return self.mode == "train_step"

    def autocast(self):
        dtype = DTYPES[self.dtype]
        return torch.autocast(torch.device(self.device).type, dtype=dtype, enabled=dtype != torch.float32)


# -- modules --------------------------------------------------------------------------------------
def place(module: nn.Module, config: Config) -> nn.Module:
    """`module` on the config's device and layout, in train/eval mode as the config says."""
    module = module.to(config.device, memory_format=config.memory_format)
    return module.train(config.training)


def compiled(module: nn.Module) -> nn.Module:
    """`torch.compile(module)` after clearing Dynamo's caches: many models share a forward's code,
    and past its recompile limit Dynamo would silently fall back to eager."""
    torch.compiler.reset()
    return torch.compile(module)


def release(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def model_variants(name: str, providers: Sequence[str], num_classes: int, in_chans: int,
                   factory: Optional[Callable[..., nn.Module]] = None) -> Dict[str, object]:
    """provider -> a fresh model `name`, all with the eager model's weights, or the error text of a
    provider whose model could not be built. `factory` defaults to `pyfast.models.create`."""
    if factory is None:
        from pyfast import models
        factory = models.create
    eager = factory(name, num_classes=num_classes, in_chans=in_chans, fused=False)
    variants = {}
    for provider in providers:
        try:
            kind = GRAPHED.get(provider, provider)
            if kind == "eager":
                variants[provider] = eager if provider == "eager" else copy.deepcopy(eager)
            elif kind == "compile":
                variants[provider] = copy.deepcopy(eager)
            elif kind == "pyfast":
                fast = factory(name, num_classes=num_classes, in_chans=in_chans, fused=True)
                fast.load_state_dict(eager.state_dict())
                variants[provider] = fast
            else:
                raise ValueError(f"unknown provider {provider!r}; choose from {list(PROVIDERS) + list(GRAPHED)}")
        except (RuntimeError, ImportError) as error:
            variants[provider] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
    return variants


def blocks(model: nn.Module, input_shape: Sequence[int], per_stage: int = 2) -> list:
    """The `UnitCost`s (name = module path, kind, in/out shapes, FLOPs) of the first `per_stage`
    residual blocks of each stage of a pyfast model at `input_shape` (N, C, H, W) — the first one
    downsamples through a projection shortcut, the next has an identity shortcut — read off the
    model's analytic complexity (nothing runs)."""
    picked, seen = [], {}
    for unit in model.complexity(tuple(input_shape)).units:
        if unit.name in ("stem", "head"):
            continue
        stage = unit.name.rsplit(".", 1)[0]
        seen[stage] = seen.get(stage, 0) + 1
        if seen[stage] <= per_stage:
            picked.append(unit)
    return picked


# -- inputs ---------------------------------------------------------------------------------------
def image_batch(shape: Sequence[int], config: Config, num_classes: Optional[int] = None,
                grad_shape: Optional[Sequence[int]] = None) -> Callable[[], list]:
    """A maker of one input set: a random normal image batch in the config's layout, then the
    target: random labels (`num_classes`: a model's input, no gradient) or a random output gradient
    (`grad_shape`: a block's input, which needs its gradient in training as inside a network)."""
    device = torch.device(config.device)
    grad_dtype = DTYPES[config.dtype]

    def make():
        x = torch.randn(*shape, device=device).contiguous(memory_format=config.memory_format)
        if num_classes is not None:
            return [x, torch.randint(0, num_classes, (shape[0],), device=device)]
        x.requires_grad_(config.training)
        grad = torch.randn(*grad_shape, device=device, dtype=grad_dtype)
        return [x, grad.contiguous(memory_format=config.memory_format) if grad.dim() == 4 else grad]

    return make


def input_sets(make: Callable[[], list], config: Config) -> List[list]:
    return timing.random_input_sets(make, config.device)


# -- steps ----------------------------------------------------------------------------------------
def make_step(module: nn.Module, config: Config, optimizer: bool = True, autocast: bool = True) -> Callable:
    """`step(*inputs, target)` running `module` in the config's mode, under autocast to the config's
    dtype (unless `autocast` is False: inputs and weights already in that dtype). The target is class
    labels (an int64 tensor: cross-entropy loss) or an output gradient (backward starts from it).

    A `train_step` with `optimizer` is zero_grad, forward, backward, SGD step (lr 0.01, momentum 0.9);
    without, forward and `torch.autograd.grad` for the inputs that need one and the parameters
    (nothing accumulates into `.grad`: the op-level timings hold no extra pass)."""
    cast = config.autocast if autocast else contextlib.nullcontext
    if config.mode == "inference":
        def step(*args):
            with torch.no_grad(), cast():
                return module(*args[:-1])
        return step

    if config.mode == "train_forward":
        def step(*args):
            with cast():
                return module(*args[:-1])
        return step

    params = [p for p in module.parameters() if p.requires_grad]
    sgd = torch.optim.SGD(params, lr=0.01, momentum=0.9) if optimizer else None

    def step(*args):
        *inputs, target = args
        with cast():
            out = module(*inputs)
        if target.dtype == torch.int64:
            loss, grad = F.cross_entropy(out.float(), target), None
        else:
            loss, grad = out, target.to(out.dtype)
        if sgd is None:
            wrt = [t for t in inputs if t.requires_grad] + params
            return torch.autograd.grad(loss, wrt, grad, allow_unused=True)
        sgd.zero_grad(set_to_none=True)
        for t in inputs:
            t.grad = None
        loss.backward(grad)
        sgd.step()
    return step


def cuda_graphed(step: Callable, example: list, warmup: int = 3) -> Callable:
    """`step` captured once in a CUDA graph (PyTorch's whole-network capture: `warmup` calls on a side stream
    first, for tuning, caches and the optimizer's state), as a function that copies its arguments into the
    captured ones and replays the graph: its host work per call is the copies and one replay."""
    static = [t.detach().clone().requires_grad_(t.requires_grad) for t in example]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(*static)

    def replay(*args):
        with torch.no_grad():
            for target, value in zip(static, args):
                target.copy_(value)
        graph.replay()
        return out

    return replay
