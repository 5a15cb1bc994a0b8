"""The patterns `pyfast.fuse` rewrites, on an fx graph and on an nn.Sequential's children, and the reason
each near miss is left alone.

Patterns, in priority order (a node belongs to one fusion at most):
    bn_add_relu   relu(bn(y) + shortcut) or relu(bn(y) + bn_s(s))   (residual branch end, downsample)
    conv_bn_relu  relu(bn(conv(x)))
    bn_relu_conv  conv(relu(bn(x)))                                    (pre-activation)
    conv_bn       bn(conv(x))                                          (branch end without add)
    add_relu      relu(a + b)
Every intermediate value a fusion removes must have that one user, since nothing else can read it later.
"""
import operator
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.lazy import LazyModuleMixin

from . import functional

RELU_FUNCTIONS = {torch.relu: "torch.relu", torch.relu_: "torch.relu_", F.relu: "F.relu", F.relu_: "F.relu_"}
RELU_METHODS = ("relu", "relu_")
ADD_FUNCTIONS = {operator.add: "+", operator.iadd: "+=", torch.add: "torch.add"}
INPLACE_ADDS = (operator.iadd, "add_")
INPLACE_OPERATORS = (operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
                     operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
                     operator.imatmul, operator.setitem)
KIND_ORDER = ("bn_add_relu", "conv_bn_relu", "bn_relu_conv", "conv_bn", "add_relu")


@dataclass(frozen=True)
class Fusion:
    """One rewrite: its kind and the participating modules (functions and operators by their spelling)."""

    kind: str
    modules: Tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.kind:<13} {' -> '.join(self.modules)}"


@dataclass(frozen=True)
class LeftAlone:
    """A candidate that was not fused, and why."""

    kind: str
    modules: Tuple[str, ...]
    reason: str

    def __str__(self) -> str:
        return f"{self.kind:<13} {' -> '.join(self.modules)}: {self.reason}"


# -- what each module must satisfy --------------------------------------------------------------------

def _hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _lazy(module: nn.Module) -> bool:
    return isinstance(module, LazyModuleMixin) and module.has_uninitialized_params()


def conv_problem(name: str, conv: nn.Module) -> Optional[str]:
    if type(conv).forward is not nn.Conv2d.forward:
        return f"{name} is a {type(conv).__name__}, whose forward is not nn.Conv2d's"
    if _lazy(conv):
        return f"{name} is an uninitialized lazy module (run one forward before fusing)"
    if _hooks(conv):
        return f"{name} has forward hooks, which a fused call would skip"
    if conv.padding_mode != "zeros":
        return f"{name} has padding_mode={conv.padding_mode!r}; the fused kernels pad with zeros"
    try:
        functional.resolve_padding(conv.padding, conv.kernel_size, conv.dilation, name=f"{name}.padding")
    except ValueError as error:
        return str(error)
    return None


def bn_problem(name: str, bn: nn.Module) -> Optional[str]:
    if type(bn).forward not in (nn.BatchNorm2d.forward, nn.SyncBatchNorm.forward):
        return f"{name} is a {type(bn).__name__}, whose forward is not nn.BatchNorm2d's"
    if _lazy(bn):
        return f"{name} is an uninitialized lazy module (run one forward before fusing)"
    if _hooks(bn):
        return f"{name} has forward hooks, which a fused call would skip"
    return None


def relu_problem(name: str, relu: Optional[nn.Module]) -> Optional[str]:
    if relu is not None and _hooks(relu):
        return f"{name} has forward hooks, which a fused call would skip"
    return None


def is_conv(module) -> bool:
    return isinstance(module, nn.Conv2d)


def is_bn(module) -> bool:
    return isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm))


# -- the fx graph -------------------------------------------------------------------------------------

