"""The type stubs (``py_src/unibuf/*.pyi``) agree with the compiled module: every class,
function, signature and default, checked by mypy's stubtest."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("mypy")

HERE = pathlib.Path(__file__).resolve().parent


def test_stubs_match_the_module(tmp_path):
    allowlist = HERE.parent / "stubtest-allowlist.txt"
    r = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "unibuf._unibuf", "unibuf.ops", "unibuf.weights",
         "--allowlist", str(allowlist)],
        capture_output=True, text=True, cwd=tmp_path,  # mypy's cache goes to the temporary dir
    )
    assert r.returncode == 0, r.stdout + r.stderr
