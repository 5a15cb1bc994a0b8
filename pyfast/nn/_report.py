"""What `pyfast.fuse` reports: each fusion, each candidate left alone and why, and each module that was
not traced (and why)."""
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

KIND_ORDER = ("conv_bn_add_relu", "bn_add_relu", "conv_bn_relu", "bn_relu_conv", "conv_bn", "add_relu")


@dataclass(frozen=True)
class Fusion:
    """One rewrite: its kind and the participating modules (functions and operators by their spelling)."""

    kind: str
    modules: Tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.kind:<16} {' -> '.join(self.modules)}"


@dataclass(frozen=True)
class LeftAlone:
    """A candidate that was not fused, and why."""

    kind: str
    modules: Tuple[str, ...]
    reason: str

    def __str__(self) -> str:
        return f"{self.kind:<16} {' -> '.join(self.modules)}: {self.reason}"


def count_kinds(fusions: List[Fusion]) -> Dict[str, int]:
    found = {kind: sum(f.kind == kind for f in fusions) for kind in KIND_ORDER}
    return {kind: n for kind, n in found.items() if n}


def summary(fusions: List[Fusion]) -> str:
    """'3 fusions (2 conv_bn_relu, 1 bn_add_relu)'."""
    counts = ", ".join(f"{n} {kind}" for kind, n in count_kinds(fusions).items())
    return f"{len(fusions)} fusions" + (f" ({counts})" if counts else "")


@dataclass
class FuseReport:
    """What `fuse` did: each fusion (kind, module names), each candidate left alone and why, and the
    modules that were not traced as part of their parent's graph, with the reason (inside those, their
    children were fused on their own). `print(report)`."""

    fusions: List[Fusion] = field(default_factory=list)
    left_alone: List[LeftAlone] = field(default_factory=list)
    not_traced: Dict[str, str] = field(default_factory=dict)

    def counts(self) -> Dict[str, int]:
        return count_kinds(self.fusions)

    def __str__(self) -> str:
        lines = [f"pyfast.fuse: {summary(self.fusions)}, {len(self.left_alone)} left alone"]
        lines += [f"  {f}" for f in self.fusions]
        if self.left_alone:
            lines.append("left alone:")
            lines += [f"  {entry}" for entry in self.left_alone]
        if self.not_traced:
            lines.append("not traced (their children fused on their own):")
            lines += [f"  {name or '<model>'}: {why}" for name, why in self.not_traced.items()]
        return "\n".join(lines)