class GraphFuser:
    """Rewrites the patterns of one traced graph into calls of pyfast.nn.functional that take the original
    modules (get_attr nodes), so no module is added, removed or renamed."""

    def __init__(self, root: nn.Module, graph: fx.Graph, backend: Optional[str]):
        self.root, self.graph, self.backend = root, graph, backend
        self.fusions: List[Tuple[int, Fusion]] = []  # (graph position, fusion)
        self.near: Dict[fx.Node, Tuple[LeftAlone, Tuple[fx.Node, ...]]] = {}
        self.gone = set()
        self.order = {node: i for i, node in enumerate(graph.nodes)}

    def run(self) -> Tuple[List[Fusion], List[LeftAlone]]:
        for rewrite in (self._bn_add_relu, self._conv_bn_relu, self._bn_relu_conv, self._conv_bn, self._add_relu):
            for node in list(self.graph.nodes):
                if node not in self.gone:
                    rewrite(node)
        left = [entry for entry, nodes in self.near.values() if any(n not in self.gone for n in nodes)]
        return [f for _, f in sorted(self.fusions, key=lambda item: item[0])], left

    # -- node helpers --
    def _module(self, node, accept) -> Optional[nn.Module]:
        """The module a call_module node calls on one positional argument, when `accept` takes it."""
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs or node in self.gone:
            return None
        module = self.root.get_submodule(node.target)
        return module if accept(module) else None

    def _is_relu(self, node) -> bool:
        if node in self.gone or not node.args:
            return False
        if node.op == "call_module":
            return len(node.args) == 1 and not node.kwargs and type(self.root.get_submodule(node.target)) is nn.ReLU
        if node.op == "call_function" and node.target in RELU_FUNCTIONS:
            return set(node.kwargs) <= {"inplace"} and all(isinstance(a, bool) for a in node.args[1:])
        return node.op == "call_method" and node.target in RELU_METHODS and len(node.args) == 1 and not node.kwargs

    def _add(self, node) -> Optional[Tuple[fx.Node, fx.Node, bool]]:
        """(a, b, in place into a) for a tensor-tensor add without alpha."""
        if node in self.gone or len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
            return None
        if set(node.kwargs) - {"alpha"} or node.kwargs.get("alpha", 1) != 1:
            return None
        if (node.op == "call_function" and node.target in ADD_FUNCTIONS) or (
                node.op == "call_method" and node.target in ("add", "add_")):
            return node.args[0], node.args[1], node.target in INPLACE_ADDS
        return None

    def _relu_of_add(self, relu) -> Optional[Tuple[fx.Node, fx.Node, fx.Node, bool]]:
        """(add, a, b, in place into a) when `relu` is a ReLU of a tensor-tensor add that has no other user."""
        if not self._is_relu(relu):
            return None
        add = relu.args[0]
        operands = self._add(add)
        if operands is None or len(add.users) != 1:
            return None
        return (add, *operands)

    def _label(self, node) -> str:
        if node.op == "call_module":
            return node.target
        if node.op == "call_method":
            return f".{node.target}()"
        return {**RELU_FUNCTIONS, **ADD_FUNCTIONS}.get(node.target, getattr(node.target, "__name__", str(node.target)))

    def _relu_module(self, node) -> Optional[nn.Module]:
        return self.root.get_submodule(node.target) if node.op == "call_module" else None

    def _also_used(self, node, user) -> Optional[str]:
        others = [self._label(u) if u.op != "output" else "the output" for u in node.users if u is not user]
        return f"the output of {self._label(node)} is also used by {', '.join(others)}" if others else None

    def _writes_into(self, node) -> Optional[fx.Node]:
        """The value `node` may modify in place (its first argument), or None."""
        if not node.args or not isinstance(node.args[0], fx.Node):
            return None
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        if node.op == "call_module":
            inplace = getattr(self.root.get_submodule(node.target), "inplace", False) is True
        else:
            inplace = (node.target in INPLACE_OPERATORS or node.kwargs.get("inplace") is True
                       or (node.target in RELU_FUNCTIONS and node.args[1:2] == (True,))
                       or (isinstance(name, str) and name.endswith("_") and not name.endswith("__")))
        return node.args[0] if inplace else None

    def _moved_past_a_write(self, nodes, inputs) -> Optional[str]:
        """The fused call runs where the pattern's last node ran, so it reads its inputs later than the
        pattern's first node did: refuse when something in between writes into one of them."""
        first, last = min(nodes, key=self.order.get), max(nodes, key=self.order.get)
        node = first.next
        while node is not last:
            target = self._writes_into(node) if node not in nodes else None
            if target is not None and target in inputs:
                return (f"{self._label(node)} writes into {target.name} between {self._label(first)} and "
                        f"{self._label(last)}")
            node = node.next
        return None

    def _miss(self, anchor, kind, nodes, reason) -> None:
        if anchor not in self.near:
            self.near[anchor] = (LeftAlone(kind, tuple(self._label(n) for n in nodes), reason), tuple(nodes))

    def _replace(self, kind, nodes: Sequence[fx.Node], last: fx.Node, fn, args, kwargs) -> None:
        """Calls fn(*args, **kwargs) in place of `last`; `nodes` (the pattern, in data-flow order) go away.
        Module arguments become get_attr nodes of their own names."""
        with self.graph.inserting_before(last):
            args = tuple(self.graph.get_attr(a.target) if isinstance(a, _Attr) else a for a in args)
            kwargs = {k: self.graph.get_attr(v.target) if isinstance(v, _Attr) else v for k, v in kwargs.items()}
            fused = self.graph.call_function(fn, args, {**kwargs, "backend": self.backend})
        last.replace_all_uses_with(fused)
        self.fusions.append((self.order[nodes[0]], Fusion(kind, tuple(self._label(n) for n in nodes))))
        for node in reversed(nodes):
            self.graph.erase_node(node)
            self.gone.add(node)

    # -- the patterns: each looks at one node and fuses or records why not --
    def _bn_add_relu(self, relu) -> None:
        matched = self._relu_of_add(relu)
        if matched is None:
            return
        add, a, b, inplace = matched
        candidates = [(a, b)] if inplace else [(a, b), (b, a)]  # an in-place add must write into bn(y)
        reasons = []
        for main, other in candidates:
            bn = self._module(main, is_bn)
            if bn is None:
                continue
            reason = (bn_problem(main.target, bn) or self._also_used(main, add)
                      or relu_problem(self._label(relu), self._relu_module(relu)))
            if reason:
                reasons.append((main, reason))
                continue
            s_bn = self._module(other, is_bn)
            if s_bn is not None and (bn_problem(other.target, s_bn) or len(other.users) != 1):
                s_bn = None
            nodes = [main, *([other] if s_bn is not None else []), add, relu]
            shortcut = other.args[0] if s_bn is not None else other
            reason = self._moved_past_a_write(nodes, {main.args[0], shortcut})
            if reason:
                reasons.append((main, reason))
                continue
            self._replace("bn_add_relu", nodes, relu, functional.bn_add_relu,
                          (main.args[0], _Attr(main.target), shortcut),
                          {"shortcut_bn": _Attr(other.target) if s_bn is not None else None, "relu": True})
            return
        if reasons:
            main, reason = reasons[0]
            self._miss(main, "bn_add_relu", [main, add, relu], reason)

    def _conv_bn(self, bn_node, with_relu: bool = False) -> None:
        bn = self._module(bn_node, is_bn)
        if bn is None:
            return
        conv_node = bn_node.args[0]
        conv = self._module(conv_node, is_conv) if isinstance(conv_node, fx.Node) else None
        if conv is None:
            return
        relu = None
        if with_relu:
            relu = next(iter(bn_node.users)) if len(bn_node.users) == 1 else None
            if relu is None or not self._is_relu(relu):
                return
        kind = "conv_bn_relu" if with_relu else "conv_bn"
        nodes = [conv_node, bn_node, *([relu] if relu is not None else [])]
        reason = (conv_problem(conv_node.target, conv) or bn_problem(bn_node.target, bn)
                  or (relu is not None and relu_problem(self._label(relu), self._relu_module(relu)))
                  or self._also_used(conv_node, bn_node) or self._moved_past_a_write(nodes, {conv_node.args[0]}))
        if reason:
            self._miss(bn_node, kind, nodes, reason)
            return
        self._replace(kind, nodes, nodes[-1], functional.conv_bn_relu,
                      (conv_node.args[0], _Attr(conv_node.target), _Attr(bn_node.target)), {"relu": with_relu})

    def _conv_bn_relu(self, bn_node) -> None:
        self._conv_bn(bn_node, with_relu=True)

    def _bn_relu_conv(self, bn_node) -> None:
        bn = self._module(bn_node, is_bn)
        if bn is None or len(bn_node.users) != 1:
            return
        relu = next(iter(bn_node.users))
        if not self._is_relu(relu) or len(relu.users) != 1:
            return
        conv_node = next(iter(relu.users))
        conv = self._module(conv_node, is_conv)
        if conv is None:
            return
        nodes = [bn_node, relu, conv_node]
        reason = (bn_problem(bn_node.target, bn) or relu_problem(self._label(relu), self._relu_module(relu))
                  or conv_problem(conv_node.target, conv) or self._moved_past_a_write(nodes, {bn_node.args[0]}))
        if reason:
            self._miss(bn_node, "bn_relu_conv", nodes, reason)
            return
        self._replace("bn_relu_conv", nodes, conv_node, functional.bn_relu_conv,
                      (bn_node.args[0], _Attr(bn_node.target), _Attr(conv_node.target)), {"relu": True})

    def _add_relu(self, relu) -> None:
        matched = self._relu_of_add(relu)
        if matched is None:
            return
        add, a, b, inplace = matched
        nodes = [add, relu]
        reason = relu_problem(self._label(relu), self._relu_module(relu))
        if inplace:
            reason = f"{self._label(add)} writes into {a.name}, which other code may read: unfused it stays exact"
        reason = reason or self._moved_past_a_write(nodes, {a, b})
        if reason:
            self._miss(add, "add_relu", nodes, reason)
            return
        self._replace("add_relu", nodes, relu, functional.add_relu, (a, b), {})


