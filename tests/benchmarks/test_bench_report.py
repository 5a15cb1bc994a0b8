"""`python -m pyfast bench`: argument handling, and one end-to-end run on a tiny stand-in model."""
import argparse
import json

import pytest

from pyfast import __main__ as cli
from pyfast import models, ops
from pyfast.benchmarks import report, results, workloads

from bench_standins import tiny_model


def _parse(*argv):
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cpu_defaults_are_small():
    s = report.settings(_parse("--device", "cpu"))
    assert s["models"] == report.CPU_MODELS and s["dtype"] == ["fp32"]
    assert s["batch_size"] <= 4 and s["image_size"] <= 64 and s["time_limit"] < 600
    # torch.compile for one small model, listed first so that the time limit cannot cut what follows it short
    assert [m for m in s["models"] if report.compiles(m, s)] == ["vionet_d"] == s["models"][:1]


def test_gpu_defaults_are_the_judged_configuration():
    s = report.settings(_parse("--device", "cuda"))
    assert (s["batch_size"], s["image_size"], s["compile"]) == (128, 224, True)
    assert s["models"][0] == "regnetx_32"


def test_quick_shrinks_and_explicit_flags_win():
    quick = report.settings(_parse("--device", "cpu", "--quick"))
    assert len(quick["models"]) == 1 and quick["repeats"] < report._defaults(False)["repeats"]
    assert not report.compiles(quick["models"][0], quick)
    s = report.settings(_parse("--device", "cpu", "--quick", "--models", "resnet18", "resnet50", "--modes",
                               "train_forward", "--dtype", "bf16", "fp32", "--layout", "nchw", "--batch-size", "3",
                               "--image-size", "40", "--in-chans", "1", "3", "--repeats", "7", "--compile"))
    assert s["models"] == ["resnet18", "resnet50"] and s["modes"] == ["train_forward"]
    assert (s["dtype"], s["layout"], s["batch_size"], s["image_size"]) == (["bf16", "fp32"], ["nchw"], 3, 40)
    assert (s["in_chans"], s["repeats"], s["compile"]) == ([1, 3], 7, True)
    assert report.settings(_parse("--device", "cuda", "--no-compile"))["compile"] is False


@pytest.mark.parametrize("flags, compiled", [([], ["vionet_d"]), (["--no-compile"], []),
                                             (["--compile"], ["vionet_d", "resnet18"]),
                                             (["--compile-models", "resnet18"], ["resnet18"]),
                                             (["--quick", "--compile-models", "resnet18"], ["resnet18"])])
def test_which_models_compile_on_the_cpu(flags, compiled):
    s = report.settings(_parse("--device", "cpu", "--models", "vionet_d", "resnet18", *flags))
    assert [m for m in s["models"] if report.compiles(m, s)] == compiled


def test_all_models():
    assert report.settings(_parse("--device", "cpu", "--models", "all"))["models"] == models.list_models()


@pytest.mark.parametrize("bad", [["--modes", "sideways"], ["--dtype", "fp8"], ["--compile", "--no-compile"]])
def test_bad_arguments_are_refused(bad):
    with pytest.raises(SystemExit):
        _parse(*bad)


def test_configurations_run_model_by_model_with_native_inputs():
    s = report.settings(_parse("--device", "cpu", "--models", "regnetx_32", "resnet18", "--modes", "inference",
                               "train_step"))
    todo = report.configurations(s)
    assert [(m, c, n, cfg.mode) for m, c, n, cfg in todo] == [
        ("regnetx_32", 1, 10, "inference"), ("regnetx_32", 1, 10, "train_step"),
        ("resnet18", 3, 1000, "inference"), ("resnet18", 3, 1000, "train_step")]


def test_bench_end_to_end_on_a_tiny_model(tmp_path, monkeypatch, fixed_ceilings, capsys):
    monkeypatch.setattr(models, "create", tiny_model)
    out = tmp_path / "run.json"
    cli.main(["bench", "--models", "anynet", "--modes", "inference", "train_step", "--batch-size", "2",
              "--image-size", "16", "--repeats", "3", "--no-compile", "--threads", "1", "--out", str(out)])
    doc = json.loads(out.read_text())
    results.validate(doc)
    assert [r["mode"] for r in doc["rows"]] == ["inference", "train_step"]
    for row in doc["rows"]:
        assert row["env"]["device"] == doc["environment"]["device"]
        assert row["providers"]["compile"] == {"skipped": "--no-compile"}
        assert row["providers"]["eager"]["repeats"] >= 3
        assert "median_ms" in row["providers"]["pyfast"], row["providers"]["pyfast"]
        assert row["speedup_vs_eager"] > 0 and row["flops"] > 0
        assert row["memory_ratio"] > 0  # the CPU's peaks too: profiled (timing.cpu_peak_bytes)
    assert doc["rows"][0]["rel_err_vs_eager"] < 1e-4
    assert (tmp_path / "run.png").exists()
    printed = capsys.readouterr().out
    assert "x eager" in printed and "wrote" in printed and "anynet" in printed
    # what ran is the dispatcher's answer for the model's ops, on the CPU the cpu backend
    expected = "cpu" if ops.BACKENDS["cpu"].unavailable() is None else "reference"
    assert {r["pyfast_backend"] for r in doc["rows"]} == {expected}
    assert all(key.endswith(f" {expected}") for key in doc["rows"][0]["pyfast_dispatch"])
    assert any(key.startswith("conv_bn_relu ") for key in doc["rows"][0]["pyfast_dispatch"])
    assert doc["notes"][0] == report.CPU_NOTE and report.CPU_COMPILE_NOTE not in doc["notes"]  # --no-compile


