"""Residual blocks taken out of the models — RegNet/ResNeXt (regnetx_32, regnetx_400mf), the De-ResNeXt
basic block (deresnext), ResNet basic (resnet18) and bottleneck (resnet50), pre-activation bottleneck
(preact_resnet50) — each stage's first (projection shortcut) and second (identity) block, eager vs
torch.compile vs pyfast. `pytest --benchmark benchmarks/test_blocks.py -k "resnet50 and train_step"`."""
import copy

import pytest
import torch

from pyfast import models
from pyfast.benchmarks import timing
from pyfast.benchmarks.suite import DEVICE, GPU, SIZES, skip_compile_on_cpu
from pyfast.benchmarks.workloads import MODES, PROVIDERS, Config, blocks, compiled, image_batch, make_step, place

MODELS = ["regnetx_32", "deresnext", "resnet18", "resnet50", "preact_resnet50", "regnetx_400mf"]
if not GPU:
    MODELS = ["regnetx_32", "resnet18", "preact_resnet50"]


def _block_params():
    """(model, unit) for the blocks picked, from the models' analytic complexity on the meta device
    (nothing is allocated at collection)."""
    params = []
    for name in MODELS:
        with torch.device("meta"):
            model = models.create(name)
        picked = blocks(model, (SIZES["batch"], 3, SIZES["image"], SIZES["image"]))
        if not GPU:  # the CPU run: the blocks of the second stage only
            stage = picked[2].name.rsplit(".", 1)[0]
            picked = [u for u in picked if u.name.startswith(stage + ".")]
        params += [pytest.param(name, u, id=f"{name}.{u.name}") for u in picked]
    return params


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("layout", SIZES["layouts"])
@pytest.mark.parametrize("dtype", SIZES["dtypes"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model, unit", _block_params())
def test_block(run, model, unit, mode, dtype, layout, provider):
    skip_compile_on_cpu(provider)
    config = Config(mode, dtype, layout, DEVICE)
    eager = models.create(model)
    if provider == "pyfast":
        fast = models.create(model, fused=True)
        fast.load_state_dict(eager.state_dict())
        block = fast.get_submodule(unit.name)
    else:
        block = copy.deepcopy(eager.get_submodule(unit.name))
    block = place(block, config)
    if provider == "compile":
        block = compiled(block)
    step = make_step(block, config)
    sets = timing.random_input_sets(image_batch(unit.in_shape, config, grad_shape=unit.out_shape), DEVICE)
    flops = 2 * unit.flops * (3 if config.backward else 1)
    run(step, sets, config, group=f"block {model}.{unit.name} {mode} {dtype} {layout}", flops=flops, level="block",
        model=model, block=unit.name, kind=unit.kind, provider=provider, shape=list(unit.in_shape))
