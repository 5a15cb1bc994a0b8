"""Lean training (pyfast.ops.lean): what a training forward keeps, exactly; the rebuilt activations against the
forward's, bit for bit; gradients and running statistics against the forward that keeps everything; the chain's
fallbacks (in-place changes, foreign ops), enclosing saved-tensor hooks, retain_graph and the backward's peak."""
import copy

import pytest
import torch
from torch import nn

import pyfast
from pyfast import models, ops
from pyfast.benchmarks.memory import SavedTensors, kept_bytes, step_peak_bytes, training_step
from pyfast.ops import lean

from harness import skip_unless_runs

CL = torch.channels_last


@pytest.fixture
def not_lean():
    """Runs the test's body with lean off; restores it after."""
    with lean.use_lean(False):
        yield


def _bn(c):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


def _conv_bn_relu(x, conv, bn, relu=True, backend="cpu"):
    return pyfast.nn.functional.conv_bn_relu(x, conv, bn, relu=relu, backend=backend)


def test_lean_is_on_by_default_and_switchable(not_lean):
    assert not lean.enabled()
    with lean.scope():
        assert not lean.active()
    pyfast.set_lean(True)
    with lean.scope():
        assert lean.active()
        with lean.scope():  # nested models share the outer scope
            assert lean.active()
    assert not lean.active()
    with torch.no_grad(), lean.scope():
        assert not lean.active()
    with pytest.raises(TypeError):
        pyfast.set_lean("off")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_chain_keeps_one_tensor_per_convolution_exactly(backend):
    """conv-BN-ReLU, conv-BN-ReLU, conv-BN + identity + ReLU: the convolutions' outputs and the block's input (which
    the first convolution needs for its weight gradient), nothing else; gradients bit for bit those of the forward
    that keeps everything. On cpu the C++ Functions record their outputs, on Triton the Python ones register them."""
    torch.manual_seed(0)
    convs = [nn.Conv2d(8, 8, 3, padding=1, bias=False) for _ in range(3)]
    bns = [_bn(8) for _ in range(3)]
    x = torch.randn(2, 8, 6, 6).to(memory_format=CL).requires_grad_()
    skip_unless_runs(backend, "conv_bn_relu", x)
    grad = torch.randn(2, 8, 6, 6)

    def block(x):
        h = _conv_bn_relu(x, convs[0], bns[0], backend=backend)
        h = _conv_bn_relu(h, convs[1], bns[1], backend=backend)
        return pyfast.nn.functional.conv_bn_add_relu(h, convs[2], bns[2], x, backend=backend)

    def run(lean_on):
        with lean.use_lean(lean_on), SavedTensors(batch=2) as saved, lean.scope():
            out = block(x)
        grads = torch.autograd.grad(out, [x, *(c.weight for c in convs), *(b.weight for b in bns)], grad)
        return saved, out, grads

    lean_saved, lean_out, lean_grads = run(True)
    full_saved, out, grads = run(False)
    y_bytes = 3 * 2 * 8 * 6 * 6 * 4
    assert lean_saved.bytes == x.nbytes + y_bytes and lean_saved.count == 4
    assert full_saved.bytes == lean_saved.bytes + 2 * x.nbytes  # the two post-ReLU activations
    assert torch.equal(lean_out, out)
    for a, b in zip(lean_grads, grads):
        assert torch.equal(a, b)


def test_the_cpp_record_ends_with_the_scope():
    """What the C++ Functions recorded is dropped when the scope closes, and nothing is recorded outside one."""
    native = pyfast._extension.extension
    if native is None:
        pytest.skip("pyfast._C is not built")
    conv, bn = nn.Conv2d(3, 8, 3, bias=False), _bn(8)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    with lean.scope():
        inside = _conv_bn_relu(x, conv, bn)
        assert native.lean_recipe(inside) is not None
    assert native.lean_recipe(inside) is None
    assert native.lean_recipe(_conv_bn_relu(x, conv, bn)) is None


def test_rebuilt_activation_is_bit_identical():
    torch.manual_seed(1)
    conv, bn = nn.Conv2d(4, 16, 3, padding=1, bias=False), _bn(16)
    x = torch.randn(3, 4, 7, 5, requires_grad=True)
    shortcut = torch.randn(3, 16, 7, 5, requires_grad=True)
    s_bn = ops.BatchNormArgs(*(t.requires_grad_() for t in (torch.rand(16) + 0.5, torch.randn(16))))
    with lean.scope():
        z = _conv_bn_relu(x, conv, bn)
        out = ops.bn_add_relu(z * 3, bn.weight, bn.bias, None, None, training=True, shortcut=shortcut,
                              shortcut_bn=s_bn, backend="cpu")
        for t in (z, out):
            recipe = lean._scope.recipe_of(t)
            assert torch.equal(recipe.value(), t)
        z.add_(0)  # changed in place: no longer the registered value, stored as usual
        assert lean._scope.recipe_of(z) is None