def test_results_land_under_the_current_directory(tmp_path, monkeypatch, fixed_ceilings, capsys):
    monkeypatch.setattr(models, "create", tiny_model)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(results, "chart_unavailable", lambda: "matplotlib is not installed")
    monkeypatch.setattr(results, "plot_speedups", lambda doc, path: None)
    cli.main(["bench", "--models", "anynet", "--modes", "inference", "--batch-size", "2", "--image-size", "16",
              "--repeats", "2", "--no-compile", "--threads", "1"])
    written = list((tmp_path / report.RESULTS_DIR).glob("cpu-*.json"))
    assert len(written) == 1
    assert capsys.readouterr().out.count("chart skipped: matplotlib is not installed") == 1


def test_dispatch_summary_counts_calls_per_backend():
    assert report.dispatch_summary({("conv_bn_relu", "cuda"): 3, ("add_relu", "cuda"): 2}) == "cuda"
    mixed = {("conv_bn_relu", "cuda"): 3, ("conv_bn_relu", "triton"): 4, ("add_relu", "cuda"): 2}
    assert report.dispatch_summary(mixed) == "cuda 5 + triton 4"


def test_a_misspelt_model_fails_before_anything_runs():
    with pytest.raises(ValueError, match="did you mean 'resnet50'"):
        report.main(_parse("--device", "cpu", "--models", "resnet_50"))


def test_a_failing_model_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch, fixed_ceilings):
    def factory(name, **kwargs):
        if name == "broken":
            raise RuntimeError("out of memory")
        return tiny_model(name, **kwargs)

    doc = report.main(_parse("--device", "cpu", "--models", "broken", "tiny", "--modes", "inference", "--repeats",
                             "2", "--no-compile", "--threads", "1", "--out", str(tmp_path / "r.json")), factory)
    assert "out of memory" in doc["skipped"][0] and [r["model"] for r in doc["rows"]] == ["tiny"]


def test_time_limit_skips_and_still_writes(tmp_path, monkeypatch, fixed_ceilings):
    monkeypatch.setattr(models, "create", tiny_model)
    out = tmp_path / "run.json"
    doc = report.main(_parse("--device", "cpu", "--models", "anynet", "--modes", "inference", "--time-limit", "0",
                             "--threads", "1", "--out", str(out)))
    assert doc["rows"] == [] and "time-limit" in doc["skipped"][0]
    results.validate(json.loads(out.read_text()))


def test_cuda_graph_providers_are_skipped_without_a_gpu(tmp_path, monkeypatch, fixed_ceilings):
    monkeypatch.setattr(models, "create", tiny_model)
    out = tmp_path / "run.json"
    cli.main(["bench", "--models", "anynet", "--modes", "train_step", "--batch-size", "2", "--image-size", "16",
              "--repeats", "3", "--no-compile", "--threads", "1", "--device", "cpu", "--cuda-graphs",
              "--out", str(out)])
    doc = json.loads(out.read_text())
    results.validate(doc)
    for name in workloads.GRAPHED:
        assert doc["rows"][0]["providers"][name] == {"skipped": "CUDA graphs need a GPU"}
    assert doc["rows"][0]["graphed_speedup_vs_eager"] is None


def test_cpu_providers_are_timed_in_interleaved_rounds():
    """Each provider's samples come from every round, the rounds alternating between providers (so drift on a
    shared machine hits all of them alike); a provider that fails is reported with its error, the others
    still timed."""
    order = []

    def step_of(name):
        def step(*args):
            order.append(name)
        return step

    def broken(*args):
        raise RuntimeError("no kernel")

    s = dict(repeats=6, warmup=1, budget_s=10.0)
    config = workloads.Config("inference", "fp32", "nchw", "cpu")
    out = report.time_interleaved({"eager": step_of("eager"), "broken": broken, "pyfast": step_of("pyfast")},
                                  config, [()], s, None)
    assert list(out) == ["eager", "broken", "pyfast"]
    assert out["broken"]["error"] == "RuntimeError: no kernel"
    assert out["eager"]["repeats"] == out["pyfast"]["repeats"] == 6
    runs = [name for i, name in enumerate(order) if i == 0 or order[i - 1] != name]
    # then each provider's peak memory, from its own profiled calls (timing.cpu_peak_bytes)
    assert runs == ["eager", "pyfast"] * report.CPU_ROUNDS + ["eager", "pyfast"]
    assert out["eager"]["peak_memory_bytes"] == out["pyfast"]["peak_memory_bytes"] == 0  # the steps allocate nothing
