"""`python -m pyfast info` in a fresh interpreter: the extension loads without torch imported first, and
every backend is listed with why it can or cannot run here."""
import os
import subprocess
import sys

import torch

from pyfast.ops import BACKENDS


def test_info_lists_every_backend():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs it
    out = subprocess.run([sys.executable, "-m", "pyfast", "info"], capture_output=True, text=True, check=True,
                         env=env).stdout
    for name in BACKENDS:
        assert f"  {name} " in out
    if BACKENDS["cpu"].unavailable() is None:
        assert "extension pyfast._C: loaded" in out
    if not torch.cuda.is_available():  # the GPU backends say why they cannot run here, even when built
        status = {line.split()[0]: line.split(" -- ", 1)[1] for line in out.splitlines() if " -- " in line}
        for name in ("cuda", "triton"):
            assert status[name].startswith(("cannot run here: ", "unavailable: ")), status[name]
        assert "no CUDA device is visible" in out
