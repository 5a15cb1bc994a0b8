"""The numerical contract of docs/DESIGN.md as data, and the comparisons the tests make with it."""
import torch

# Relative (norm-wise) error allowed against the float64 reference.
RELATIVE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}
# Low precision: error vs float64 reference <= this factor x eager PyTorch's own error in that dtype.
EAGER_FACTOR = {"forward": 2.0, "backward": 3.0}


def relative_error(actual, expected):
    """||actual - expected|| / ||expected||, computed in float64; NaN in either fails loudly."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if torch.isnan(a).any() != torch.isnan(e).any():
        return float("inf")
    mask = ~torch.isnan(e)
    denom = e[mask].norm().item()
    return (a[mask] - e[mask]).norm().item() / max(denom, 1e-30)


def assert_close(actual, expected, dtype=None, eager=None, kind="forward", what="output"):
    """Check `actual` against the float64 `expected` under the contract for `dtype`.

    For bf16/fp16 pass `eager`, eager PyTorch's result in that dtype: the bound becomes
    max(EAGER_FACTOR x eager's error, a small floor) and never above RELATIVE[dtype].
    """
    dtype = dtype or actual.dtype
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = relative_error(actual, expected)
    bound = RELATIVE[dtype]
    if eager is not None and dtype in (torch.bfloat16, torch.float16):
        eager_err = relative_error(eager, expected)
        bound = min(bound, max(EAGER_FACTOR[kind] * eager_err, 4e-3))
    assert err <= bound, f"{what}: relative error {err:.3e} > {bound:.3e} ({dtype}, {kind})"


def assert_sum_backward_close(out, expected, leaves):
    """out ~ expected, then the gradients that out.sum() and expected.sum() give each (mine, theirs) pair of
    leaves."""
    assert_close(out, expected)
    out.sum().backward()
    expected.sum().backward()
    for mine, theirs in leaves:
        assert_close(mine.grad, theirs.grad)

