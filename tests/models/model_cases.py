"""Small instances of every registered model, for the tests that run forwards and backwards.

Each registered name maps to (overrides, input shape): widths cut where the published model is big,
depths (the number of blocks per stage) always kept. Inputs are large enough that every training-mode
BatchNorm normalizes at least 8 values per channel (fewer make BN ill-conditioned: its output is
+-1 for two values, and rounding differences grow without bound through the net).
"""
import torch

from pyfast.models import REGNETX_CFGS, create, list_models

RESNET_SMALL = dict(widths=(8, 16, 32, 64), stem_width=8)
# keep cardinality 32 and the group width per stage (4 resp. 8 x 1, 2, 4, 8 at 1/16 of the planes)
RESNEXT_SMALL = {"resnext50_32x4d": dict(widths=(16, 32, 64, 128), stem_width=16),
                 "resnext101_32x8d": dict(widths=(8, 16, 32, 64), stem_width=8)}


def reduced_regnet(name: str) -> dict:
    """The preset with w0 -> 8 and wa, group width scaled alike: u_j / w0 (hence every block's step and
    the stage depths) is unchanged, the widths shrink to 8 * wm**step."""
    cfg = REGNETX_CFGS[name]
    scale = 8 / cfg.w0
    return dict(w0=8, wa=cfg.wa * scale, group_width=max(1, round(cfg.group_width * scale)))


def small_case(name: str):
    """(keyword arguments for `create`, input shape) of `name`'s small instance."""
    if name.startswith(("resnet", "preact_resnet")):
        return dict(RESNET_SMALL), (2, 3, 64, 64)
    if name.startswith("resnext"):
        return dict(RESNEXT_SMALL[name]), (2, 3, 64, 64)
    if name.startswith("regnetx_") and name in REGNETX_CFGS:
        return reduced_regnet(name), (2, 3, 64, 64)
    if name == "regnetx_32":
        return dict(in_chans=1), (2, 1, 64, 64)  # the exercises' FashionMNIST model, 4 stages: /32
    return dict(in_chans=1), (2, 1, 32, 32)  # the two-stage AnyNets: /8


def build(name: str, fused: bool, seed: int = 0, dtype=torch.float64, num_classes: int = 10):
    kwargs, shape = small_case(name)
    torch.manual_seed(seed)
    return create(name, num_classes=num_classes, fused=fused, **kwargs).to(dtype), shape


ALL_MODELS = list_models()
