"""Lean training: between forward and backward a fused network keeps one tensor per convolution.

Every activation a fused op writes is a pointwise (or pooling) function of tensors the backward keeps anyway:
conv_bn_relu's output is relu(y*scale + shift) of its convolution's output y, bn_add_relu's is
relu(y*scale + shift + shortcut') with the shortcut itself such an activation or a convolution's output. Eager
PyTorch keeps both y and the activation (the next convolution saves its input for its weight gradient; the
ReLU its output for its mask). Inside a `scope()` each fused op registers its output with the recipe that
rebuilds it (the Python Functions through `register`, the C++ ones in csrc/autograd/lean.h, taken over here at
the activation's first save), and autograd's saved-tensor hooks replace a registered activation, wherever any op
saves it, by that recipe: the backward rebuilds it when it first needs it, with the same kernel, inputs and
scale/shift as the forward, so it is bit-identical (no ReLU mask can differ).

Block outputs chain: out_k = relu(bn(y3_k) + out_{k-1}). A recipe whose source is another recipe rebuilds
that one first, so a stage's block outputs are rebuilt from its stored y's and its first block's projection
shortcut (or, through the stem's BN-ReLU-maxpool, from the stem's y), pointwise and pooling passes only,
never a convolution and never new statistics. A rebuilt value is kept while some saved handle of it is alive
(autograd frees a node's handles after its backward) and dropped with the last one, so the chain is built
once, in forward order, when the backward first needs it, and at most about one stage's outputs are alive.

Where the chain is broken nothing is assumed: an activation changed in place after the op wrote it (a
forward hook, an in-place op) no longer matches its recorded version and is stored as usual, and so is any
tensor an op did not register (drop_path's product, a feature tap's copy). Tensors saved as usual are checked
for in-place changes at unpack, as autograd itself does.

The hooks of an enclosing `torch.autograd.graph.saved_tensors_hooks` (e.g. `save_on_cpu`, or a test counting
saved bytes) still see every activation kept: stored tensors go through them, and so do a recipe's sources. A
fused op's weights and per-channel maps are kept on its autograd node instead (`save_for_backward` here,
csrc/autograd/common.h's save_tensors), with autograd's in-place check: a hook costs a Python round trip per
tensor, and these are never rebuilt.
A `saved_tensors_hooks` pushed inside the scope (`torch.utils.checkpoint`) takes precedence, as PyTorch's
hooks nest, and the tensors saved under it are its business.

Lean is the default; `set_lean(False)` (or PYFAST_LEAN=0) turns it off. The models and `pyfast.fuse`'s
modules open the scope around a training forward; under torch.compile it is not opened (AOTAutograd's
partitioner chooses what is saved there).
"""
import contextlib
import weakref
from typing import Callable, Optional

import torch
from torch import Tensor

from .. import _extension, _flags
from ._bn import bn_act

__all__ = ["Recipe", "active", "enabled", "register", "save_for_backward", "saved_tensors", "scope", "set_lean", "use_lean"]

_enabled = _flags.LEAN
_scope: Optional["_Scope"] = None  # the open scope (one per process: autograd's hooks are thread-local, but
# a training forward runs on one thread)


def set_lean(on: bool = True) -> None:
    """Turn lean training on (the default) or off for every fused model and `pyfast.fuse`d module."""
    global _enabled
    if not isinstance(on, bool):
        raise TypeError(f"set_lean takes a bool, got {on!r}")
    _enabled = on


def enabled() -> bool:
    return _enabled


@contextlib.contextmanager
def use_lean(on: bool):
    """set_lean(on) inside the context, the setting as it was after it (as pyfast.use_backend for backends)."""
    before = _enabled
    set_lean(on)
    try:
        yield
    finally:
        set_lean(before)


def active() -> bool:
    """Whether the fused ops now run inside an open scope (then they register their outputs)."""
    return _scope is not None


