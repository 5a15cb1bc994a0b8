"""benchmarks/triton_cache.py: a Triton cache packed on one machine is found by Triton after unpacking on another,
at the same absolute path, with only what a launch needs (metadata, binary, launcher modules)."""
import json

from triton.runtime.cache import FileCacheManager

from pyfast.benchmarks import triton_cache

KERNEL_FILES = ("_conv_kernel.json", "_conv_kernel.cubin", "_conv_kernel.ttir", "_conv_kernel.ttgir",
                "_conv_kernel.llir", "_conv_kernel.ptx", "_conv_kernel.source")


def _fake_cache(root):
    """A cache as Triton writes one: a kernel's files and its group file naming them by absolute path, and a
    compiled launcher module."""
    kernel = root / "KERNELHASH"
    kernel.mkdir(parents=True)
    for name in KERNEL_FILES:
        (kernel / name).write_bytes(b"\x00\x01 " + name.encode())
    children = {name: str(kernel / name) for name in KERNEL_FILES}
    (kernel / "__grp___conv_kernel.json").write_text(json.dumps({"child_paths": children}))
    (root / "LAUNCHERHASH").mkdir()
    (root / "LAUNCHERHASH" / "__triton_launcher.so").write_bytes(b"\x7fELF")


def test_a_packed_cache_is_found_where_it_was_written(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    _fake_cache(cache)
    archive = tmp_path / "cache.tar.gz"
    assert triton_cache.pack(str(cache), str(archive)) == 1
    for path in sorted(cache.rglob("*"), reverse=True):  # the next machine starts without it
        path.rmdir() if path.is_dir() else path.unlink()
    assert triton_cache.unpack(str(archive), str(cache)) == 1
    assert sorted(p.name for p in (cache / "KERNELHASH").iterdir()) == [
        "__grp___conv_kernel.json", "_conv_kernel.cubin", "_conv_kernel.json"]
    assert (cache / "LAUNCHERHASH" / "__triton_launcher.so").read_bytes() == b"\x7fELF"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    group = FileCacheManager("KERNELHASH").get_group("_conv_kernel.json")  # how Triton looks a kernel up
    assert group is not None and set(group) == {"_conv_kernel.json", "_conv_kernel.cubin"}
