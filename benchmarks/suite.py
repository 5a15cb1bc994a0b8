"""The pytest-benchmark suites' sizes, by device.

On a GPU the judged configuration (batch 128, 224x224, bf16 and fp32, channels_last and NCHW, 1 and 3
input planes); on the CPU small ones (batch 2, 32x32, fp32, channels_last) so the whole run takes
minutes on 2 cores. torch.compile is a provider on the GPU; on the CPU, where inductor compiles C++
for minutes per graph, only with PYFAST_BENCH_COMPILE=1.
"""
import pytest
import torch

from pyfast import _flags

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GPU = DEVICE == "cuda"
COMPILE_ON_CPU = _flags.BENCH_COMPILE

SIZES = dict(batch=128, image=224, dtypes=["bf16", "fp32"], layouts=["channels_last", "nchw"], in_chans=[1, 3],
             rounds=20, warmup=5) if GPU else \
    dict(batch=2, image=32, dtypes=["fp32"], layouts=["channels_last"], in_chans=[1], rounds=5, warmup=1)


def skip_compile_on_cpu(provider: str) -> None:
    if provider == "compile" and not GPU and not COMPILE_ON_CPU:
        pytest.skip("torch.compile on the CPU takes minutes per graph here; set PYFAST_BENCH_COMPILE=1")
