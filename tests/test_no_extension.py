"""PYFAST_NO_EXTENSION=1: every op still runs, on the reference backend, and says so once."""
import os
import subprocess
import sys

SCRIPT = """
import warnings
import torch
import pyfast
from pyfast import ops

x = torch.randn(2, 4, 5, 5, requires_grad=True)
w = torch.randn(6, 4, 3, 3)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(2):
        y = ops.conv_bn_relu(x, w, None, None, None, torch.zeros(6), torch.ones(6), training=True, padding=1)
        z = ops.bn_add_relu(y, None, None, None, None, training=True, shortcut=y)
        out = ops.bn_relu_conv(z, None, None, None, None, training=True, weight=torch.randn(3, 6, 1, 1))
        ops.add_relu(out, out).sum().backward()
messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
assert len(messages) == 1 and "reference backend" in messages[0], messages
assert ops.select("add_relu", x).name == "reference"
assert x.grad is not None and torch.isfinite(x.grad).all()
print("ok")
"""


def test_ops_fall_back_to_reference_and_warn_once():
    env = dict(os.environ, PYFAST_NO_EXTENSION="1")
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
