"""pyfast.fuse(model): rewrite a model's Conv2d/BatchNorm2d/ReLU/add patterns into fused calls, keeping
its state_dict (same keys, same tensors) and its module hierarchy.

How:
1. torch.fx traces the model (pyfast's own modules and torch.nn's are leaves). A submodule whose forward
   does not trace, or that has forward hooks (a traced graph would skip them), is kept as a leaf called
   as it is; inside it only runs of nn.Sequential children are fused (`FusedSequential`). A model whose
   own forward does not trace is handled that way as a whole.
2. `_patterns.GraphFuser` replaces each pattern by one call of `pyfast.nn.functional` taking the
   original modules as get_attr nodes (`conv_bn_relu(x, self.layer1[0].conv1, self.layer1[0].bn1)`), so
   every call reads the modules' current parameters, buffers and train/eval state.
3. The result is a `FusedGraphModule` whose children, parameters and buffers are the model's own, under
   the same names in the same order, including modules the graph no longer calls (the ReLUs) or never
   called: `state_dict()`, `load_state_dict()`, `named_modules()`, `.to()`, `.train()`/`.eval()`, deepcopy
   and pickling behave as on the original.
"""
import copy
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from torch import fx, nn
from torch.fx.graph_module import reduce_graph_module

from .. import ops
from . import functional
from ._common import check_backend
from ._patterns import KIND_ORDER, FusedSequential, Fusion, GraphFuser, LeftAlone, plan_sequential
from .bn_add_relu import AddReLU, BNAddReLU, LazyBNAddReLU
from .bn_relu_conv import BNReLUConv2d
from .conv_bn_relu import ConvBNReLU2d

__all__ = ["FuseReport", "FusedGraphModule", "FusedSequential", "Fusion", "LeftAlone", "fuse"]

_PYFAST_LEAVES = (ConvBNReLU2d, BNReLUConv2d, BNAddReLU, LazyBNAddReLU, AddReLU, FusedSequential)
_FUSED_FUNCTIONS = (functional.conv_bn_relu, functional.bn_add_relu, functional.bn_relu_conv, functional.add_relu,
                    ops.conv_bn_relu, ops.bn_add_relu, ops.bn_relu_conv, ops.add_relu)


@dataclass
class FuseReport:
    """What `fuse` did: each fusion (kind, module names), each candidate left alone and why, and the
    modules that did not trace (inside those only nn.Sequential children were fused). `print(report)`."""

    fusions: List[Fusion] = field(default_factory=list)
    left_alone: List[LeftAlone] = field(default_factory=list)
    not_traced: Dict[str, str] = field(default_factory=dict)

    def counts(self) -> Dict[str, int]:
        found = {kind: sum(f.kind == kind for f in self.fusions) for kind in KIND_ORDER}
        return {kind: n for kind, n in found.items() if n}

    def __str__(self) -> str:
        counts = ", ".join(f"{n} {kind}" for kind, n in self.counts().items())
        lines = [f"pyfast.fuse: {len(self.fusions)} fusions" + (f" ({counts})" if counts else "")
                 + f", {len(self.left_alone)} left alone"]
        lines += [f"  {f}" for f in self.fusions]
        if self.left_alone:
            lines.append("left alone:")
            lines += [f"  {entry}" for entry in self.left_alone]
        if self.not_traced:
            lines.append("not traced (only nn.Sequential children fused inside):")
            lines += [f"  {name or '<model>'}: {why}" for name, why in self.not_traced.items()]
        return "\n".join(lines)


def fuse(model: nn.Module, inplace: bool = False, *, backend: Optional[str] = None) -> Tuple[nn.Module, FuseReport]:
    """Rewrites Conv2d->BatchNorm2d->ReLU, relu(BatchNorm2d(y) + shortcut) (the shortcut as it is or
    through its own BatchNorm2d), BatchNorm2d->ReLU->Conv2d, Conv2d->BatchNorm2d and relu(a + b) into
    pyfast's fused calls (see `pyfast.nn._patterns` for the rules).

    Returns (fused model, report). The fused model is a FusedGraphModule (the model traced) or the model
    itself with FusedSequential children (the model does not trace); its state_dict is the model's,
    tensor for tensor. inplace=False works on a deep copy; inplace=True reuses the model's modules (use
    the returned model: the original's forward is unchanged). With nothing to fuse, the model itself is
    returned, untouched, with an empty report. `backend` is passed to every fused call.
    """
    check_backend(backend)
    work = model if inplace else copy.deepcopy(model)
    report = FuseReport()
    tracer = _Tracer()
    try:
        graph = tracer.trace(work)
    except Exception as error:  # the model's own forward does not trace
        graph = None
        report.not_traced[""] = _why(error)
    report.not_traced.update(tracer.opaque)
    if graph is not None:
        report.fusions, report.left_alone = GraphFuser(work, graph, backend).run()
    in_graph = len(report.fusions)
    for name in report.not_traced:
        _fuse_sequentials(work.get_submodule(name), name + "." if name else "", backend, report)
    if not report.fusions:
        return model, report
    if not in_graph:
        return work, report
    graph.lint()
    fused = FusedGraphModule(work, graph, type(work).__name__)
    _check_same_state(fused, work)
    return fused, report