class Recipe:
    """How an activation is rebuilt: `compute(*values)`, the values being `sources` (tensors kept anyway, or
    other recipes, rebuilt first). Holds its rebuilt value while a saved handle of it is alive."""

    __slots__ = ("compute", "sources", "handles", "value_", "packed", "_outer")

    def __init__(self, compute: Callable[..., Tensor], sources: tuple, outer) -> None:
        self.compute, self.sources, self._outer = compute, sources, outer
        self.handles, self.value_, self.packed = 0, None, None

    def pack_sources(self) -> None:
        """The source tensors through the enclosing hooks (once; recursively through source recipes)."""
        if self.packed is not None:
            return
        pack = self._outer[0]
        for source in self.sources:
            if isinstance(source, Recipe):
                source.pack_sources()
        self.packed = tuple(s if isinstance(s, Recipe) or s is None else pack(s) for s in self.sources)

    def value(self) -> Tensor:
        if self.value_ is not None:
            return self.value_
        sources = self.sources if self.packed is None else self.packed
        unpack = None if self.packed is None else self._outer[1]
        values = []
        for source in sources:
            if isinstance(source, Recipe):
                values.append(source.value())
            elif unpack is None or source is None:
                values.append(source)
            else:
                values.append(unpack(source))
        with torch.no_grad():
            value = self.compute(*values)
        if self.handles:
            self.value_ = value
        return value


class _SavedRecipe:
    """What autograd keeps for a registered activation: a handle on its recipe."""

    __slots__ = ("recipe",)

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        recipe.handles += 1

    def __del__(self) -> None:
        recipe = self.recipe
        recipe.handles -= 1
        if not recipe.handles:
            recipe.value_ = None


def _stored(t: Tensor) -> tuple:
    """A tensor saved as usual, with its version for the in-place check autograd skips for hooked tensors: detached
    unless a leaf (a pack hook must not hold the saving node's own output, which would make a reference cycle; a
    leaf is no node's output, and a detach costs as much again as the rest of the hook)."""
    return (t if t.is_leaf else t.detach()), t._version


def _unstored(stored: tuple) -> Tensor:
    t, version = stored
    if t._version != version:
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an inplace operation: "
            f"a {tuple(t.shape)} {t.dtype} tensor is at version {t._version}; expected version {version} instead.")
    return t


class _Scope:
    """The registry of one training forward's activations and the hooks that consult it."""

    def __init__(self, outer, native) -> None:
        self.outer = outer  # (pack, unpack) of an enclosing saved_tensors_hooks, or None
        self.native = native  # pyfast._C, whose C++ autograd Functions record their activations, or None
        self.registry = {}  # id(activation) -> (weak reference, version, recipe)

    def recipe_of(self, t: Tensor) -> Optional[Recipe]:
        """The recipe of `t` as a Function registered it (here, or in C++: then made a Recipe on first sight) and
        unchanged since; None for any other tensor."""
        entry = self.registry.get(id(t))
        if entry is not None:
            return entry[2] if entry[0]() is t and t._version == entry[1] else None
        if self.native is None or t is None or t.dim() != 4:
            return None
        found = self.native.lean_recipe(t)
        if found is None:
            return None
        *sources, relu = found
        # rebuilt by the C++ Functions' own pass, primitives::bn_act_forward, through pyfast._C's binding of it
        return self.add(t, bn_act(self.native, relu), sources)

    def add(self, activation: Tensor, compute: Callable[..., Tensor], sources) -> Recipe:
        """Registers `activation` == compute(*sources); a source that is itself a registered activation is
        referenced by its recipe, so the chain does not keep it."""
        resolved = []
        for source in sources:
            recipe = self.recipe_of(source)
            resolved.append(source if recipe is None else recipe)
        recipe = Recipe(compute, tuple(resolved), self.outer)
        key, registry = id(activation), self.registry
        # The entry lives as long as the activation: an activation nothing saves does not keep its sources.
        alive = weakref.ref(activation, lambda _: registry.pop(key, None))
        registry[key] = (alive, activation._version, recipe)
        return recipe

    def pack(self, t: Tensor):
        recipe = self.recipe_of(t)
        if recipe is not None:
            if self.outer is not None:
                recipe.pack_sources()
            return _SavedRecipe(recipe)
        if self.outer is not None:
            return self.outer[0](t)
        return _stored(t)

    def unpack(self, packed) -> Tensor:
        if type(packed) is _SavedRecipe:
            return packed.recipe.value()
        if self.outer is None:
            return _unstored(packed)
        return self.outer[1](packed)


