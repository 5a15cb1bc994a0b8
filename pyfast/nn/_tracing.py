"""How `pyfast.fuse` traces a module into an fx graph that is valid in every mode.

- pyfast's own modules, torch.nn's and BN-act modules (timm's BatchNormAct2d) are leaves.
- A submodule whose forward fails to trace, has forward hooks (a traced graph would skip them), or calls
  torch.utils.checkpoint (a traced graph would inline the region and drop the recomputation) becomes a
  leaf called as it is: "opaque", with the reason. The module a checkpoint call runs is recorded as
  `checkpointed`: fuse leaves it unfused, since a fused op's recomputation may end before its BN update
  (the checkpoint stops recomputing once it has the saved tensors), changing the statistics' counts.
- The module is traced in training and in eval mode. A submodule whose own part of the graph differs
  between the two (it reads `self.training`: dropout with `training=self.training`, auxiliary heads) is
  made opaque too, and the trace is repeated until both graphs agree; when the module's own code differs,
  it does not trace at all. A graph fixed to one mode is never returned.
"""
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch.utils.checkpoint
from torch import fx, nn

from .. import ops
from . import functional
from ._rules import is_bn_act
from ._sequential import FusedSequential
from .bn_add_relu import AddReLU, BNAddReLU, LazyBNAddReLU
from .bn_relu_conv import BNReLUConv2d
from .conv_bn_relu import ConvBNReLU2d

PYFAST_LEAVES = (ConvBNReLU2d, BNReLUConv2d, BNAddReLU, LazyBNAddReLU, AddReLU, FusedSequential)
FUSED_FUNCTIONS = (functional.conv_bn_relu, functional.bn_add_relu, functional.bn_relu_conv, functional.add_relu,
                   functional.bn_relu, ops.conv_bn_relu, ops.bn_add_relu, ops.bn_relu_conv, ops.add_relu)
MODE_DEPENDENT = "its forward depends on self.training (a traced graph would be fixed to one mode)"
CHECKPOINTS = "calls {} (a traced graph would drop the recomputation)"
CHECKPOINTED = ("runs inside {}: left unfused, so that its recomputation and BN statistics updates stay "
                "as in eager")


def checkpoint_functions() -> tuple:
    """The activation-checkpointing entry points fuse recognizes: torch's, and timm's when it is loaded."""
    found = [torch.utils.checkpoint.checkpoint, torch.utils.checkpoint.checkpoint_sequential]
    timm_helpers = sys.modules.get("timm.models._manipulate")
    found += [getattr(timm_helpers, name) for name in ("checkpoint_seq", "checkpoint") if hasattr(timm_helpers, name)]
    return tuple(dict.fromkeys(found))


def is_leaf(module: nn.Module) -> bool:
    """Whether fuse calls `module` as it is, never tracing into it: pyfast's modules, BN-act modules and
    fx's default leaves (torch.nn's own modules other than the containers)."""
    return isinstance(module, PYFAST_LEAVES) or is_bn_act(module) or fx.Tracer().is_leaf_module(module, "")


class _Checkpointed(Exception):
    pass


class ModuleTracer(fx.Tracer):
    """fx's tracer with pyfast's leaves and the opaque fallback (see the module docstring). `forced`:
    qualified names made opaque up front, with their reasons."""

    def __init__(self, forced: Optional[Dict[str, str]] = None):
        self.checkpoints = checkpoint_functions()
        super().__init__(autowrap_functions=FUSED_FUNCTIONS + self.checkpoints)
        self.forced = dict(forced or {})
        self.opaque: Dict[str, str] = {}
        self.checkpointed: Dict[str, str] = {}

    def _make_opaque(self, qualname: str, why: str) -> None:
        self.opaque.setdefault(qualname, why)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.forced:
            self._make_opaque(qualname, self.forced[qualname])
            return True
        if qualname in self.opaque or isinstance(m, PYFAST_LEAVES) or is_bn_act(m):
            return True
        leaf = super().is_leaf_module(m, qualname)
        if not leaf and (m._forward_hooks or m._forward_pre_hooks):
            self._make_opaque(qualname, "has forward hooks, which a traced graph would skip")
            return True
        return leaf

    def create_proxy(self, kind, target, args, kwargs, *rest, **more):
        if kind == "call_function" and target in self.checkpoints:
            name = f"{target.__module__}.{target.__name__}"
            regions = args[0] if args and isinstance(args[0], (list, tuple)) else args[:1]
            for region in regions:  # the modules (or methods of them) the checkpoint runs
                region = getattr(region, "__self__", region)
                if isinstance(region, nn.Module):
                    self.checkpointed[self.path_of_module(region)] = CHECKPOINTED.format(name)
            raise _Checkpointed(CHECKPOINTS.format(name))
        return super().create_proxy(kind, target, args, kwargs, *rest, **more)

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
            self._make_opaque(qualname, why(error))
            return super().call_module(m, forward, args, kwargs)


def why(error: Exception) -> str:
    if isinstance(error, _Checkpointed):
        return str(error)
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


@dataclass
class Traced:
    """A module's mode-independent graph (None when it has none, and `reason` says why), the
    submodules it calls as opaque leaves and those that run inside an activation checkpoint, by
    qualified name, with the reason."""

    graph: Optional[fx.Graph]
    opaque: Dict[str, str] = field(default_factory=dict)
    reason: str = ""
    checkpointed: Dict[str, str] = field(default_factory=dict)


def trace(module: nn.Module) -> Traced:
    modes = {m: m.training for m in module.modules()}
    forced: Dict[str, str] = {}
    try:
        while True:
            graphs, tracers = {}, {}
            for training in (True, False):
                module.train(training)
                tracers[training] = ModuleTracer(forced)
                try:
                    graphs[training] = tracers[training].trace(module)
                except Exception as error:  # the module's own forward does not trace
                    return Traced(None, reason=why(error), checkpointed=tracers[training].checkpointed)
            checkpointed = {**tracers[True].checkpointed, **tracers[False].checkpointed}
            differing = _differing_modules(graphs[True], graphs[False])
            if not differing:
                return Traced(graphs[True], {**tracers[True].opaque, **tracers[False].opaque}, "", checkpointed)
            if "" in differing:
                return Traced(None, reason=MODE_DEPENDENT, checkpointed=checkpointed)
            forced.update({name: MODE_DEPENDENT for name in differing})
    finally:
        for m, training in modes.items():
            m.training = training


def _differing_modules(a: fx.Graph, b: fx.Graph) -> List[str]:
    """The modules whose own nodes differ between two traces of one model ("" for the root's own code)."""
    ours, theirs = _nodes_by_module(a), _nodes_by_module(b)
    return sorted(name for name in set(ours) | set(theirs) if ours.get(name) != theirs.get(name))


def _nodes_by_module(graph: fx.Graph) -> Dict[str, list]:
    """Each node's signature (op, target, arguments with nodes as '%'), listed under the module whose
    code made it: the innermost module being traced (for a leaf's call_module node, its caller)."""
    found = defaultdict(list)
    for node in graph.nodes:
        stack = [qualname for qualname, _ in (node.meta.get("nn_module_stack") or {}).values()]
        if node.op == "call_module" and stack:
            stack = stack[:-1]
        args = fx.map_arg((node.args, node.kwargs), lambda _: "%")
        found[stack[-1] if stack else ""].append((node.op, str(node.target), repr(args)))
    return dict(found)
