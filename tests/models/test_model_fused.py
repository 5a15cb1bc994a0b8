"""fused=False and fused=True are one model: same module tree and weights, same outputs,
gradients, running statistics and optimizer steps, in train and eval, NCHW and channels_last.

Everything runs in float64 on small instances (model_cases.py), so the comparison measures the fused
ops' arithmetic and not float32 rounding compounded through dozens of training-mode BatchNorms."""
import copy
import pickle

import pytest
import torch

from model_cases import ALL_MODELS, build, small_case
from pyfast import ops
from pyfast.models import create, get_kit, set_fused, switch_backend
from tolerances import relative_error

# Whole models, float64: the ops' contract is 1e-10 per call; through 30-50 blocks (and the input
# gradient's cancellations) rounding compounds to ~1e-10 here, so models get two more digits of slack.
# A wiring error (a missing ReLU, the wrong BN) is an O(1) error.
MODEL_RELATIVE = 1e-8


def assert_close(actual, expected, what="output", kind="forward"):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = relative_error(actual, expected)
    assert err <= MODEL_RELATIVE, f"{what}: relative error {err:.3e} > {MODEL_RELATIVE:.0e} ({kind})"


def _run(model, x, grad_out):
    """Forward and backward; returns (output, input gradient, parameter gradients by name)."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.backward(grad_out)
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


def _assert_same_state(a, b, what):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb), f"{what}: state_dict keys differ"
    for key in sa:
        if sa[key].is_floating_point():
            assert_close(sb[key], sa[key], what=f"{what}: {key}")
        else:
            assert torch.equal(sb[key], sa[key]), f"{what}: {key}"


def _assert_same_run(run_e, run_f, what):
    (out_e, gx_e, grads_e), (out_f, gx_f, grads_f) = run_e, run_f
    assert_close(out_f, out_e, what=f"{what}: output")
    assert_close(gx_f, gx_e, kind="backward", what=f"{what}: input gradient")
    for name, g in grads_e.items():
        assert_close(grads_f[name], g, kind="backward", what=f"{what}: grad of {name}")


@pytest.mark.parametrize("name", ALL_MODELS)
def test_eager_and_fast_agree(name):
    eager, shape = build(name, fused=False)
    fast, _ = build(name, fused=True)
    assert (eager.fused, fast.fused) == (False, True)
    assert [(n, type(m)) for n, m in eager.named_modules()] == [(n, type(m)) for n, m in fast.named_modules()]
    for key, value in eager.state_dict().items():  # same seed, same weights: bit for bit
        assert torch.equal(fast.state_dict()[key], value), key

    x = torch.randn(shape, dtype=torch.float64)
    grad_out = torch.randn(shape[0], 10, dtype=torch.float64)

    # training: batch statistics, running statistics updated, then one SGD step
    _assert_same_run(_run(eager, x, grad_out), _run(fast, x, grad_out), f"{name} train")
    _assert_same_state(eager, fast, f"{name} after a training forward")
    for model in (eager, fast):
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4).step()
    _assert_same_state(eager, fast, f"{name} after an SGD step")

    # eval: running statistics (BN folded by the fast convolutions), gradients still flowing
    eager.eval(), fast.eval()
    _assert_same_run(_run(eager, x, grad_out), _run(fast, x, grad_out), f"{name} eval")
    with torch.no_grad():
        assert_close(fast(x), eager(x), what=f"{name} eval, no_grad")


@pytest.mark.parametrize("name", ["resnet50", "preact_resnet18", "regnetx_32", "deresnext"])
def test_state_dict_moves_between_fused_and_unfused(name):
    eager, shape = build(name, fused=False, seed=0)
    fast, _ = build(name, fused=True, seed=1)
    x = torch.randn(shape, dtype=torch.float64)
    eager.eval(), fast.eval()
    with torch.no_grad():
        fast.load_state_dict(eager.state_dict(), strict=True)
        assert_close(fast(x), eager(x), what="eager weights in the fast model")
        other, _ = build(name, fused=False, seed=2)
        other.eval()
        fast.load_state_dict(other.state_dict())
        eager.load_state_dict(fast.state_dict(), strict=True)
        assert_close(eager(x), other(x), what="fast weights in the eager model")


@pytest.mark.parametrize("name", ["resnet50", "preact_resnet50", "regnetx_400mf", "vionet_b"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_channels_last(name, mode):
    """A channels_last model on channels_last input computes what the NCHW one does, and its blocks
    hand channels_last activations on (no silent layout round trips)."""
    reference, shape = build(name, fused=False)
    x = torch.randn(shape, dtype=torch.float64)
    for fused in (False, True):
        model, _ = build(name, fused)
        model.to(memory_format=torch.channels_last)
        getattr(reference, mode)(), getattr(model, mode)()
        layouts = []
        last_block = model.trunk_output[-1][-1] if hasattr(model, "trunk_output") else model.stages()[-1][-1]
        last_block.register_forward_hook(
            lambda m, i, o, seen=layouts: seen.append(o.is_contiguous(memory_format=torch.channels_last)))
        run_ref = _run(reference, x, torch.ones(shape[0], 10, dtype=torch.float64))
        run = _run(model, x.contiguous(memory_format=torch.channels_last),
                   torch.ones(shape[0], 10, dtype=torch.float64))
        _assert_same_run(run_ref, run, f"{name} fused={fused} channels_last {mode}")
        assert layouts == [True], f"fused={fused}: the last block's output is not channels_last"
        reference, _ = build(name, fused=False)  # fresh running statistics for the next model


def kits(model):
    return {m.kit for m in model.modules() if hasattr(m, "kit")}


def test_set_fused_in_place():
    model, shape = build("resnet18", fused=False)
    x = torch.randn(shape, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        expected = model(x)
        assert model.set_fused(True, backend="reference") is model
        assert kits(model) == {get_kit(True, "reference")} and model.backend == "reference"
        assert_close(model(x), expected, what="switched to fused")
        set_fused(model, False)
        assert kits(model) == {get_kit(False)} and not model.fused


def test_the_op_backend_reaches_every_fused_call():
    """backend= is the op backend of every fused op the model calls: "cuda" cannot take CPU tensors, and
    says so from the stem; with "reference" the model runs even where the process default is "cuda" (a
    call without the model's backend would raise), and computes what the unfused model does."""
    eager, shape = build("resnet18", fused=False)
    x = torch.randn(shape, dtype=torch.float64)
    fused = create("resnet18", num_classes=10, fused=True, backend="cuda", **small_case("resnet18")[0]).double()
    fused.load_state_dict(eager.state_dict())
    assert fused.backend == "cuda"
    with pytest.raises(RuntimeError, match="pyfast backend 'cuda' cannot run conv_bn_relu"):
        fused(x)
    fused.set_fused(True, backend="reference")
    with ops.use_backend("cuda"):
        assert_close(fused(x), eager(x))


def test_copies_keep_fused_and_backend():
    fast, shape = build("regnetx_32", fused=True)
    fast.set_fused(True, backend="reference")
    for copied in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
        assert copied.kit is get_kit(True, "reference") and copied.stem.kit is copied.kit
        with torch.no_grad():
            x = torch.randn(shape, dtype=torch.float64)
            assert_close(copied.eval()(x), copy.deepcopy(fast).eval()(x))


@pytest.mark.parametrize("old, fused", [("eager", False), ("fast", True)])
def test_the_old_kit_names_still_work_with_a_warning(old, fused):
    with pytest.warns(DeprecationWarning, match=f"backend='{old}' is deprecated: pass fused={fused}") as caught:
        model = create("vionet", backend=old)
    assert caught[0].filename == __file__  # the warning points at the caller, so Python shows it
    assert (model.fused, model.backend) == (fused, None)
    with pytest.warns(DeprecationWarning):
        switch_backend(model, "eager" if fused else "fast")
    assert model.fused is not fused
    with pytest.warns(DeprecationWarning):
        assert get_kit(old) is get_kit(fused)


def test_bad_kit_arguments():
    with pytest.raises(ValueError, match="pass fused=True with it"):
        create("vionet", backend="triton")
    with pytest.raises(TypeError, match="fused must be a bool"):
        create("vionet", fused="yes")
    with pytest.raises(ValueError, match="unknown pyfast backend"):
        set_fused(create("vionet"), True, backend="fastest")


@pytest.mark.parametrize("fused", [False, True])
def test_compiles_without_graph_breaks(fused):
    """Dynamo traces fused and unfused models whole (the kits are plain objects, nothing imported at
    call time)."""
    torch.manual_seed(0)
    model = create("preact_resnet18", widths=(4, 4, 8, 8), stem_width=4, num_classes=3, fused=fused)
    x = torch.randn(2, 3, 64, 64)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x))
