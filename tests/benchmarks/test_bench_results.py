"""Result documents: schema check, derived ratios, the printed tables, JSON and PNG files."""
import json

import pytest

from pyfast.benchmarks import results

ENV = {"device": "Test GPU", "device_type": "cuda", "torch": "2.x", "triton": "3.x", "cuda": "13.0",
       "date": "2026-01-01T00:00:00+00:00"}


def _measurement(median, peak=1000):
    return {"median_ms": median, "p20_ms": median * 0.9, "p80_ms": median * 1.1, "min_ms": median * 0.8,
            "repeats": 10, "peak_memory_bytes": peak, "first_call_s": 0.1, "tflops": 1.0}


def _row(**overrides):
    row = {"model": "regnetx_32", "mode": "train_step", "dtype": "bf16", "layout": "channels_last", "batch_size": 128,
           "image_size": 224, "in_chans": 1, "num_classes": 10, "env": results.stamp(ENV),
           "providers": {"eager": _measurement(10.0, 4000), "compile": _measurement(8.0, 3000),
                         "pyfast": _measurement(5.0, 2000)}}
    row.update(overrides)
    return results.summarize_row(row)


def _doc(rows):
    return {"schema": results.BENCH_SCHEMA, "environment": ENV, "settings": {}, "notes": [], "skipped": [],
            "ceilings": {"copy_gbps": 3000.0, "matmul_tflops": {"bf16": 700.0, "fp32": 400.0}}, "rows": rows}


def test_summarize_row_derives_speedups_and_memory():
    row = _row()
    assert row["speedup_vs_eager"] == pytest.approx(2.0)
    assert row["speedup_vs_compile"] == pytest.approx(1.6)
    assert row["compile_vs_eager"] == pytest.approx(1.25)
    assert row["memory_ratio"] == pytest.approx(0.5)


def test_summarize_row_without_a_provider_leaves_ratios_empty():
    row = _row(providers={"eager": _measurement(10.0, None), "compile": {"skipped": "off"},
                          "pyfast": {"error": "boom"}})
    assert row["speedup_vs_eager"] is None and row["speedup_vs_compile"] is None and row["memory_ratio"] is None


def test_validate_accepts_a_complete_document():
    results.validate(_doc([_row()]))


@pytest.mark.parametrize("breakage, message", [
    (lambda d: d.pop("ceilings"), "missing 'ceilings'"),
    (lambda d: d["rows"][0].pop("env"), "lacks 'env'"),
    (lambda d: d["rows"][0]["env"].pop("torch"), "env lacks 'torch'"),
    (lambda d: d["rows"][0]["providers"]["eager"].pop("p80_ms"), "lacks 'p80_ms'"),
    (lambda d: d["rows"][0]["providers"]["eager"].update(p20_ms=99.0), "percentiles out of order"),
    (lambda d: d.update(schema="other/1"), "schema"),
])
def test_validate_names_what_is_wrong(breakage, message):
    doc = _doc([_row()])
    breakage(doc)
    with pytest.raises(ValueError, match=message):
        results.validate(doc)


def test_format_table_aligns_columns():
    text = results.format_table(["name", "ms"], [["a", "1.00"], ["longer", "10.00"]])
    lines = text.splitlines()
    assert lines[0] == "name       ms"
    assert lines[2] == "a        1.00"
    assert lines[3] == "longer  10.00"
    assert len({len(line) for line in lines}) == 1


def test_model_table_shows_each_provider_and_the_ratios():
    skipped = _row(model="resnet50", providers={"eager": _measurement(3.0), "compile": {"skipped": "off"},
                                                "pyfast": {"error": "x"}})
    text = results.model_table(_doc([_row(pyfast_backend="cuda 30 + triton 8"), skipped]))
    header, _, first, second = text.splitlines()
    assert header.split()[:4] == ["model", "mode", "dtype", "layout"]
    assert first.split() == ["regnetx_32", "train_step", "bf16", "channels_last", "10.00", "8.00", "5.00", "2.00",
                             "1.60", "0.50", "1", "cuda", "30", "+", "triton", "8"]
    assert second.split()[4:7] == ["3.00", "skip", "error"]