def _train(model, x, grad):
    out = model(x)
    out.backward(grad)
    return out, [p.grad for p in model.parameters()], [b.clone() for b in model.buffers()]


@pytest.mark.parametrize("name, kwargs", [
    ("resnet18", {}),
    ("regnetx_200mf", {"in_chans": 1}),
    ("preact_resnet18", {}),
])
def test_model_gradients_and_statistics_equal_the_full_forward(name, kwargs):
    """Every gradient and running statistic bit for bit equal to the forward that keeps every activation (the same
    kernels, the same rounding), and far leaner."""
    torch.manual_seed(2)
    model = models.create(name, fused=True, backend="cpu", num_classes=10, **kwargs).train().to(memory_format=CL)
    x = torch.randn(2, model.in_chans, 32, 32).to(memory_format=CL)
    grad = torch.randn(2, 10)
    lean_model = copy.deepcopy(model)
    lean_out, lean_grads, lean_buffers = _train(lean_model, x, grad)
    with lean.use_lean(False):
        out, grads, buffers = _train(model, x, grad)
        full = kept_bytes(model, x)
    assert torch.equal(lean_out, out)
    for a, b in zip(lean_grads + lean_buffers, grads + buffers):
        assert torch.equal(a, b)
    assert kept_bytes(lean_model, x) < 0.62 * full


def test_resnet_keeps_its_input_its_convolutions_outputs_and_the_head_input_exactly():
    """The floor: the image, each convolution's output once, and the pooled features the classifier needs; the
    stem's BN-ReLU-maxpool and every block output are rebuilt."""
    torch.manual_seed(3)
    model = models.create("resnet18", fused=True, backend="cpu", num_classes=10).train().to(memory_format=CL)
    eager = copy.deepcopy(model).set_fused(False)
    x = torch.randn(2, 3, 32, 32).to(memory_format=CL)
    conv_out = []
    for m in eager.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda m, i, o: conv_out.append(o.nbytes))
    eager(x)
    assert len(conv_out) == 20
    with SavedTensors(batch=2) as saved, lean.scope():  # the model's own scope is nested in this one
        model(x).sum().backward()
    assert saved.bytes == x.nbytes + sum(conv_out) + 2 * 512 * 4


def test_outputs_changed_between_blocks_are_stored_and_gradients_stay_right():
    """A forward hook that changes a block's output in place, and a foreign op (drop_path-like) between blocks,
    break the chain: what they touched is stored, and gradients equal the full forward's."""
    torch.manual_seed(4)
    model = models.create("resnet18", fused=True, backend="cpu", num_classes=10).train()
    model.layer1[0].register_forward_hook(lambda m, i, o: o.mul_(0.5))
    model.layer2[0].register_forward_hook(lambda m, i, o: o * torch.rand_like(o).gt(0.2))
    x = torch.randn(2, 3, 32, 32)
    grad = torch.randn(2, 10)
    torch.manual_seed(5)
    lean_out, lean_grads, _ = _train(copy.deepcopy(model), x, grad)
    with lean.use_lean(False):
        torch.manual_seed(5)
        out, grads, _ = _train(model, x, grad)
    assert torch.equal(lean_out, out)
    for a, b in zip(lean_grads, grads):
        assert torch.equal(a, b)


def test_in_place_change_of_a_stored_tensor_after_the_forward_raises():
    conv, bn = nn.Conv2d(3, 8, 3, bias=False), _bn(8)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    with lean.scope():
        h = x * 2  # not a fused op's output: stored as usual
        out = _conv_bn_relu(h, conv, bn)
    h.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_in_place_change_of_a_weight_after_the_forward_raises():
    """Weights and per-channel maps stay on the Function's ctx in a lean forward: their versions are checked as
    autograd checks saved tensors."""
    conv, bn = nn.Conv2d(3, 8, 3, bias=False), _bn(8)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    with lean.scope():
        out = _conv_bn_relu(x, conv, bn)
    with torch.no_grad():
        conv.weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_enclosing_hooks_see_the_kept_tensors_and_gradients_stay_right():
    """save_on_cpu (or any enclosing saved_tensors_hooks) still handles what is kept: the stored tensors and the
    sources of the recipes pass through it."""
    torch.manual_seed(6)
    model = models.create("resnet18", fused=True, backend="cpu", num_classes=10).train()
    x, grad = torch.randn(2, 3, 32, 32), torch.randn(2, 10)
    packed = []

    def pack(t):
        packed.append(t.shape)
        return t.clone()

    reference_model = copy.deepcopy(model)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    out.backward(grad)
    ref_out, ref_grads, _ = _train(reference_model, x, grad)
    assert torch.equal(out, ref_out)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), ref_grads))
    assert (2, 64, 16, 16) in packed  # the stem's convolution output, a recipe's source


