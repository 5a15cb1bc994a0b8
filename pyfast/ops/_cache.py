"""Values derived from parameters and buffers, computed once and reused until one of them changes.

Inference folds each BN into its convolution (or into a per-channel scale/shift); the inputs of that fold
change only when someone writes to them (an optimizer step, `load_state_dict`, a training-mode call that
updates running statistics). Every in-place write bumps a tensor's version counter, and rebinding a
parameter gives a new tensor, so (identity, version) of each input is an exact key: a stale entry can never
be returned. Entries live as long as the tensor that owns them (a weak reference), so a deleted model
leaves nothing behind.

Derived tensors are cached only for calls that record no autograd graph: a cached result carries no history
back to its inputs. A value that depends on the inputs' metadata alone (a training call's checked arguments,
`pyfast.ops._common.memoized_call`) is stamped by storage and shape instead of version. Writes through
`tensor.data` bypass the version counter (PyTorch gives `.data` a counter of its own): after such a write call
`pyfast.ops.clear_cache()`, or make the write the ordinary way (`with torch.no_grad(): param.copy_(...)`),
which every PyTorch optimizer, initializer and `load_state_dict` does.
"""
import weakref
from typing import Callable, Dict, Optional, Sequence, Tuple

from torch import Tensor

_entries: Dict[Tuple[int, str], tuple] = {}  # (id(owner), slot) -> (stamp, extra, weak refs to the inputs, value)


def version_stamp(tensors: Sequence[Optional[Tensor]]) -> list:
    """Version counter and storage address of each input (`param.data = other` keeps the tensor and its
    counter but moves its storage): a value derived from the inputs' contents is valid while this is unchanged.
    A list built by one comprehension: this runs on every inference call."""
    return [None if t is None else (t._version, t.data_ptr()) for t in tensors]


def storage_stamp(tensors: Sequence[Optional[Tensor]]) -> list:
    """Storage address and shape of each input: what argument checks read (dtype and device change only with
    the storage) is unchanged while this is, whatever in-place writes change the values."""
    return [None if t is None else (t.data_ptr(), t.shape) for t in tensors]


def _same(refs: tuple, tensors: Sequence[Optional[Tensor]]) -> bool:
    """Identity, not id(): an id can be reused by a new tensor once the old one is freed (refs holds a
    weak reference per input, None for None)."""
    for ref, t in zip(refs, tensors):
        if t is None:
            if ref is not None:
                return False
        elif ref is None or ref() is not t:
            return False
    return len(refs) == len(tensors)


def cached(owner: Tensor, slot: str, inputs: Sequence[Optional[Tensor]], extra: tuple,
           compute: Callable[[], object], stamp_of: Callable[[Sequence[Optional[Tensor]]], list] = version_stamp):
    """compute()'s result for these inputs, reused while every input is the same tensor with the same
    `stamp_of` (by default: at the same version) and `extra` (settings such as eps, compared with ==) is
    unchanged. `owner` (one of the inputs) holds one entry per `slot` (what the value is: "fold", "affine",
    ...): it is dropped when the owner is freed. (A plain dict keyed by id: a WeakKeyDictionary would compare
    tensors with ==, which is elementwise.)"""
    stamp = stamp_of(inputs)
    key = (id(owner), slot)
    entry = _entries.get(key)
    if entry is not None and entry[0] == stamp and entry[1] == extra and _same(entry[2], inputs):
        return entry[3]
    value = compute()
    if entry is None:
        weakref.finalize(owner, _entries.pop, key, None)
    _entries[key] = (stamp, extra, tuple(None if t is None else weakref.ref(t) for t in inputs), value)
    return value


def clear() -> None:
    """Drops every entry (tests; a user never needs it)."""
    _entries.clear()
