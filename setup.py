"""Build pyfast and its extension pyfast._C.

The extension degrades: CUDA + C++ kernels when PyTorch has CUDA and nvcc is found, C++ kernels
otherwise, and none at all with PYFAST_NO_EXTENSION=1 (every op then runs on the reference backend).
Build with `pip install --no-build-isolation .` so the extension compiles against the installed torch.
"""
import glob
import os

from setuptools import find_packages, setup


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _vector_flags(torch):
    """AVX2 code for at::vec::Vectorized when this machine's PyTorch runs AVX2 or AVX-512 kernels.

    The binary then needs an AVX2 CPU; build with ATEN_CPU_CAPABILITY=default for a portable one.
    """
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"]
    return []


def _extensions():
    if _flag("PYFAST_NO_EXTENSION"):
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3", "-fopenmp"] + _vector_flags(torch)
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and not _flag("PYFAST_NO_CUDA")
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
        ext = CUDAExtension(
            "pyfast._C",
            sources,
            define_macros=[("PYFAST_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("pyfast._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="pyfast",
    version="0.1.0",
    description="Fused GPU kernels for the convolution blocks of ResNet/ResNeXt/RegNet networks",
    python_requires=">=3.10",
    packages=find_packages(include=["pyfast", "pyfast.*"]) + ["pyfast.kernels", "pyfast.benchmarks"],
    package_dir={"pyfast.kernels": "kernels", "pyfast.benchmarks": "benchmarks"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.5", "numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        "bench": ["matplotlib", "tqdm", "pytest-benchmark"],
        "test": ["pytest", "pytest-benchmark", "pytest-timeout"],
    },
    entry_points={"console_scripts": ["pyfast=pyfast.__main__:main"]},
)