class FusedGraphModule(fx.GraphModule):
    """The fx.GraphModule `pyfast.fuse` returns: its forward is the fused graph, its module hierarchy the
    original model's (see the module docstring). Deepcopy, copy and pickling keep that hierarchy."""

    def __init__(self, root: nn.Module, graph: fx.Graph, class_name: Optional[str] = None):
        class_name = class_name or root.__dict__.get("_class_name") or type(root).__name__
        super().__init__(root, graph, class_name)
        self._class_name = class_name
        _adopt(self, root)

    def _deepcopy_init(self):
        return FusedGraphModule.__init__  # torch's __deepcopy__ calls it on the copied __dict__

    def __copy__(self):
        copied = FusedGraphModule(self, self.graph)
        copied.meta = getattr(self, "meta", {})
        return copied

    def __reduce__(self):
        _, (body, import_block) = super().__reduce__()
        return _unpickle, (body, import_block)


def _unpickle(body: dict, import_block: str) -> FusedGraphModule:
    traced = reduce_graph_module(dict(body), import_block)
    return FusedGraphModule(_State(body), traced.graph, body.get("_class_name"))


class _State(nn.Module):
    """A module over a saved __dict__: the root FusedGraphModule re-adopts its hierarchy from."""

    def __init__(self, state: dict):
        super().__init__()
        self.__dict__.update(state)


def _adopt(gm: fx.GraphModule, root: nn.Module) -> None:
    """gm's own children, parameters and buffers become root's, by name and in root's order. fx's tensor
    constants (plain tensors the graph reads) stay as non-persistent buffers, out of the state_dict."""
    constants = {name: t for name, t in gm._buffers.items() if name not in root._buffers}
    gm._modules.clear()
    gm._modules.update(root._modules)
    gm._parameters.clear()
    gm._parameters.update(root._parameters)
    gm._buffers.clear()
    gm._buffers.update(root._buffers)
    gm._non_persistent_buffers_set = set(root._non_persistent_buffers_set)
    for name, tensor in constants.items():
        gm.register_buffer(name, tensor, persistent=False)
    for name, value in vars(root).items():  # plain attributes (torchvision's `inplanes`, ...)
        if not name.startswith("_") and name not in vars(gm) and not hasattr(type(gm), name):
            setattr(gm, name, value)


def _check_same_state(fused: nn.Module, original: nn.Module) -> None:
    before, after = original.state_dict(keep_vars=True), fused.state_dict(keep_vars=True)
    if list(before) != list(after) or any(before[k] is not after[k] for k in before):
        raise RuntimeError("pyfast.fuse changed the model's state_dict; please report this as a bug: keys only "
                           f"before {sorted(set(before) - set(after))}, only after {sorted(set(after) - set(before))}")


class _Tracer(fx.Tracer):
    """fx's tracer with pyfast's modules as leaves, and a fallback: a submodule whose forward fails to trace
    (or that has forward hooks) becomes a leaf called as it is, and is recorded in `opaque`."""

    def __init__(self):
        super().__init__(autowrap_functions=_FUSED_FUNCTIONS)
        self.opaque: Dict[str, str] = {}
        self._opaque_ids = set()

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if id(m) in self._opaque_ids or isinstance(m, _PYFAST_LEAVES):
            return True
        leaf = super().is_leaf_module(m, qualname)
        if not leaf and (m._forward_hooks or m._forward_pre_hooks):
            self.opaque[qualname] = "has forward hooks, which a traced graph would skip"
            self._opaque_ids.add(id(m))
            return True
        return leaf

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        if self.is_leaf_module(m, qualname):
            return super().call_module(m, forward, args, kwargs)
        n_nodes, n_stack = len(self.graph.nodes), len(self.module_stack)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as error:
            for node in reversed(list(self.graph.nodes)[n_nodes:]):  # drop what the failed attempt added
                self.graph.erase_node(node)
            while len(self.module_stack) > n_stack:
                self.module_stack.popitem()
            self.opaque[qualname] = _why(error)
            self._opaque_ids.add(id(m))
            return super().call_module(m, forward, args, kwargs)


def _why(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _fuse_sequentials(module: nn.Module, prefix: str, backend: Optional[str], report: FuseReport) -> None:
    """Inside a module that does not trace: every plain nn.Sequential (without hooks) with a pattern among
    its children becomes a FusedSequential over the same children."""
    for name, child in list(module.named_children()):
        if isinstance(child, _PYFAST_LEAVES):
            continue
        _fuse_sequentials(child, f"{prefix}{name}.", backend, report)
        if type(child) is not nn.Sequential or child._forward_hooks or child._forward_pre_hooks:
            continue
        steps, fusions, left = plan_sequential(child, f"{prefix}{name}.")
        report.left_alone += left
        if fusions:
            report.fusions += fusions
            setattr(module, name, FusedSequential(OrderedDict(child._modules), steps=steps, backend=backend))
