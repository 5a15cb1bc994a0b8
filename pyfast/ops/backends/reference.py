"""The `reference` backend's entry in the registry. Its ops are the plain-PyTorch composites of
pyfast/ops/reference.py, autograd included, so it has no primitives of its own."""
from .base import FLOAT_DTYPES, Backend


class ReferenceBackend(Backend):
    name = "reference"
    device_types = ("cpu", "cuda", "mps", "xpu", "meta")
    dtypes = FLOAT_DTYPES
    description = "plain PyTorch composite: ground truth, fallback and eager baseline"

    def why_not(self, op, device, dtype):
        return None