@dataclass(frozen=True)
class _Attr:
    """A module argument of a fused call, by its qualified name."""

    target: str


# -- nn.Sequential children (inside modules that do not trace) ----------------------------------------

def plan_sequential(seq: nn.Sequential, prefix: str):
    """(steps, fusions, left alone) for one plain nn.Sequential: each step is (kind, child names), kind
    "module" for a child that runs as it is."""
    names = list(seq._modules)
    mods = [seq._modules[n] for n in names]
    steps, fusions, left = [], [], []
    i = 0
    while i < len(names):
        window = mods[i:i + 3]
        full = [prefix + n for n in names[i:i + 3]]
        matched = None
        for kind, test in (("conv_bn_relu", (is_conv, is_bn, _is_relu_module)),
                           ("bn_relu_conv", (is_bn, _is_relu_module, is_conv)),
                           ("conv_bn", (is_conv, is_bn))):
            if len(window) < len(test) or not all(t(m) for t, m in zip(test, window)):
                continue
            reason = next((r for r in (_problem(full[j], window[j]) for j in range(len(test))) if r), None)
            if reason:
                left.append(LeftAlone(kind, tuple(full[:len(test)]), reason))
                continue
            matched = (kind, len(test))
            break
        if matched is None:
            steps.append(("module", (names[i],)))
            i += 1
            continue
        kind, width = matched
        steps.append((kind, tuple(names[i:i + width])))
        fusions.append(Fusion(kind, tuple(full[:width])))
        i += width
    covered = {m for f in fusions for m in f.modules}
    left = [entry for entry in left if not set(entry.modules) <= covered]
    return tuple(steps), fusions, left


