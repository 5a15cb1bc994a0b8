"""Comparisons of a pyfast module or fused model (float32) against its plain-PyTorch counterpart run in
float64: outputs, input and parameter gradients, buffers, over SGD training steps and in eval.

Single modules are held to the float32 bound of the contract (1e-4 relative). For whole models pass
`eager`, the plain model in float32: rounding compounds through tens of layers and BN statistics of small
batches amplify it, so each quantity may be off the float64 result by max(MODEL_FLOOR, 2x forward /
3x backward eager PyTorch's own float32 error), the relative rule docs/DESIGN.md gives for low precision.
The floor is there because a gradient that is a near-cancelling sum (a BN weight's) carries an error that
depends on summation order: over 30 seeds of one conv_bn_relu, the fused and eager errors of
grad(bn.weight) differ by up to 5.6x either way (median ratio 0.83), so eager's own error alone is too
lucky a yardstick. A wrong fusion is off by O(1), far above it.
"""
import copy

import torch
from tolerances import EAGER_FACTOR, RELATIVE, relative_error


def double_copy(module):
    return copy.deepcopy(module).double()


def _as_tuple(xs):
    return xs if isinstance(xs, (tuple, list)) else (xs,)


MODEL_FLOOR = 1e-3


def check(actual, expected, eager=None, kind="forward", what=""):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = relative_error(actual, expected)
    bound = RELATIVE[torch.float32]
    if eager is not None:
        bound = max(MODEL_FLOOR, EAGER_FACTOR[kind] * relative_error(eager, expected))
    assert err <= bound, f"{what}: relative error {err:.3e} > {bound:.3e}"


class Run:
    """A model, its input dtype and optimizer."""

    def __init__(self, model, call, dtype):
        self.model, self.call, self.dtype = model, call or model, dtype
        self.opt = torch.optim.SGD(list(model.parameters()) or [torch.zeros(1)], lr=1e-3, momentum=0.9)

    def forward(self, inputs, grads):
        self.inputs = [x.detach().to(self.dtype).requires_grad_(grads) for x in inputs]
        self.out = self.call(*self.inputs)
        return self.out

    def backward(self, weight):
        (self.out * weight.to(self.out.dtype)).sum().backward()

    def step(self):
        self.opt.step()
        self.opt.zero_grad()


def step_and_compare(runs, inputs, what="", grads=True):
    """One forward (+ backward) of every run: outputs, input gradients and parameter gradients (by name)
    of runs["fused"] against runs["plain"] (float64), bounded by runs.get("eager")."""
    for run in runs.values():
        run.forward(inputs, grads)
    fused, plain, eager = runs["fused"], runs["plain"], runs.get("eager")
    assert fused.out.dtype == torch.float32
    check(fused.out, plain.out, eager and eager.out, what=f"{what}output")
    if not grads:
        return
    weight = torch.randn(plain.out.shape, dtype=torch.float64)
    for run in runs.values():
        run.backward(weight)
    for i, (xf, xp) in enumerate(zip(fused.inputs, plain.inputs)):
        check(xf.grad, xp.grad, eager and eager.inputs[i].grad, "backward", f"{what}grad of input {i}")
    plain_params = dict(plain.model.named_parameters())
    eager_params = dict(eager.model.named_parameters()) if eager else {}
    scale = max((p.grad.norm().item() for p in plain_params.values() if p.grad is not None), default=1.0)
    for name, p in fused.model.named_parameters():
        expected = plain_params[name].grad
        assert (p.grad is None) == (expected is None), f"{what}grad of {name}"
        if expected is not None and expected.norm().item() <= 1e-9 * scale:
            # mathematically zero (a conv bias under a BN in training): float32 leaves rounding noise
            assert p.grad.norm().item() <= 1e-4 * scale, f"{what}grad of {name} should be ~0, is {p.grad}"
        elif expected is not None:
            check(p.grad, expected, eager_params[name].grad if eager else None, "backward", f"{what}grad of {name}")


def compare_state(runs, what=""):
    """Same state_dict keys in the same order; buffers and parameters equal (integers exactly)."""
    a, b = runs["fused"].model.state_dict(), runs["plain"].model.state_dict()
    c = runs["eager"].model.state_dict() if "eager" in runs else {}
    assert list(a) == list(b), f"{what}state_dict keys differ"
    for key in a:
        if a[key].is_floating_point():
            check(a[key], b[key], c.get(key), "backward", f"{what}{key}")
        else:
            assert torch.equal(a[key], b[key]), f"{what}{key}: {a[key]} != {b[key]}"


def train_and_compare(fused, plain, make_inputs, call_fused=None, call_plain=None, steps=3, eager=None,
                      call_eager=None, eval_step=True):
    """`steps` SGD (momentum) steps on fused (float32) and plain (float64); after each: outputs, gradients,
    then parameters and buffers (running statistics, num_batches_tracked) after the update. Then eval:
    with gradients (then, with `eval_step`, one more SGD step, so the next call must see the update) and
    without (the folded path). `eager`: the plain model in float32, for whole models (see the module
    docstring); an eval-mode SGD step on an untrained deep model is too ill-conditioned to compare."""
    runs = {"fused": Run(fused, call_fused, torch.float32), "plain": Run(plain, call_plain, torch.float64)}
    if eager is not None:
        runs["eager"] = Run(eager, call_eager, torch.float32)
    for run in runs.values():
        run.model.train()
    for step in range(steps):
        step_and_compare(runs, _as_tuple(make_inputs()), f"train step {step}: ")
        for run in runs.values():
            run.step()
        compare_state(runs, f"after train step {step}: ")
    for run in runs.values():
        run.model.eval()
    if eager is not None:
        # Whole models are compared in eval from one state (the float64 run's): float32 rounding compounds over
        # the training steps, and an eval-mode gradient of a deep model amplifies where the trajectories parted
        # (a BN bias of torchvision-like ResNet-50, 7% off in eager float32 itself, read 25% off in fused).
        for name in ("fused", "eager"):
            runs[name].model.load_state_dict(runs["plain"].model.state_dict())
    step_and_compare(runs, _as_tuple(make_inputs()), "eval with grad: ")
    if eval_step:
        for run in runs.values():
            run.step()
        compare_state(runs, "after eval step: ")
    with torch.no_grad():
        step_and_compare(runs, _as_tuple(make_inputs()), "eval no grad: ", grads=False)
