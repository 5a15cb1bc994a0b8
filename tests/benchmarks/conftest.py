"""Stand-ins for the benchmark harness's tests: a tiny registry model and fixed ceilings, so that the
report runs end to end in seconds without timing anything that matters."""
import pytest

from pyfast.benchmarks import timing


def tiny_model(name, num_classes=10, in_chans=1, backend="eager"):
    """A two-stage AnyNet of a few thousand parameters, whatever `name` asks for."""
    from pyfast import models

    return models.create("anynet", depths=(1, 1), widths=(8, 16), group_widths=8, stem_width=8,
                         num_classes=num_classes, in_chans=in_chans, backend=backend)


@pytest.fixture
def fixed_ceilings(monkeypatch):
    """Skips measuring the copy bandwidth and matmul rate (a second of CPU each time)."""
    ceil = timing.Ceilings(copy_gbps=10.0, matmul_tflops={"fp32": 0.1, "bf16": 0.2})
    monkeypatch.setattr(timing, "ceilings", lambda device, dtypes=None: ceil)
    return ceil