def _is_relu_module(module) -> bool:
    return type(module) is nn.ReLU


def _problem(name: str, module: nn.Module) -> Optional[str]:
    if is_conv(module):
        return conv_problem(name, module)
    if is_bn(module):
        return bn_problem(name, module)
    return relu_problem(name, module)


class FusedSequential(nn.Sequential):
    """An nn.Sequential whose runs of Conv2d/BatchNorm2d/ReLU children run as pyfast fused calls (made by
    `pyfast.fuse` inside modules that do not trace). The children are the same, under the same names, so
    the state_dict is unchanged. If children are added or removed later, it runs as a plain Sequential."""

    def __init__(self, *args, steps: Tuple = (), backend: Optional[str] = None):
        super().__init__(*args)
        self.steps = tuple(steps)
        self.backend = backend
        self._planned_names = tuple(self._modules)

    def forward(self, input):
        if not self.steps or tuple(self._modules) != self._planned_names:
            return super().forward(input)
        for kind, names in self.steps:
            mods = [self._modules[n] for n in names]
            if kind == "module":
                input = mods[0](input)
            elif kind == "bn_relu_conv":
                input = functional.bn_relu_conv(input, mods[0], mods[2], relu=True, backend=self.backend)
            else:
                input = functional.conv_bn_relu(input, mods[0], mods[1], relu=kind == "conv_bn_relu",
                                                backend=self.backend)
        return input

    def extra_repr(self) -> str:
        fused = [f"{kind}({', '.join(names)})" for kind, names in self.steps if kind != "module"]
        return f"fused: {'; '.join(fused)}" if fused else ""
