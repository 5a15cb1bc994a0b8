"""pyfast._flags: one rule for every environment switch, and every layer reading the same value."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyfast import _flags

ROOT = Path(__file__).resolve().parents[1]
ON, OFF = ["1", "true", "Yes", "ON"], ["0", "false", "No", "OFF"]


@pytest.mark.parametrize("word", ON + OFF)
def test_flag_words(monkeypatch, word):
    monkeypatch.setenv("PYFAST_TEST_SWITCH", word)
    assert _flags.flag("PYFAST_TEST_SWITCH") is (word in ON)
    assert _flags.flag("PYFAST_TEST_SWITCH", default=True) is (word in ON)


@pytest.mark.parametrize("value", [None, "", "  "])
def test_unset_or_empty_is_the_default(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("PYFAST_TEST_SWITCH", raising=False)
    else:
        monkeypatch.setenv("PYFAST_TEST_SWITCH", value)
    assert _flags.flag("PYFAST_TEST_SWITCH") is False
    assert _flags.flag("PYFAST_TEST_SWITCH", default=True) is True


@pytest.mark.parametrize("value", ["2", "y", "enabled"])
def test_other_values_raise_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("PYFAST_TEST_SWITCH", value)
    with pytest.raises(ValueError, match=f"PYFAST_TEST_SWITCH='{value}'"):
        _flags.flag("PYFAST_TEST_SWITCH")


def test_setup_py_keeps_the_same_rule(monkeypatch):
    """setup.py cannot import pyfast, so it has its own copy of the rule: run it on every word."""
    text = (ROOT / "setup.py").read_text()
    source = next(ast.get_source_segment(text, node)
                  for node in ast.parse(text).body if isinstance(node, ast.FunctionDef) and node.name == "_flag")
    namespace = {"os": os}
    exec(source, namespace)  # noqa: S102 - the repository's own setup.py function
    for word in ON + OFF + [""]:
        monkeypatch.setenv("PYFAST_TEST_SWITCH", word)
        assert namespace["_flag"]("PYFAST_TEST_SWITCH") is _flags.flag("PYFAST_TEST_SWITCH"), word
    monkeypatch.setenv("PYFAST_TEST_SWITCH", "maybe")
    with pytest.raises(SystemExit, match="PYFAST_TEST_SWITCH"):
        namespace["_flag"]("PYFAST_TEST_SWITCH")


def test_leaf_modules_import_nothing_of_pyfast():
    """The Triton kernels sit below pyfast.ops and import these two: they must stay leaves."""
    for name in ("_flags.py", "_shapes.py"):
        tree = ast.parse((ROOT / "pyfast" / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0 and not (node.module or "").startswith("pyfast"), (name, node.module)
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("pyfast") for a in node.names), name


READERS = """
import json, triton, torch
from pyfast import _extension, _flags, ops
from pyfast.kernels import _bn_common, conv
x = torch.randn(2, 3, 4, 4)
why_not = ops.BACKENDS["triton"].why_not("add_relu", x.device, x.dtype)
print(json.dumps({"flags": _flags.TRITON_INTERPRET, "triton": bool(triton.knobs.runtime.interpret),
                  "conv": conv._INTERPRET, "batch_norm": _bn_common._INTERPRET, "backend_takes_cpu": not why_not,
                  "extension": _extension.available(), "autotune": [conv._AUTOTUNE, _bn_common._AUTOTUNE],
                  "default_backend": ops.get_backend()}))
"""


def read_in_fresh_process(**env):
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("PYFAST_", "TRITON_INTERPRET"))}
    environment.update(env)
    result = subprocess.run([sys.executable, "-c", READERS], env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("word", ["true", "off"])
def test_every_reader_agrees(word):
    """The kernels, the triton backend and Triton itself see one TRITON_INTERPRET, whatever its spelling;
    likewise PYFAST_NO_EXTENSION, PYFAST_TRITON_AUTOTUNE and PYFAST_BACKEND."""
    seen = read_in_fresh_process(TRITON_INTERPRET=word, PYFAST_NO_EXTENSION=word, PYFAST_TRITON_AUTOTUNE=word,
                                 PYFAST_BACKEND="reference")
    interpret = word == "true"
    assert {seen[k] for k in ("flags", "triton", "conv", "batch_norm", "backend_takes_cpu")} == {interpret}
    if interpret:
        assert seen["extension"] is False
    assert seen["autotune"] == [interpret, interpret]
    assert seen["default_backend"] == "reference"


def test_a_bad_value_stops_the_import():
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", "import pyfast.kernels.conv"], capture_output=True, text=True,
                            env={**environment, "TRITON_INTERPRET": "sometimes"})
    assert result.returncode != 0 and "TRITON_INTERPRET='sometimes'" in result.stderr
