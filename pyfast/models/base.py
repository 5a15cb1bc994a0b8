"""What every pyfast model shares: input checks, its layer kit (fused or not), its analytic complexity."""
import dataclasses
from typing import Callable, Iterator, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .complexity import Complexity, complexity
from .layers import get_kit, translate_kit_names, set_fused, switch_backend
from .registry import register_model


def check_positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class ImageClassifier(nn.Module):
    """Base of the model families: `in_chans` input planes in, `num_classes` logits out.

    `fused=False` builds plain PyTorch layers (the eager baseline); `fused=True` runs the same modules
    through pyfast's fused ops, on op backend `backend` ("reference", "cpu", "cuda", "triton", "auto";
    None: pyfast's default, `pyfast.set_backend`). Subclasses build their modules with `self.kit` and
    list their units in order for `complexity` (`units()` yields `(name, kind, cost_fn)`)."""

    def __init__(self, num_classes: int, in_chans: int, fused: bool = False, backend: Optional[str] = None) -> None:
        super().__init__()
        self.num_classes = check_positive("num_classes", num_classes)
        self.in_chans = check_positive("in_chans", in_chans)
        self.kit = get_kit(*translate_kit_names(fused, backend))

    @property
    def fused(self) -> bool:
        return self.kit.fused

    @property
    def backend(self) -> Optional[str]:
        """The op backend of the fused ops (None: pyfast's default); None for an unfused model."""
        return self.kit.backend

    def set_fused(self, fused: bool = True, backend: Optional[str] = None) -> "ImageClassifier":
        """Run this model with (`fused=True`) or without pyfast's fused ops, in place; the weights stay."""
        return set_fused(self, fused, backend)

    def switch_backend(self, backend: str) -> "ImageClassifier":
        """Deprecated: `set_fused(backend == "fast")`."""
        return switch_backend(self, backend)

    def check_input(self, x: Tensor) -> None:
        if isinstance(x, torch.fx.Proxy):
            return  # symbolic tracing (pyfast.fuse): there is no shape to check yet
        if not isinstance(x, Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__} takes a 4-D (N, C, H, W) tensor, got {shape}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"{type(self).__name__} was built with in_chans={self.in_chans}, but the input has "
                             f"{x.shape[1]} channels (shape {tuple(x.shape)})")

    def units(self) -> Iterator[Tuple[str, str, callable]]:
        raise NotImplementedError

    def complexity(self, input_shape: Sequence[int] = None) -> Complexity:
        """FLOPs (multiply-adds), parameters, activations and minimal bytes per unit, without running;
        `input_shape` is (C, H, W) or (N, C, H, W), default (in_chans, 224, 224)."""
        return complexity(self, input_shape or (self.in_chans, 224, 224))


MODEL_ARGS = ("num_classes", "in_chans", "fused", "backend")


def build(model_cls, cfg, **kwargs):
    """`model_cls(cfg', num_classes=..., in_chans=..., fused=..., backend=...)` where cfg' is the dataclass `cfg`
    with the remaining keyword arguments replacing its fields (the registry's entry points use this)."""
    model_args = {k: kwargs.pop(k) for k in MODEL_ARGS if k in kwargs}
    if kwargs:
        names = {f.name for f in dataclasses.fields(cfg)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"{model_cls.__name__}: unknown argument(s) {unknown}; the model takes {list(MODEL_ARGS)} "
                            f"and the fields of {type(cfg).__name__}: {sorted(names)}")
        cfg = dataclasses.replace(cfg, **kwargs)
    return model_cls(cfg, **model_args)


def register_preset(name: str, model_cls, cfgs: Mapping, doc: str, cfg_name: Optional[str] = None) -> Callable:
    """Register, and return, the entry point `name(**kwargs)`: `build(model_cls, cfgs[cfg_name or name],
    **kwargs)`, with `doc` for its docstring, a function `name` of `model_cls`'s module returning one."""
    key = name if cfg_name is None else cfg_name

    def entrypoint(**kwargs):
        return build(model_cls, cfgs[key], **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = model_cls.__module__
    entrypoint.__doc__ = doc
    entrypoint.__annotations__ = {"return": model_cls}
    return register_model(entrypoint)
