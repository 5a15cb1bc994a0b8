"""benchmarks/gpu_check.sh --dry-run: both GPU calls run every step on the CPU with tiny shapes, within the
files and the budget the device lease allows, and leave the repository's auto table alone."""
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from pyfast.benchmarks import backend_table, results
from pyfast.ops import backends
from pyfast.ops.backends import auto

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
MAX_FILES = 8  # what the device returns from $OUT per call
MAX_SELECTED_TESTS = 600  # call 2's minutes; the full GPU grid is ~2100 tests

pytestmark = pytest.mark.slow


def _dry_run(call, out):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYFAST_CHECK_BUDGET")}
    env.update(OUT=str(out), PYTHON=os.environ.get("PYTHON", "python"))
    result = subprocess.run(["bash", str(SCRIPT), str(call), "--dry-run"], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    steps = re.findall(r"^  (\S+): (.*)$", summary, flags=re.M)
    assert steps and all(verdict.startswith("ok") for _, verdict in steps), summary
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= MAX_FILES and not any(f.endswith(".tmp") for f in files), files
    return result.stdout, dict(steps), files


def test_call_1_runs_every_step_and_writes_a_table(tmp_path):
    committed = Path(auto.TABLE_PATH).read_bytes()
    stdout, steps, files = _dry_run(1, tmp_path)
    assert list(steps) == ["build", "info", "kernels", "table", "bench"]
    assert "planned budget on the GPU 400 s" in stdout
    assert {"kernels.json", "auto_table.json", "bench.json", "summary.txt"} <= set(files)
    table = json.loads((tmp_path / "auto_table.json").read_text())
    assert table["measured"]["device"] and table["choices"]["cpu"]
    for entry in table["choices"]["cpu"].values():
        assert entry["use"] in backends.BACKENDS and entry["use"] in entry["ms"]
    kernels = json.loads((tmp_path / "kernels.json").read_text())
    assert set(table["choices"]["cpu"]) == {backend_table.row_class(r) for r in kernels["rows"]}
    bench = json.loads((tmp_path / "bench.json").read_text())
    results.validate(bench)
    assert [r["mode"] for r in bench["rows"]] == ["inference", "train_step"]
    assert Path(auto.TABLE_PATH).read_bytes() == committed  # a dry run never installs its table


def test_call_2_selects_a_trimmed_gpu_test_run(tmp_path):
    stdout, steps, _ = _dry_run(2, tmp_path)
    assert list(steps) == ["build", "info", "tests"]
    assert "planned budget on the GPU 280 s" in stdout
    collected = re.search(r"(\d+)/(\d+) tests collected", (tmp_path / "tests.log").read_text())
    selected, total = map(int, collected.groups())
    assert 0 < selected <= MAX_SELECTED_TESTS < total
