"""Each fused op against the eager sequence it replaces (`backend="reference"`), torch.compile of that
sequence, and each fused backend, on RegNetX-32's and ResNet-50's stage shapes (kernels.py), in the
three modes. `pytest --benchmark benchmarks/test_ops.py -k "regnetx_32 and train_step"`.

A backend that declares it cannot take the inputs (its `why_not`, as `python -m pyfast info` prints it)
is skipped with that reason; any other error fails the test, so a broken backend is never a skip."""
import pytest

from pyfast import ops
from pyfast.benchmarks import kernels, timing
from pyfast.benchmarks.suite import DEVICE, GPU, SIZES, skip_compile_on_cpu
from pyfast.benchmarks.workloads import MODES, Config

CASES = kernels.regnetx_32_cases(SIZES["batch"], SIZES["image"]) + kernels.resnet50_cases(SIZES["batch"],
                                                                                         SIZES["image"])
if not GPU:  # one stage of each network: a few minutes on 2 cores
    CASES = [c for c in CASES if (c.net, c.where) in (("regnetx_32", "s2"), ("resnet50", "s3"))]
PROVIDERS = ["eager", "compile"] + kernels.fused_backends(DEVICE)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("layout", SIZES["layouts"])
@pytest.mark.parametrize("dtype", SIZES["dtypes"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name.replace(" ", "-"))
def test_op(run, case, mode, dtype, layout, provider):
    skip_compile_on_cpu(provider)
    config = Config(mode, dtype, layout, DEVICE)
    backend = "reference" if provider in ("eager", "compile") else provider
    sets = timing.random_input_sets(kernels.op_inputs(case, config), DEVICE)
    x = sets[0][0]
    reason = ops.BACKENDS[backend].why_not(case.op, x.device, x.dtype)
    if reason:
        pytest.skip(f"{provider} cannot run {case.op} on {x.dtype} {x.device.type} tensors: {reason}")
    step = kernels.op_step(case, backend, config, compile=provider == "compile")
    run(step, sets, config, group=f"op {case.name} {mode} {dtype} {layout}", flops=case.flops(mode),
        min_bytes=case.min_bytes(mode, sets[0][0].dtype), level="op", case=case.name, provider=provider)
