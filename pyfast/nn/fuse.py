"""pyfast.fuse(model): rewrite a model's Conv2d/BatchNorm2d/ReLU/add patterns into fused calls, keeping
its state_dict (same keys, same tensors) and its module hierarchy.

How:
1. `_tracing.trace` traces the model into an fx graph valid in training and in eval mode (pyfast's own
   modules, torch.nn's and BN-act modules are leaves). A submodule that does not trace, has forward hooks,
   reads `self.training` or calls torch.utils.checkpoint is kept as a leaf called as it is ("not traced"
   in the report); inside it, each child is fused on its own, in place, the same way. A model that does
   not trace as a whole is handled that way too. A module run inside an activation checkpoint is left
   unfused (and reported).
2. `_graph_fuser.GraphFuser` replaces each pattern by one call of `pyfast.nn.functional` taking the
   original modules as get_attr nodes (`conv_bn_relu(x, self.layer1[0].conv1, self.layer1[0].bn1)`), so
   every call reads the modules' current parameters, buffers and train/eval state.
3. A traced module becomes a `FusedGraphModule` whose children, parameters and buffers are the module's
   own, under the same names in the same order, including modules the graph no longer calls (the ReLUs)
   or never called: `state_dict()`, `load_state_dict()`, `named_modules()`, `.to()`, `.train()`/`.eval()`,
   deepcopy and pickling behave as on the original. A plain nn.Sequential inside a module that is not
   traced stays an nn.Sequential (`FusedSequential`).
"""
import copy
from collections import OrderedDict
from typing import Optional, Tuple

from torch import nn

from ._common import check_backend
from ._graph_fuser import GraphFuser
from ._graph_module import FusedGraphModule
from ._report import FuseReport, Fusion, LeftAlone
from ._sequential import FusedSequential, plan_sequential
from ._tracing import is_leaf, trace

__all__ = ["FuseReport", "FusedGraphModule", "FusedSequential", "Fusion", "LeftAlone", "fuse"]


def fuse(model: nn.Module, inplace: bool = False, *, backend: Optional[str] = None) -> Tuple[nn.Module, FuseReport]:
    """Rewrites Conv2d->BatchNorm2d->ReLU, relu(BatchNorm2d(y) + shortcut) (the shortcut as it is or
    through its own BatchNorm2d), BatchNorm2d->ReLU->Conv2d, Conv2d->BatchNorm2d and relu(a + b) into
    pyfast's fused calls (see `pyfast.nn._graph_fuser` for the rules).

    Returns (fused model, report). The fused model is a FusedGraphModule (the model traced) or the model
    itself with fused children (the model does not trace as a whole); its state_dict is the model's,
    tensor for tensor, and it follows `.train()`/`.eval()` as the model does. inplace=False works on a
    deep copy; inplace=True reuses the model's modules (use the returned model). With nothing to fuse,
    the model itself is returned, untouched, with the report of what was left alone and why. `backend`
    is passed to every fused call. `print(fused_model)` shows what was fused.
    """
    check_backend(backend)
    work = model if inplace else copy.deepcopy(model)
    before = work.state_dict(keep_vars=True)
    report = FuseReport()
    fused = _fuse_module(work, "", backend, report)
    if not report.fusions:
        return model, report
    _check_same_state(before, fused.state_dict(keep_vars=True))
    return fused, report


def _fuse_module(module: nn.Module, prefix: str, backend: Optional[str], report: FuseReport) -> nn.Module:
    """`module` fused: a FusedGraphModule over it when it traces and has something to fuse, else the
    module itself with its children fused in place."""
    name = prefix[:-1]
    if is_leaf(module):
        return module
    if module._forward_hooks or module._forward_pre_hooks:
        if prefix:  # a hooked model root is traced as usual: fx calls the root's forward, not its hooks
            report.not_traced[name] = "has forward hooks, which a traced graph would skip"
            _fuse_children(module, prefix, backend, report)
            return module
    if prefix and type(module) is nn.Sequential:  # inside a module that does not trace
        _fuse_children(module, prefix, backend, report)
        return _fuse_sequential(module, prefix, backend, report)
    traced = trace(module)
    for region, why in traced.checkpointed.items():
        report.not_traced[prefix + region] = why
    skip = set(traced.checkpointed)
    if traced.graph is None:
        report.not_traced[name] = traced.reason
        _fuse_children(module, prefix, backend, report, skip)
        return module
    fusions, left = GraphFuser(module, traced.graph, backend, prefix).run()
    report.fusions += fusions
    report.left_alone += left
    for opaque, why in traced.opaque.items():
        report.not_traced[prefix + opaque] = why
        inner = {region[len(opaque) + 1:] for region in skip if region.startswith(opaque + ".")}
        _fuse_children(module.get_submodule(opaque), f"{prefix}{opaque}.", backend, report, inner)
    if not fusions:
        return module
    traced.graph.lint()
    return FusedGraphModule(module, traced.graph, type(module).__name__, fusions)


def _fuse_children(module: nn.Module, prefix: str, backend: Optional[str], report: FuseReport,
                   skip=frozenset()) -> None:
    """Each child of `module` fused on its own, in place, except those named in `skip` (run inside an
    activation checkpoint)."""
    for name, child in list(module.named_children()):
        if name in skip:
            continue
        fused = _fuse_module(child, f"{prefix}{name}.", backend, report)
        if fused is not child:
            setattr(module, name, fused)


def _fuse_sequential(seq: nn.Sequential, prefix: str, backend: Optional[str], report: FuseReport) -> nn.Module:
    """A plain nn.Sequential (its children already fused) with a pattern among its children becomes a
    FusedSequential over the same children: it stays indexable as a Sequential."""
    steps, fusions, left = plan_sequential(seq, prefix)
    report.left_alone += left
    if not fusions:
        return seq
    report.fusions += fusions
    return FusedSequential(OrderedDict(seq.named_children()), steps=steps, backend=backend)


def _check_same_state(before: dict, after: dict) -> None:
    if list(before) != list(after) or any(before[k] is not after[k] for k in before):
        raise RuntimeError("pyfast.fuse changed the model's state_dict; please report this as a bug: keys only "
                           f"before {sorted(set(before) - set(after))}, only after {sorted(set(after) - set(before))}")
