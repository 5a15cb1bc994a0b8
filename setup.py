"""Build pyfast's extension pyfast._C (the metadata is in pyproject.toml).

The extension degrades: CUDA + C++ kernels when PyTorch has CUDA and a CUDA toolkit is found, C++ kernels
otherwise, and none at all with PYFAST_NO_EXTENSION=1 (every op then runs on the reference backend);
PYFAST_NO_CUDA=1 leaves the CUDA kernels out. Build with `pip install --no-build-isolation .` so the
extension compiles against the installed torch.

No GPU is needed to build the CUDA kernels: without one visible, they are built for TORCH_CUDA_ARCH_LIST
(default DEFAULT_CUDA_ARCHS). The toolkit is CUDA_HOME or CUDA_PATH when set, else the one that the `nvcc`
on PATH belongs to, seen through symlinks and wrapper scripts (an `exec /path/to/nvcc "$@"` script in
/usr/local/bin would otherwise make torch guess CUDA_HOME=/usr/local), else /usr/local/cuda.
"""
import glob
import os
import re
import shutil
import warnings

from setuptools import find_packages, setup

# Hopper (the H100/H200 this project is measured on) as machine code, plus its PTX so that newer GPUs
# can JIT-compile it; other GPUs: set TORCH_CUDA_ARCH_LIST, e.g. "8.0;9.0+PTX".
DEFAULT_CUDA_ARCHS = "9.0+PTX"


def _flag(name):
    """pyfast._flags.flag's rule (this file runs before pyfast can be imported): 1/true/yes/on is on,
    0/false/no/off or unset is off, anything else stops the build naming the variable."""
    word = os.environ.get(name, "").strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("", "0", "false", "no", "off"):
        return False
    raise SystemExit(f"setup.py: environment variable {name}={os.environ[name]!r}: 1/true/yes/on switches it on, "
                     "0/false/no/off off")


def _import_torch():
    try:
        with warnings.catch_warnings():  # torch's notice when numpy is absent: pyfast does not use numpy
            warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
            import torch
    except ImportError:
        raise SystemExit(
            "error: pyfast builds its extension against an installed torch: install torch first, then "
            "`pip install --no-build-isolation .` (an isolated build cannot see it; PYFAST_NO_EXTENSION=1 "
            "builds without the extension)"
        ) from None
    return torch


def _is_toolkit(home):
    return (os.path.isfile(os.path.join(home, "bin", "nvcc"))
            and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")))


def _wrapped_nvcc(path):
    """The nvcc that a small wrapper script `exec`s, or None (a binary, or no such line)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    match = re.search(rb"exec\s+[\"']?(/[^\s\"']*/nvcc)\b", head)
    return os.fsdecode(match.group(1)) if match else None


def find_cuda_home():
    """The CUDA toolkit's root (holding bin/nvcc and include/cuda_runtime.h), or None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    seen = set()
    while nvcc and nvcc not in seen:  # follow symlinks and wrapper scripts to the real compiler
        seen.add(nvcc)
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if _is_toolkit(home):
            return home
        nvcc = _wrapped_nvcc(nvcc)
    return "/usr/local/cuda" if _is_toolkit("/usr/local/cuda") else None


def _configure_cuda(torch):
    """Sets CUDA_HOME and TORCH_CUDA_ARCH_LIST for torch.utils.cpp_extension (which reads them when
    imported); returns whether the CUDA kernels are built."""
    if torch.version.cuda is None or _flag("PYFAST_NO_CUDA"):
        return False
    home = find_cuda_home()
    if home is None:
        print("pyfast: no CUDA toolkit found (set CUDA_HOME): building the C++ kernels only")
        return False
    os.environ["CUDA_HOME"] = home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    print(f"pyfast: CUDA kernels with the toolkit in {home}, "
          f"archs {os.environ.get('TORCH_CUDA_ARCH_LIST') or 'of the visible GPUs'}")
    return True


def _cpu_vectors(torch):
    """The vector ISA of the C++ kernels' at::vec::Vectorized code: AVX2 where this machine's PyTorch runs AVX2 or
    AVX-512 kernels, else None (portable code).

    AVX-512 was measured and not taken: it made the BN passes over small planes 10-45% faster and those over
    large ones, which dominate a model step, 4-7% slower, a wash per RegNetX-32 training step. The binary needs an
    AVX2 CPU; build with ATEN_CPU_CAPABILITY=default for a portable one.
    """
    return "AVX2" if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else None


_AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"]
# No --use_fast_math: the CUDA BN kernels are bandwidth-bound, so approximate division and square roots buy no
# time, while flushing denormals to zero and ~2 ulp rsqrt would part them from PyTorch's BN for nothing.
NVCC_FLAGS = ["-O3", "-lineinfo"]


def _write_build_info(cuda, cpu_vectors):
    """pyfast/_build_info.py, generated (as torchvision writes its version.py): what this build holds,
    for `python -m pyfast info` and the tests that check the CUDA kernels are registered."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") if cuda else None
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "pyfast", "_build_info.py"), "w") as f:
        f.write(f'"""Written by setup.py: what this build of pyfast._C holds."""\n'
                f"extension = {not _flag('PYFAST_NO_EXTENSION')!r}\ncuda = {cuda!r}\ncuda_archs = {archs!r}\n"
                f"cpu_vectors = {cpu_vectors!r}\n")


def _extensions():
    if _flag("PYFAST_NO_EXTENSION"):
        _write_build_info(None, None)
        return [], {}
    torch = _import_torch()
    with_cuda = _configure_cuda(torch)
    cpu_vectors = _cpu_vectors(torch)
    _write_build_info(torch.version.cuda if with_cuda else None, cpu_vectors)
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/autograd/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3", "-fopenmp"] + (_AVX2_FLAGS if cpu_vectors == "AVX2" else [])
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
        ext = CUDAExtension(
            "pyfast._C",
            sources,
            define_macros=[("PYFAST_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": NVCC_FLAGS},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("pyfast._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


# pip's setuptools backend runs this file as __main__; tests import it for find_cuda_home().
if __name__ == "__main__":
    ext_modules, cmdclass = _extensions()
    setup(
        packages=find_packages(include=["pyfast", "pyfast.*"]) + ["pyfast.kernels", "pyfast.benchmarks"],
        package_dir={"pyfast.kernels": "kernels", "pyfast.benchmarks": "benchmarks"},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
