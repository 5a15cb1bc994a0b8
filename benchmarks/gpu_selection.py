"""A pytest plugin for the GPU script's test call (`pytest -p pyfast.benchmarks.gpu_selection -m gpu tests`):
the GPU correctness grids trimmed to one shape per kernel path and dtype, so that the call's Triton
compiles (one each, with PYFAST_TRITON_AUTOTUNE=0) fit its minutes.

A grid is a test function with more than GRID_MIN parametrizations. Its tests that differ only in their
shape parameter (SHAPE_PARAMS) form a group -- same backend, dtype, layout, training mode, ... -- and one
test of each group runs. The groups take the shapes in turn (the k-th group of a function its
(k mod n)-th shape), so every shape of the grid still runs somewhere. Smaller parametrizations (the
real-size kernel tests, where the shape is the kernel path) run whole.
"""
from collections import defaultdict

import pytest

SHAPE_PARAMS = ("case_name", "shape")
GRID_MIN = 24


def _function(item) -> str:
    return f"{item.path}::{item.originalname}"


def _group_key(item) -> tuple:
    params = getattr(item, "callspec", None)
    params = params.params if params else {}
    return tuple(sorted((k, repr(v)) for k, v in params.items() if k not in SHAPE_PARAMS))


def representatives(items) -> list:
    """The items kept, in their collection order."""
    by_function = defaultdict(list)
    for item in items:
        by_function[_function(item)].append(item)
    kept = set()
    for members in by_function.values():
        if len(members) <= GRID_MIN:
            kept.update(map(id, members))
            continue
        groups = defaultdict(list)
        for item in members:
            groups[_group_key(item)].append(item)
        for k, group in enumerate(groups.values()):
            kept.add(id(group[k % len(group)]))
    return [item for item in items if id(item) in kept]


@pytest.hookimpl(trylast=True)  # after `-m gpu` has deselected the CPU tests
def pytest_collection_modifyitems(config, items):
    keep = representatives(items)
    if len(keep) < len(items):
        kept = set(map(id, keep))
        config.hook.pytest_deselected(items=[item for item in items if id(item) not in kept])
        items[:] = keep


def pytest_report_header(config):
    return "pyfast GPU selection: one shape per kernel path and dtype in each test grid"
