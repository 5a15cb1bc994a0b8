"""The model families, each built with `fused=False` (plain PyTorch modules: the baseline) or
`fused=True` (the same modules run through `pyfast.nn.functional`'s fused ops, on the op backend
`backend=`, by default the one pyfast's dispatcher picks).

    model = pyfast.models.create("regnetx_32", num_classes=10, in_chans=1, fused=True)
    model = pyfast.models.create("resnet50", fused=True, backend="triton")
    pyfast.models.list_models("resnet*")
    model.complexity((1, 224, 224)).flops      # multiply-adds, without running

Fused and unfused models have the same module tree and parameter names, so one seed gives the same
weights and a state_dict moves between them (and from torchvision's ResNet/ResNeXt/RegNetX).
"""
# Importing each family's module registers its models.
from .anynet import ANYNET_CFGS, AnyNet, AnyNetCfg, VioNet
from .base import ImageClassifier
from .complexity import Complexity, Cost, UnitCost, complexity
from .layers import ConvNormAct, EagerKit, FastKit, get_kit, set_fused, switch_backend
from .preact_resnet import PreActResNet
from .regnet import REGNETX_CFGS, RegNet, RegNetCfg
from .registry import create, list_models, model_entrypoint, register_model
from .resnet import RESNET_CFGS, ResNet, ResNetCfg

__all__ = ["ANYNET_CFGS", "AnyNet", "AnyNetCfg", "Complexity", "ConvNormAct", "Cost", "EagerKit", "FastKit",
           "ImageClassifier", "PreActResNet", "REGNETX_CFGS", "RESNET_CFGS", "RegNet", "RegNetCfg", "ResNet",
           "ResNetCfg", "UnitCost", "VioNet", "complexity", "create", "get_kit", "list_models", "model_entrypoint",
           "register_model", "set_fused", "switch_backend"]
