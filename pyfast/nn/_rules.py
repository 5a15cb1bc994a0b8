"""What `pyfast.fuse` accepts: the modules a fused call can stand in for, the spellings of ReLU and add it
recognizes, and the reason each module that looks like a candidate is refused."""
import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from . import functional
from ._sync import SyncBatchNorm2d

RELU_FUNCTIONS = {torch.relu: "torch.relu", torch.relu_: "torch.relu_", F.relu: "F.relu", F.relu_: "F.relu_"}
RELU_METHODS = ("relu", "relu_")
ADD_FUNCTIONS = {operator.add: "+", operator.iadd: "+=", torch.add: "torch.add"}
INPLACE_ADDS = (operator.iadd, "add_")
INPLACE_OPERATORS = (operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
                     operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
                     operator.imatmul, operator.setitem)
BN_FORWARDS = (nn.BatchNorm2d.forward, nn.SyncBatchNorm.forward, SyncBatchNorm2d.forward)


def _hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _lazy(module: nn.Module) -> bool:
    return isinstance(module, LazyModuleMixin) and module.has_uninitialized_params()


def is_conv(module) -> bool:
    return isinstance(module, nn.Conv2d)


def is_bn(module) -> bool:
    return isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm))


def is_relu_module(module) -> bool:
    return type(module) is nn.ReLU


def is_bn_act(module) -> bool:
    """timm's BatchNormAct2d (and look-alikes): a BatchNorm2d whose forward is batch_norm -> self.drop ->
    self.act. fuse traces it as one module (its forward reads self.training) and reads it as a BN
    followed by its activation."""
    return (isinstance(module, nn.BatchNorm2d) and type(module).__name__ == "BatchNormAct2d"
            and isinstance(getattr(module, "drop", None), nn.Module)
            and isinstance(getattr(module, "act", None), nn.Module))


def bn_act_relu(module) -> bool:
    """Whether a BN-act module applies a ReLU (else nothing: its act is an nn.Identity)."""
    return is_bn_act(module) and is_relu_module(module.act)


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
    if is_bn_act(bn):
        if type(bn.drop) is not nn.Identity:
            return f"{name} is a {type(bn).__name__} with a {type(bn.drop).__name__} after its BN"
        if not isinstance(bn.act, (nn.ReLU, nn.Identity)):
            return (f"{name} is a {type(bn).__name__} whose activation is {type(bn.act).__name__}: the fused "
                    "kernels apply ReLU only")
    elif type(bn).forward not in BN_FORWARDS:
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


def module_problem(name: str, module: nn.Module) -> Optional[str]:
    if is_conv(module):
        return conv_problem(name, module)
    if is_bn(module):
        return bn_problem(name, module)
    return relu_problem(name, module)
