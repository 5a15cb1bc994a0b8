"""pyfast.ops._cache: values derived from parameters and buffers, reused exactly while their inputs are the
same tensors at the same versions."""
import gc

import torch

from pyfast.ops import _cache, clear_cache


def _derived(a, b):
    return _cache.cached(a, "test", (a, b), (), lambda: (a * b,))


def test_reused_while_unchanged_and_recomputed_after_an_in_place_write():
    a, b = torch.randn(3), torch.randn(3)
    first = _derived(a, b)
    assert _derived(a, b) is first
    b.mul_(2)  # bumps b's version counter
    second = _derived(a, b)
    assert second is not first
    torch.testing.assert_close(second[0], a * b)


def test_new_storage_or_a_new_tensor_is_a_new_entry():
    a, b = torch.randn(3), torch.randn(3)
    first = _derived(a, b)
    a.data = torch.randn(3)  # same tensor and version counter, new storage
    assert _derived(a, b) is not first
    other = torch.randn(3)
    assert _derived(a, other) is not _derived(a, b)


def test_entry_is_dropped_with_its_owner():
    a, b = torch.randn(3), torch.randn(3)
    _derived(a, b)
    key = (id(a), "test")
    assert key in _cache._entries
    del a
    gc.collect()
    assert key not in _cache._entries


def test_writes_through_data_need_clear_cache():
    """`.data` has a version counter of its own (PyTorch's rule), so the cache cannot see such a write:
    documented, and clear_cache() is the way out."""
    a, b = torch.randn(3), torch.randn(3)
    first = _derived(a, b)
    b.data.mul_(2)
    assert _derived(a, b) is first  # stale, as documented
    clear_cache()
    torch.testing.assert_close(_derived(a, b)[0], a * b)
