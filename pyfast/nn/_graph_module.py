"""FusedGraphModule: the fx.GraphModule `pyfast.fuse` returns, with the original module's hierarchy.

fx.GraphModule copies only the submodules and tensors its graph reads, under intermediate modules of its
own; `_adopt` gives it the original's children, parameters, buffers and plain attributes instead, through
nn.Module's public registration API. Copying and pickling rebuild that hierarchy; pickling goes through
fx.GraphModule's own `__reduce__` (whose rebuild function is fx's), so pyfast names no fx internals.
"""
import copy
from typing import Optional, Sequence

from torch import fx, nn

from ..ops import lean
from ._report import Fusion, summary


class FusedGraphModule(fx.GraphModule):
    """The fx.GraphModule `pyfast.fuse` returns: its forward is the fused graph, its module hierarchy the
    original model's (see `pyfast.nn.fuse`). Deepcopy, copy and pickling keep that hierarchy; `print()`
    shows the hierarchy and the fusions (the generated code is in `.code`)."""

    def __init__(self, root: nn.Module, graph: fx.Graph, class_name: Optional[str] = None,
                 fusions: Sequence[Fusion] = ()):
        class_name = class_name or getattr(root, "pyfast_class_name", None) or type(root).__name__
        fusions = tuple(fusions or getattr(root, "pyfast_fusions", ()))
        super().__init__(root, graph, class_name)
        _adopt(self, root)
        self.pyfast_class_name = class_name
        self.pyfast_fusions = fusions

    def __call__(self, *args, **kwargs):
        # A whole model's forward: lean training (pyfast.ops.lean) keeps one tensor per convolution. (fx gives each
        # instance a class whose __call__ calls this one.)
        with lean.scope():
            return super().__call__(*args, **kwargs)

    def __deepcopy__(self, memo):
        copied = FusedGraphModule.__new__(FusedGraphModule)
        memo[id(self)] = copied
        state = copy.deepcopy(self.__dict__, memo)
        FusedGraphModule.__init__(copied, _State(state), copy.deepcopy(self.graph, memo))
        copied.meta = state.get("meta", {})
        return copied

    def __copy__(self):
        copied = FusedGraphModule(self, self.graph)
        copied.meta = getattr(self, "meta", {})
        return copied

    def __reduce__(self):
        rebuild, args = super().__reduce__()
        return _unpickle, (rebuild, args)

    def __prepare_scriptable__(self):
        raise RuntimeError("torch.jit.script cannot compile a pyfast-fused model: its fused calls are Python "
                           "custom ops. Use torch.compile or torch.export, or script the model before fuse")

    def extra_repr(self) -> str:
        return "\n".join([f"pyfast.fuse: {summary(self.pyfast_fusions)}", *map(str, self.pyfast_fusions)])

    def __str__(self) -> str:
        return nn.Module.__repr__(self)


def _unpickle(rebuild, args) -> FusedGraphModule:
    """fx's own rebuild gives the graph; the pickled state gives the hierarchy."""
    body, *rest = args
    traced = rebuild(dict(body), *rest)
    return FusedGraphModule(_State(body), traced.graph)


class _State(nn.Module):
    """A module over a saved __dict__: the root a FusedGraphModule adopts its hierarchy from."""

    def __init__(self, state: dict):
        super().__init__()
        self.__dict__.update(state)


def _adopt(gm: fx.GraphModule, root: nn.Module) -> None:
    """gm's own children, parameters and buffers become root's, by name and in root's order. fx's tensor
    constants (plain tensors the graph reads, which fx registered as buffers) stay as non-persistent
    buffers, out of the state_dict."""
    root_buffers = dict(root.named_buffers(recurse=False))
    constants = {name: t for name, t in gm.named_buffers(recurse=False) if name not in root_buffers}
    persistent = set(root.state_dict(keep_vars=True))
    for name in [*dict(gm.named_children()), *dict(gm.named_parameters(recurse=False)),
                 *dict(gm.named_buffers(recurse=False))]:
        delattr(gm, name)
    # nn.Module's registries, read to keep the entries that are None (an absent downsample, bias=None)
    for name, child in vars(root)["_modules"].items():
        gm.register_module(name, child)
    for name, param in vars(root)["_parameters"].items():
        gm.register_parameter(name, param)
    for name, buffer in vars(root)["_buffers"].items():
        gm.register_buffer(name, buffer, persistent=buffer is None or name in persistent)
    for name, tensor in constants.items():
        gm.register_buffer(name, tensor, persistent=False)
    for name, value in vars(root).items():  # plain attributes (torchvision's `inplanes`, ...)
        if not name.startswith("_") and name not in vars(gm) and not hasattr(type(gm), name):
            setattr(gm, name, value)