def test_retain_graph_backward_twice():
    torch.manual_seed(7)
    model = models.create("resnet18", fused=True, backend="cpu", num_classes=10).train()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    out = model(x)
    first = torch.autograd.grad(out.sum(), x, retain_graph=True)[0]
    second = torch.autograd.grad(out.sum(), x)[0]
    assert torch.equal(first, second)


def test_two_block_stage_gradcheck_in_float64():
    torch.manual_seed(8)
    from pyfast.models.resnet import BasicBlock

    kit = models.layers.get_kit(True, "cpu")
    downsample = nn.Sequential(nn.Conv2d(4, 6, 1, stride=2, bias=False), nn.BatchNorm2d(6))
    stage = nn.Sequential(BasicBlock(4, 6, 2, downsample, kit=kit), BasicBlock(6, 6, kit=kit)).double().train()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)

    def f(x):
        with lean.scope():
            return stage(x)

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-5, rtol=1e-4, nondet_tol=1e-10)


def test_step_peak_is_below_the_full_forwards():
    """The block outputs are rebuilt one stage at a time and dropped with their last use: a step's peak (backward
    included) stays below that of the forward that keeps everything."""
    torch.manual_seed(9)
    model = models.create("resnet18", fused=True, backend="cpu", num_classes=10).train().to(memory_format=CL)
    x = torch.randn(4, 3, 64, 64).to(memory_format=CL)
    lean_peak = step_peak_bytes(training_step(model, x), x.device)
    with lean.use_lean(False):
        full_peak = step_peak_bytes(training_step(model, x), x.device)
    assert lean_peak < full_peak


def test_fused_torchvision_resnet_keeps_the_same_floor():
    """pyfast.fuse on torchvision's resnet18: the same one tensor per convolution as the pyfast model (its stem's
    max-pool becomes the lean one), gradients equal to the fused model's with lean off."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(10)
    model = torchvision.models.resnet18(num_classes=10).train()
    x = torch.randn(2, 3, 32, 32)
    conv_out = []
    hooks = [m.register_forward_hook(lambda m, i, o: conv_out.append(o.nbytes))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    model(x)
    for h in hooks:
        h.remove()
    fused, _ = pyfast.fuse(model, backend="cpu")
    full = copy.deepcopy(fused)
    with SavedTensors(batch=2) as saved:
        out = fused(x)
    assert saved.bytes == x.nbytes + sum(conv_out) + 2 * 512 * 4
    grad = torch.randn_like(out)
    out.backward(grad)
    with lean.use_lean(False):
        full(x).backward(grad)
    for a, b in zip(fused.parameters(), full.parameters()):
        assert torch.equal(a.grad, b.grad)


def test_lean_max_pool_gradcheck_and_the_modules_other_forms():
    """The stem's lean max-pool: a float64 gradcheck through conv-BN-ReLU -> pool (its input rebuilt, its indices
    found again), and pools it does not take (indices returned, a 3-D input) left to nn.MaxPool2d itself."""
    torch.manual_seed(11)
    conv, bn = nn.Conv2d(3, 4, 3, padding=1, bias=False).double(), _bn(4).double()
    pool = nn.MaxPool2d(3, stride=2, padding=1)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64, requires_grad=True)

    def f(x):
        with lean.scope():
            return pyfast.nn.functional.max_pool2d(_conv_bn_relu(x, conv, bn), pool)

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-5, rtol=1e-4)
    with_indices = nn.MaxPool2d(2, return_indices=True)
    z = torch.randn(2, 4, 6, 6, requires_grad=True)
    with lean.scope():
        out, indices = pyfast.nn.functional.max_pool2d(z, with_indices)
        three_d = pyfast.nn.functional.max_pool2d(z[0], pool)
    assert torch.equal(out, with_indices(z)[0]) and torch.equal(indices, with_indices(z)[1])
    assert torch.equal(three_d, pool(z[0]))