def test_kernel_table_reports_rates_against_the_ceilings():
    entry = {**_measurement(0.5), "gbps": 1500.0, "bandwidth_fraction": 0.5, "tflops": None, "tflops_fraction": None,
             "roofline_fraction": 0.5, "speedup_vs_eager": 2.0}
    doc = {"environment": ENV, "ceilings": {"copy_gbps": 3000.0, "matmul_tflops": {"bf16": 700.0}},
           "rows": [{"case": "regnetx_32.s1 add_relu 32 @56x56", "mode": "inference", "dtype": "bf16",
                     "layout": "channels_last", "backends": {"reference": _measurement(1.0),
                                                             "cuda": entry, "triton": {"error": "no triton"}}}]}
    text = results.kernel_table(doc)
    assert "copy 3000.0 GB/s" in text
    cuda_line = next(line for line in text.splitlines() if " cuda " in line)
    assert "2.00" in cuda_line and "1500" in cuda_line and " 50 " in cuda_line
    assert "n/a: no triton" in text
    assert "x2.00" in results.kernel_row_line(doc["rows"][0])


def test_write_json_round_trips(tmp_path):
    doc = _doc([_row()])
    path = results.write_json(doc, str(tmp_path / "sub" / "r.json"))
    assert json.loads(open(path).read()) == json.loads(json.dumps(doc))
    assert not (tmp_path / "sub" / "r.json.tmp").exists()


def test_plot_speedups_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = results.plot_speedups(_doc([_row(), _row(mode="inference")]), str(tmp_path / "chart.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_speedups_skips_an_empty_document(tmp_path):
    assert results.plot_speedups(_doc([]), str(tmp_path / "chart.png")) is None


def test_kernel_summary_and_the_printing_entry_point(tmp_path, capsys):
    doc = {"schema": results.KERNELS_SCHEMA, "environment": ENV, "ceilings": {}, "skipped": ["late case: time limit"],
           "rows": [{"case": "c1", "mode": "inference", "dtype": "bf16", "layout": "channels_last",
                     "backends": {"reference": _measurement(1.0),
                                  "cuda": {**_measurement(0.5), "speedup_vs_eager": 2.0, "roofline_fraction": 0.25},
                                  "triton": {"error": "no"}}}]}
    lines = results.kernel_summary(doc).splitlines()
    assert lines[1].split() == ["case", "mode", "eager", "ms", "x", "cuda", "x", "triton", "best", "%roofline"]
    assert lines[3].split() == ["c1", "inference", "1.00", "2.00", "-", "25"]
    path = results.write_json(doc, str(tmp_path / "k.json"))
    results.main([path, "--short"])
    printed = capsys.readouterr().out
    assert "c1" in printed and "skipped: late case" in printed


def test_pytest_benchmark_documents_print_too(tmp_path, capsys):
    doc = {"machine_info": {"cpu": {"brand_raw": "Test CPU"}, "python_version": "3.12"}, "version": "5.2.3",
           "datetime": "2026-01-01", "commit_info": {},
           "benchmarks": [{"name": "test_bn[add_relu-eager]", "stats": {"median": 0.0125, "iqr": 0.001, "rounds": 7}}]}
    path = tmp_path / "pb.json"
    path.write_text(json.dumps(doc))
    results.main([str(path)])
    out = capsys.readouterr().out
    assert "Test CPU" in out and "test_bn[add_relu-eager]" in out and "12.500" in out


def test_graphed_providers_give_their_own_ratio_and_columns():
    plain = _row()
    graphed = _row(providers={**plain["providers"], "eager+graph": _measurement(6.0),
                              "pyfast+graph": _measurement(4.0)})
    assert graphed["graphed_speedup_vs_eager"] == pytest.approx(1.5)
    assert plain["graphed_speedup_vs_eager"] is None
    assert "x eager graphed" not in results.model_table(_doc([plain]))
    table = results.model_table(_doc([graphed, plain])).splitlines()
    assert table[0].rstrip().endswith("eager+graph ms  pyfast+graph ms  x eager graphed"), table[0]
    assert table[2].split()[-3:] == ["6.00", "4.00", "1.50"]
    assert table[3].split()[-3:] == ["-", "-", "-"]
