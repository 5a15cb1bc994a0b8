"""`python -m pyfast info` in a fresh interpreter: the extension loads without torch imported first, and
every backend is listed with why it can or cannot run."""
import subprocess
import sys

import torch

from pyfast.ops import BACKENDS


def test_info_lists_every_backend():
    out = subprocess.run([sys.executable, "-m", "pyfast", "info"], capture_output=True, text=True, check=True).stdout
    for name in BACKENDS:
        assert f"  {name} " in out
    if BACKENDS["cpu"].unavailable() is None:
        assert "extension pyfast._C: loaded" in out
    if not torch.cuda.is_available():
        assert "cuda" in out and "unavailable:" in out  # the cuda backend says why it cannot run
