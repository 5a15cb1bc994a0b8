"""benchmarks/gpu_smoke.py: a backend whose results are wrong fails the smoke (and so leaves the GPU check's
tables), one that is right passes; on the CPU, with tiny shapes."""

from pyfast.benchmarks import gpu_smoke


def test_a_wrong_backend_fails_and_a_right_one_passes(monkeypatch):
    right = gpu_smoke.run(tiny=True, time_limit=60)
    assert right["backends"]["cpu"]["ok"] and right["backends"]["cpu"]["complete"]
    run_step = gpu_smoke._run

    def off_by_a_percent(module, inputs, grad):  # every result of the fused backend 1% off
        results = run_step(module, inputs, grad)
        return results if module.backend == "reference" else [t * 1.01 for t in results]

    monkeypatch.setattr(gpu_smoke, "_run", off_by_a_percent)
    wrong = gpu_smoke.run(tiny=True, time_limit=60)
    assert not wrong["backends"]["cpu"]["ok"]
    assert all(not check["ok"] for check in wrong["backends"]["cpu"]["checks"])


def test_a_check_that_raises_fails_its_backend(monkeypatch):
    def broken(case, backend, config):
        raise RuntimeError("no kernel for this shape")

    monkeypatch.setattr(gpu_smoke, "check_against_reference", broken)
    doc = gpu_smoke.run(tiny=True, time_limit=60)
    assert not doc["backends"]["cpu"]["ok"]
    assert "RuntimeError: no kernel" in doc["backends"]["cpu"]["checks"][0]["exception"]
