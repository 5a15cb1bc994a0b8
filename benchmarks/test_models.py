"""Whole models, eager vs torch.compile vs pyfast, inference / training forward / training step
(forward, backward, SGD). `pytest --benchmark benchmarks/test_models.py -k "regnetx_32 and bf16"`."""
import pytest

from pyfast.benchmarks import timing
from pyfast.benchmarks.suite import DEVICE, GPU, SIZES, skip_compile_on_cpu
from pyfast.benchmarks.report import GPU_MODELS
from pyfast.benchmarks.workloads import (MODES, PROVIDERS, Config, compiled, image_batch, make_step, model_variants,
                                         native_input, place)

MODELS = GPU_MODELS if GPU else ["regnetx_32", "resnet18"]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("layout", SIZES["layouts"])
@pytest.mark.parametrize("dtype", SIZES["dtypes"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("in_chans", SIZES["in_chans"], ids=lambda c: f"in{c}")
@pytest.mark.parametrize("model", MODELS)
def test_model(run, model, in_chans, mode, dtype, layout, provider):
    skip_compile_on_cpu(provider)
    config = Config(mode, dtype, layout, DEVICE)
    num_classes = native_input(model)[1]
    variant = model_variants(model, [provider], num_classes, in_chans)[provider]
    assert not isinstance(variant, str), f"{provider}'s {model} could not be built: {variant}"
    module = place(variant, config)
    if provider == "compile":
        module = compiled(module)
    shape = (SIZES["batch"], in_chans, SIZES["image"], SIZES["image"])
    step = make_step(module, config)
    sets = timing.random_input_sets(image_batch(shape, config, num_classes=num_classes), DEVICE)
    flops = 2 * variant.complexity(shape).flops * (3 if config.backward else 1)
    run(step, sets, config, group=f"model {model} in{in_chans} {mode} {dtype} {layout}", flops=flops, level="model",
        model=model, in_chans=in_chans, provider=provider, batch=SIZES["batch"], image=SIZES["image"])
