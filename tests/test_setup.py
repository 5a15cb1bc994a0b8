"""setup.py finds the real CUDA toolkit behind the `nvcc` on PATH (through symlinks and wrapper scripts),
so a CUDA build works on machines without a GPU whose /usr/local/bin/nvcc is a wrapper."""
import os
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETUP = runpy.run_path(str(ROOT / "setup.py"), run_name="pyfast_setup")  # defines, does not build
find_cuda_home = SETUP["find_cuda_home"]


def _toolkit(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (root / "bin" / "nvcc").chmod(0o755)
    (root / "include" / "cuda_runtime.h").write_text("")
    return root


def _on_path(monkeypatch, folder: Path):
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", str(folder))


@pytest.fixture
def bin_dir(tmp_path):
    folder = tmp_path / "usr-local-bin"
    folder.mkdir()
    return folder


def test_a_wrapper_script_is_followed(tmp_path, bin_dir, monkeypatch):
    home = _toolkit(tmp_path / "cuda-13.0")
    wrapper = bin_dir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {home}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    _on_path(monkeypatch, bin_dir)
    assert find_cuda_home() == str(home)


def test_a_symlink_is_followed(tmp_path, bin_dir, monkeypatch):
    home = _toolkit(tmp_path / "cuda-13.0")
    (bin_dir / "nvcc").symlink_to(home / "bin" / "nvcc")
    _on_path(monkeypatch, bin_dir)
    assert find_cuda_home() == str(home)


def test_a_wrapper_to_nothing_is_not_a_toolkit(bin_dir, monkeypatch):
    wrapper = bin_dir / "nvcc"
    wrapper.write_text('#!/bin/sh\necho "no compiler here"\n')
    wrapper.chmod(0o755)
    _on_path(monkeypatch, bin_dir)
    if os.path.isfile("/usr/local/cuda/include/cuda_runtime.h"):
        assert find_cuda_home() == "/usr/local/cuda"  # the last guess, as torch's own
    else:
        assert find_cuda_home() is None


def test_cuda_home_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert find_cuda_home() == str(tmp_path)


def test_cuda_kernels_build_without_fast_math(monkeypatch):
    """The CUDA extension's nvcc flags, as _extensions() passes them with CUDA kernels on: no --use_fast_math
    (it flushes denormals and approximates division and square roots, for no time in bandwidth-bound kernels)."""
    from torch.utils import cpp_extension

    built = {}
    setup_globals = SETUP["_extensions"].__globals__
    monkeypatch.setitem(setup_globals, "_configure_cuda", lambda torch: True)
    monkeypatch.setitem(setup_globals, "_write_build_info", lambda *args: None)  # leave this build's record alone
    monkeypatch.setattr(cpp_extension, "CUDAExtension", lambda name, sources, **kwargs: built.update(kwargs))
    monkeypatch.chdir(ROOT)
    SETUP["_extensions"]()
    nvcc = built["extra_compile_args"]["nvcc"]
    assert "-O3" in nvcc and not any("fast_math" in flag or "fast-math" in flag for flag in nvcc), nvcc
