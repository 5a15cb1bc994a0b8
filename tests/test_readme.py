"""The README's usage example runs as written."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_usage_example_runs(capsys):
    code = re.search(r"## Use\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert namespace["y"].shape == (8, 64, 28, 28)
    assert namespace["report"].fusions  # fuse found the ResNet's patterns
    assert "pyfast.fuse:" in capsys.readouterr().out