def save_for_backward(ctx, *tensors: Optional[Tensor], activations: tuple) -> None:
    """ctx.save_for_backward(*tensors) for a fused op's Function. In a lean forward only the activations (the
    positions `activations`) pass autograd's saved-tensor hooks, which make recipes of them; the others (weights,
    per-channel maps) stay on ctx with their versions, checked at unpack as autograd checks them: a hook costs a
    Python round trip per tensor, and these are never rebuilt."""
    if _scope is None:
        ctx.save_for_backward(*tensors)
        return
    ctx.save_for_backward(*(tensors[i] for i in activations))
    ctx.lean_layout = activations
    ctx.lean_others = tuple(None if t is None or i in activations else _stored(t) for i, t in enumerate(tensors))


def saved_tensors(ctx) -> tuple:
    """What save_for_backward saved, in its order."""
    layout = getattr(ctx, "lean_layout", None)
    if layout is None:
        return ctx.saved_tensors
    tensors = [None if s is None else _unstored(s) for s in ctx.lean_others]
    for i, t in zip(layout, ctx.saved_tensors):
        tensors[i] = t
    return tuple(tensors)


def register(activation: Tensor, compute: Callable[..., Tensor], *sources: Optional[Tensor]) -> None:
    """Inside a scope: `activation` == compute(*sources) bit for bit, now and in the backward (the Python
    Functions; the C++ ones record in csrc/autograd/lean.h)."""
    if _scope is not None:
        _scope.add(activation, compute, sources)


def scope():
    """Lean training for the forward run inside `with scope():`: fused ops register their outputs, and whatever
    autograd saves passes through the hooks above. A no-op (a nullcontext, which torch.compile traces) where lean
    is off, outside autograd (no_grad, inference_mode), under torch.compile, and inside an open scope (nested
    models share the outer one)."""
    if torch.compiler.is_compiling() or not _enabled or _scope is not None or not torch.is_grad_enabled():
        return contextlib.nullcontext()
    return _Open()


class _Open:
    """An open scope: the registry and the hooks, for one forward."""

    def __enter__(self) -> None:
        global _scope
        native = _extension.extension if _extension.available() else None
        self.scope = _Scope(torch._C._autograd._top_saved_tensors_default_hooks(False), native)
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.scope.pack, self.scope.unpack)
        self.hooks.__enter__()
        if native is not None:
            native.lean_recording(True)
        _scope = self.scope

    def __exit__(self, *exc) -> None:
        global _scope
        _scope = None
        if self.scope.native is not None:
            self.scope.native.lean_recording(False)
        self.hooks.__exit__(*exc)


def max_pool2d(x: Tensor, kernel_size, stride, padding, dilation, ceil_mode: bool) -> Tensor:
    """F.max_pool2d(x, ...) that keeps only x for its backward (eager keeps x and the indices, which are int64):
    inside a scope x is usually the stem's registered activation, so the pool keeps nothing, and its output is
    registered in turn (a stage's first input is rebuilt through it). The backward finds the indices again with
    one pooling pass: the maximum of the same values is the same element."""
    params = tuple(_pair(v) for v in (kernel_size, stride or kernel_size, padding, dilation)) + (ceil_mode,)
    if not (torch.is_grad_enabled() and x.requires_grad):
        return torch.max_pool2d(x, *params)
    out = _MaxPool2d.apply(x, params)
    register(out, _pool(params), x)
    return out


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _pool(params: tuple) -> Callable[[Tensor], Tensor]:
    return lambda x: torch.max_pool2d(x, *params)


class _MaxPool2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, params):
        ctx.save_for_backward(x)
        ctx.params = params
        return torch.max_pool2d(x, *params)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        indices = torch.ops.aten.max_pool2d_with_indices(x, *ctx.params)[1]
        return torch.ops.aten.max_pool2d_with_indices_backward(grad_out, x, *ctx.params, indices), None
