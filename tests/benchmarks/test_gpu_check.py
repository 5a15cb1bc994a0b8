"""benchmarks/gpu_check.sh --dry-run: the one GPU call's every step on the CPU with tiny shapes, in the order and
within the budget and the files the device lease allows, leaving the repository's auto table alone.

The script runs under this interpreter (PYTHON=sys.executable): a `python` found on PATH may be another
environment's, without this one's torch, triton or pyfast."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pyfast.benchmarks import backend_table, results
from pyfast.ops import backends
from pyfast.ops.backends import auto

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
MAX_FILES = 8  # what the device returns from $OUT per call
MAX_CALL_S = 360  # one call, so that a rerun fits a session's 15 device-minutes with two machine starts
MAX_SELECTED_TESTS = 600  # a later call's GPU test run; the full GPU grid is ~2100 tests
STEPS = ["setup", "smoke", "kernels", "table", "bench", "pack"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    committed = Path(auto.TABLE_PATH).read_bytes()
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYFAST_CHECK_BUDGET")}
    env.update(OUT=str(out), PYTHON=sys.executable)
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert Path(auto.TABLE_PATH).read_bytes() == committed  # a dry run never installs its table
    return out, result.stdout


def test_the_plan_fits_one_call_with_correctness_first(dry_run):
    _, stdout = dry_run
    plan = re.search(r"planned (\d+) s on the GPU.*limits in s: (.*)$", stdout, flags=re.M)
    assert plan, stdout[:2000]
    steps = [s.split(":") for s in plan.group(2).split()]
    assert int(plan.group(1)) <= MAX_CALL_S and [name for name, _ in steps] == STEPS
    assert sum(int(limit) for _, limit in steps if limit != "rest") < int(plan.group(1))


def test_every_step_runs_and_at_most_8_stamped_files_come_back(dry_run):
    out, _ = dry_run
    summary = (out / "summary.txt").read_text()
    steps = re.findall(r"^  (\S+): (.*)$", summary, flags=re.M)
    assert [name for name, _ in steps] == STEPS and all(v.startswith("ok") for _, v in steps), summary
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= MAX_FILES and not any(f.endswith(".tmp") for f in files), files
    assert {"summary.txt", "smoke.json", "kernels.json", "auto_table.json", "bench.json",
            "triton-cache.tar.gz"} <= set(files)
    assert re.search(r"^device: .*\| torch .*\| triton .*\| \d{4}-\d\d-\d\d", summary, flags=re.M), summary


def test_the_smoke_passes_the_backends_the_tables_time(dry_run):
    out, _ = dry_run
    smoke = json.loads((out / "smoke.json").read_text())
    assert all(smoke["env"].get(key) for key in ("device", "torch", "date"))
    assert smoke["backends"]["cpu"]["ok"] and smoke["stuck_counters"] == []
    checks = [c["check"] for c in smoke["backends"]["cpu"]["checks"]]
    assert "real-size statistics" in checks and sum(c.startswith("path ") for c in checks) >= 5
    kernels = json.loads((out / "kernels.json").read_text())
    assert {b for row in kernels["rows"] for b in row["backends"]} == {"reference", "cpu"}
    assert all(row["env"]["date"] for row in kernels["rows"])
    table = json.loads((out / "auto_table.json").read_text())
    assert table["measured"]["device"] and table["choices"]["cpu"]
    for entry in table["choices"]["cpu"].values():
        assert entry["use"] in backends.BACKENDS and entry["use"] in entry["ms"]
    assert set(table["choices"]["cpu"]) == {backend_table.row_class(r) for r in kernels["rows"]}
    bench = json.loads((out / "bench.json").read_text())
    results.validate(bench)
    assert [r["mode"] for r in bench["rows"]] == ["inference", "train_step"]
    assert not any("compile" in r["providers"] and "median_ms" in r["providers"]["compile"] for r in bench["rows"])


def test_a_later_call_s_gpu_tests_are_trimmed():
    """The GPU test grids trimmed by benchmarks/gpu_selection.py, as the script's header runs them (collected)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p",
                             "pyfast.benchmarks.gpu_selection", "-p", "no:cacheprovider", "tests"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    collected = re.search(r"(\d+)/(\d+) tests collected", result.stdout)
    assert collected, result.stdout[-2000:] + result.stderr[-2000:]
    selected, total = map(int, collected.groups())
    assert 0 < selected <= MAX_SELECTED_TESTS < total
