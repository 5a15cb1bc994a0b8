"""csrc/cuda compiles on machines without a GPU: every .cu alone with nvcc, and the ATen glue's syntax with g++.

The .cu files are ATen-free by design (DESIGN.md), so nvcc needs nothing but the CUDA toolkit; they are built
with the half/bfloat16 macros PyTorch's extension builds add. The glue (batch_norm.cpp) needs PyTorch's c10/cuda
and ATen/cuda headers, which CPU wheels ship too, short of one generated header that is stubbed here.
"""
import inspect
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CUDA_SRC = ROOT / "csrc" / "cuda"
CU_FILES = sorted(CUDA_SRC.glob("*.cu"))
GLUE_FILES = sorted(CUDA_SRC.glob("*.cpp"))
TIMEOUT_S = 300  # a 2-core CI machine takes 20-40 s per file; this only stops a hung compiler

# What torch.utils.cpp_extension adds to nvcc for every extension: the .cu files must compile under them.
TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]


def _cuda_homes():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            yield Path(os.environ[var])
    yield Path("/usr/local/cuda")


def _find_nvcc():
    for home in _cuda_homes():
        if (home / "bin" / "nvcc").is_file():
            return str(home / "bin" / "nvcc")
    return shutil.which("nvcc")


def _find_cuda_include(nvcc):
    # nvcc may be a wrapper script elsewhere on PATH, so look beside the toolkits too.
    candidates = [home / "include" for home in _cuda_homes()]
    if nvcc:
        candidates.append(Path(nvcc).resolve().parents[1] / "include")
    return next((str(p) for p in candidates if (p / "cuda_runtime.h").is_file()), None)


NVCC = _find_nvcc()


def _run(cmd):
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, f"{' '.join(cmd)}\nexit {result.returncode}\n{result.stderr[-20000:]}"


def test_device_code_is_aten_free():
    for path in CU_FILES + sorted(CUDA_SRC.glob("*.cuh")):
        for line in path.read_text().splitlines():
            if line.lstrip().startswith("#include"):
                assert not any(h in line for h in ("ATen/", "torch/", "c10/")), f"{path.name}: {line.strip()}"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA_HOME, CUDA_PATH, /usr/local/cuda, PATH)")
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_cu_compiles_alone(source, tmp_path):
    _run([NVCC, "-c", "-std=c++17", "-O2", "-gencode=arch=compute_90,code=sm_90", "-I", str(CUDA_SRC),
          *TORCH_NVCC_FLAGS, "--use_fast_math", str(source), "-o", str(tmp_path / f"{source.stem}.o")])


def _glue_flags(tmp_path):
    """g++ flags for the ATen glue, or the reason it cannot be checked here."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return None, "torch is not installed"
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        return None, "no C++ compiler (g++/c++) on PATH"
    cuda_include = _find_cuda_include(NVCC)
    if cuda_include is None:
        return None, "CUDA headers (cuda_runtime.h) not found"
    includes = [Path(p) for p in cpp_extension.include_paths()]
    for header in ("c10/cuda/CUDAStream.h", "c10/cuda/CUDAGuard.h", "ATen/cuda/CUDAContext.h"):
        if not any((p / header).is_file() for p in includes):
            return None, f"this torch ships no {header}"
    stub = []
    if not any((p / "c10/cuda/impl/cuda_cmake_macros.h").is_file() for p in includes):
        # Generated at build time in CUDA builds of torch; CPU wheels lack it. Its one line:
        macros = tmp_path / "stub" / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
        macros.parent.mkdir(parents=True)
        macros.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        stub = ["-I", str(tmp_path / "stub")]
    # The standard torch's own extension builds use.
    std = "-std=c++20" if "c++20" in inspect.getsource(cpp_extension) else "-std=c++17"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = [cxx, "-fsyntax-only", std, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DPYFAST_WITH_CUDA",
             "-DTORCH_EXTENSION_NAME=_C", "-Wall", "-Wno-unused-function"]
    for p in includes:
        flags += ["-I", str(p)]
    return flags + stub + ["-I", cuda_include, "-I", str(CUDA_SRC)], None


@pytest.mark.parametrize("source", GLUE_FILES, ids=lambda p: p.name)
def test_glue_syntax(source, tmp_path):
    flags, why_not = _glue_flags(tmp_path)
    if flags is None:
        pytest.skip(f"cannot check {source.name}: {why_not}")
    _run(flags + [str(source)])
