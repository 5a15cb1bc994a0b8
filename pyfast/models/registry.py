"""The model registry: `@register_model` entry points, `create(name, ...)`, `list_models()`."""
import difflib
import fnmatch
from typing import Callable, Dict, List, Optional

from torch import nn

__all__ = ["create", "list_models", "model_entrypoint", "register_model"]

_MODELS: Dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Optional[Callable] = None, *, name: Optional[str] = None):
    """Register an entry point `fn(**kwargs) -> nn.Module` under `name` (default: its __name__).
    Usable bare (`@register_model`) or with a name (`@register_model(name="...")`)."""

    def register(f):
        key = name or f.__name__
        if key in _MODELS and _MODELS[key] is not f:
            raise ValueError(f"a model named {key!r} is already registered")
        _MODELS[key] = f
        return f

    return register(fn) if fn is not None else register


def list_models(pattern: Optional[str] = None) -> List[str]:
    """Sorted names of the registered models, optionally filtered by a shell-style `pattern`."""
    names = sorted(_MODELS)
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)] if pattern else names


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    if not isinstance(name, str):
        raise TypeError(f"a model name must be a str, got {type(name).__name__}")
    try:
        return _MODELS[name]
    except KeyError:
        close = difflib.get_close_matches(name, _MODELS, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} (pyfast.models.list_models() lists them)") from None


def create(name: str, **kwargs) -> nn.Module:
    """Build the registered model `name`. Every model takes `num_classes` (default 1000), `in_chans`
    (default 3), `fused` (default False: plain PyTorch layers; True: pyfast's fused ops) and `backend`
    (the fused ops' op backend: "reference", "cpu", "cuda", "triton", "auto", or None for pyfast's
    default); the other keyword arguments override fields of the model's configuration dataclass, e.g.
    `create("resnet50", num_classes=10, in_chans=1, widths=...)`."""
    return model_entrypoint(name)(**kwargs)
