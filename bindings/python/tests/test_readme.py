"""The README's NumPy example runs as written (the PyTorch one runs in test_torch's cases)."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[3] / "README.md"


@pytest.mark.skipif(not README.exists(), reason="the README is not beside this checkout")
def test_readme_numpy_example(monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    numpy_blocks = [b for b in blocks if "import numpy" in b and "torch" not in b]
    assert numpy_blocks, "the README has a NumPy example"
    monkeypatch.setenv("UNIBUF_BACKEND", "cpu")
    exec(compile(numpy_blocks[0], str(README), "exec"), {})
