"""The fx-graph rewrite of `pyfast.fuse`: each pattern becomes one call of pyfast.nn.functional over the
original modules, and each near miss is recorded with its reason.

Patterns, in priority order (a node belongs to one fusion at most):
    bn_add_relu   relu(bn(y) + shortcut) or relu(bn(y) + bn_s(s))   (residual branch end, downsample;
                                                                       conv_bn_add_relu with y = conv(x))
    bn_relu_conv  conv(relu(bn(x))) where x is not a conv's output    (a pre-activation unit, and the chain
                                                                       of units after it)
    conv_bn_relu  relu(bn(conv(x)))
    bn_relu_conv  conv(relu(bn(x)))                                    (the rest)
    conv_bn       bn(conv(x))                                          (branch end without add)
    add_relu      relu(a + b)
Then a max-pool of a fused conv_bn_relu's output (a stem) takes pyfast.nn.functional.max_pool2d (lean training).
A BN-act module (timm's BatchNormAct2d, see `_rules.is_bn_act`) counts as a BN followed by its ReLU, or as
a plain BN when its activation is an nn.Identity. Every intermediate value a fusion removes must have that
one user, since nothing else can read it later.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from torch import fx, nn

from . import functional
from ._report import Fusion, LeftAlone
from ._rules import (ADD_FUNCTIONS, INPLACE_ADDS, INPLACE_OPERATORS, RELU_FUNCTIONS, RELU_METHODS, bn_act_relu,
                     bn_problem, conv_problem, is_bn, is_bn_act, is_conv, relu_problem)


class GraphFuser:
    """Rewrites the patterns of one traced graph into calls of pyfast.nn.functional that take the original
    modules (get_attr nodes), so no module is added, removed or renamed."""

    def __init__(self, root: nn.Module, graph: fx.Graph, backend: Optional[str], prefix: str = ""):
        """`prefix`: root's qualified name in the model plus a dot, for the report."""
        self.root, self.graph, self.backend, self.prefix = root, graph, backend, prefix
        self.fusions: List[Tuple[int, Fusion]] = []  # (graph position, fusion)
        self.near: Dict[fx.Node, Tuple[LeftAlone, Tuple[fx.Node, ...]]] = {}
        self.gone = set()
        self.order = {node: i for i, node in enumerate(graph.nodes)}

    def run(self) -> Tuple[List[Fusion], List[LeftAlone]]:
        self._skip_identities()
        for rewrite in (self._bn_add_relu, self._preactivation, self._conv_bn_relu, self._bn_relu_conv, self._conv_bn,
                        self._add_relu):
            for node in list(self.graph.nodes):
                if node not in self.gone:
                    rewrite(node)
        self._lean_pools()
        left = [entry for entry, nodes in self.near.values() if any(n not in self.gone for n in nodes)]
        return [f for _, f in sorted(self.fusions, key=lambda item: item[0])], left

    def _skip_identities(self) -> None:
        """Calls of an nn.Identity (timm's drop_path / drop_block at rate 0) pass their input through:
        reading past them lets `bn -> Identity -> add` fuse. The modules stay in the hierarchy."""
        for node in list(self.graph.nodes):
            if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
                module = self.root.get_submodule(node.target)
                if type(module) is nn.Identity and not (module._forward_hooks or module._forward_pre_hooks):
                    node.replace_all_uses_with(node.args[0])
                    self.graph.erase_node(node)

    def _lean_pools(self) -> None:
        """A max-pool of a fused conv-BN-ReLU's output (a stem) becomes pyfast.nn.functional.max_pool2d over the
        same module: in lean training it keeps neither that output nor indices (pyfast.ops.lean). Not a fusion:
        the same passes run, so the report does not list it."""
        for node in list(self.graph.nodes):
            pool = self._module(node, lambda m: type(m) is nn.MaxPool2d and not m.return_indices
                                and not (m._forward_hooks or m._forward_pre_hooks))
            source = node.args[0] if pool is not None else None
            if not (isinstance(source, fx.Node) and source.op == "call_function"
                    and source.target is functional.conv_bn_relu):
                continue
            with self.graph.inserting_before(node):
                lean_pool = self.graph.call_function(functional.max_pool2d, (source, self.graph.get_attr(node.target)))
            node.replace_all_uses_with(lean_pool)
            self.graph.erase_node(node)

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
            return self.prefix + node.target
        if node.op == "call_method":
            return f".{node.target}()"
        return {**RELU_FUNCTIONS, **ADD_FUNCTIONS}.get(node.target, getattr(node.target, "__name__", str(node.target)))

    def _relus_after(self, bn_node, bn) -> Optional[List[fx.Node]]:
        """The ReLU that follows a BN node: [] when the module applies it itself (a BN-act), [relu] for the
        BN's one user when that is a ReLU, else None."""
        if is_bn_act(bn):
            return [] if bn_act_relu(bn) else None
        relu = next(iter(bn_node.users)) if len(bn_node.users) == 1 else None
        return [relu] if relu is not None and self._is_relu(relu) else None

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

    def _written_later(self, last, value) -> Optional[str]:
        """The fused bn_add_relu saves its identity shortcut for the backward (the ReLU mask is recomputed
        from y and the shortcut), where eager's add saves nothing: a later in-place write into the shortcut,
        legal in eager, would fail the fused backward. Refuse such a site."""
        node = last.next
        while node.op != "output":
            if self._writes_into(node) is value:
                return (f"{self._label(node)} writes into the shortcut {value.name} after the add: the fused op "
                        "keeps the shortcut for its backward, eager's add does not")
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
            bn = self._module(main, _bn_without_relu)
            if bn is None:
                continue
            reason = (bn_problem(self._label(main), bn) or self._also_used(main, add)
                      or relu_problem(self._label(relu), self._relu_module(relu)))
            if reason:
                reasons.append((main, reason))
                continue
            s_bn = self._module(other, _bn_without_relu)
            if s_bn is not None and (bn_problem(self._label(other), s_bn) or len(other.users) != 1):
                s_bn = None
            nodes = [main, *([other] if s_bn is not None else []), add, relu]
            shortcut = other.args[0] if s_bn is not None else other
            reason = self._moved_past_a_write(nodes, {main.args[0], shortcut}) or (
                self._written_later(relu, shortcut) if s_bn is None else None)
            if reason:
                reasons.append((main, reason))
                continue
            kwargs = {"shortcut_bn": _Attr(other.target) if s_bn is not None else None, "relu": True}
            conv_node = self._branch_conv(main)
            if conv_node is not None and not self._moved_past_a_write([conv_node, *nodes],
                                                                      {conv_node.args[0], shortcut}):
                self._replace("conv_bn_add_relu", [conv_node, *nodes], relu, functional.conv_bn_add_relu,
                              (conv_node.args[0], _Attr(conv_node.target), _Attr(main.target), shortcut), kwargs)
            else:
                self._replace("bn_add_relu", nodes, relu, functional.bn_add_relu,
                              (main.args[0], _Attr(main.target), shortcut), kwargs)
            return
        if reasons:
            main, reason = reasons[0]
            self._miss(main, "bn_add_relu", [main, add, relu], reason)

    def _branch_conv(self, bn_node) -> Optional[fx.Node]:
        """The convolution whose output only the BN of a branch end reads, when it fuses (conv_bn_add_relu: on
        Triton its epilogue takes the BN's batch statistics); else None and the branch end is bn_add_relu. A
        convolution of a pre-activation (a BN-ReLU that is not a conv_bn_relu's) is left to bn_relu_conv, which
        saves more: the BN-ReLU pass itself."""
        source = bn_node.args[0]
        if not self._sole_conv_output(source) or self._preactivates(source.args[0]):
            return None
        return None if conv_problem(self._label(source), self.root.get_submodule(source.target)) else source

    def _preactivates(self, node) -> bool:
        """Whether `node` is relu(bn(v)) (or a BN-act's) with v not a convolution's own output: what _preactivation
        makes a bn_relu_conv of."""
        if not isinstance(node, fx.Node):
            return False
        bn_node = node if self._module(node, bn_act_relu) is not None else None
        if bn_node is None and self._is_relu(node) and isinstance(node.args[0], fx.Node):
            bn_node = node.args[0] if self._module(node.args[0], is_bn) is not None else None
        return bn_node is not None and bool(bn_node.args) and not self._sole_conv_output(bn_node.args[0])

    def _conv_bn(self, bn_node, with_relu: bool = False) -> None:
        bn = self._module(bn_node, is_bn)
        if bn is None:
            return
        conv_node = bn_node.args[0]
        conv = self._module(conv_node, is_conv) if isinstance(conv_node, fx.Node) else None
        if conv is None:
            return
        relus = self._relus_after(bn_node, bn) if with_relu else []
        if relus is None or (not with_relu and bn_act_relu(bn)):
            return
        kind = "conv_bn_relu" if with_relu else "conv_bn"
        nodes = [conv_node, bn_node, *relus]
        reason = (conv_problem(self._label(conv_node), conv) or bn_problem(self._label(bn_node), bn)
                  or next((r for r in (relu_problem(self._label(n), self._relu_module(n)) for n in relus) if r), None)
                  or self._also_used(conv_node, bn_node) or self._moved_past_a_write(nodes, {conv_node.args[0]}))
        if reason:
            self._miss(bn_node, kind, nodes, reason)
            return
        self._replace(kind, nodes, nodes[-1], functional.conv_bn_relu,
                      (conv_node.args[0], _Attr(conv_node.target), _Attr(bn_node.target)), {"relu": with_relu})

    def _conv_bn_relu(self, bn_node) -> None:
        self._conv_bn(bn_node, with_relu=True)

    def _preactivation(self, bn_node) -> None:
        """bn_relu_conv first where the BN's input is not a conv's own output: a pre-activation unit, whose
        conv output then pre-activates the next unit (nodes are visited in order, so a chain of units
        fuses unit by unit). conv_bn_relu would fuse as many there, but leave the chain's first BN alone."""
        if bn_node.args and self._sole_conv_output(bn_node.args[0]):
            return
        self._bn_relu_conv(bn_node)

    def _sole_conv_output(self, node) -> bool:
        """Whether `node` is a convolution's output that one node reads."""
        return isinstance(node, fx.Node) and self._module(node, is_conv) is not None and len(node.users) == 1

    def _bn_relu_conv(self, bn_node) -> None:
        bn = self._module(bn_node, is_bn)
        if bn is None:
            return
        relus = self._relus_after(bn_node, bn)
        if relus is None or len(bn_node.users) != 1:
            return
        last = relus[-1] if relus else bn_node
        if len(last.users) != 1:
            return
        conv_node = next(iter(last.users))
        conv = self._module(conv_node, is_conv)
        if conv is None:
            return
        nodes = [bn_node, *relus, conv_node]
        reason = (bn_problem(self._label(bn_node), bn)
                  or next((r for r in (relu_problem(self._label(n), self._relu_module(n)) for n in relus) if r), None)
                  or conv_problem(self._label(conv_node), conv) or self._moved_past_a_write(nodes, {bn_node.args[0]}))
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


def _bn_without_relu(module) -> bool:
    """A BN whose output is the plain normalization (not a BN-act that applies a ReLU itself)."""
    return is_bn(module) and not bn_act_relu(module)
