"""`pyfast.fuse` inside an nn.Sequential that is not traced: runs of Conv2d/BatchNorm2d/ReLU children
planned into fused steps (`plan_sequential`) and run by `FusedSequential`, which stays an nn.Sequential."""
from typing import Optional, Tuple

from torch import nn

from . import functional
from ._report import Fusion, LeftAlone
from ._rules import is_bn, is_bn_act, is_conv, is_relu_module, module_problem


def _plain_bn(module) -> bool:
    return is_bn(module) and not is_bn_act(module)


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
        for kind, test in (("conv_bn_relu", (is_conv, _plain_bn, is_relu_module)),
                           ("bn_relu_conv", (_plain_bn, is_relu_module, is_conv)),
                           ("conv_bn", (is_conv, _plain_bn))):
            if len(window) < len(test) or not all(t(m) for t, m in zip(test, window)):
                continue
            reason = next((r for r in (module_problem(full[j], window[j]) for j in range(len(test))) if r), None)
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
