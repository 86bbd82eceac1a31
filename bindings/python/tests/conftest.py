"""Shared fixtures: the device under test (``UNIBUF_BACKEND``, default cpu), fresh random
inputs with the seed printed (pytest shows it on failure), and float helpers that move
float32/float16/bfloat16 data between NumPy (float64 references) and unibuf buffers."""

from __future__ import annotations

import os

import numpy as np
import pytest

import unibuf

BACKEND = os.environ.get("UNIBUF_BACKEND", "cpu")

# Relative tolerance of one rounding to each storage dtype, with room for f32 accumulation.
TOL = {"float32": 1e-5, "float16": 1.2e-3, "bfloat16": 8e-3}
FLOATS = ["float32", "float16", "bfloat16"]


@pytest.fixture
def dev():
    d = unibuf.Device(BACKEND)
    yield d
    d.close()


@pytest.fixture
def q(dev):
    return dev.queue("pytest")


@pytest.fixture
def rng():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed {seed}")
    return np.random.default_rng(seed)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def rounded(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` rounded to ``dtype`` and back, as float64 (what the device stores)."""
    if dtype == "bfloat16":
        bits = bf16_bits(x).astype(np.uint32) << 16
        return bits.view(np.float32).astype(np.float64)
    return np.asarray(x, dtype=dtype).astype(np.float64)


def upload(dev, x: np.ndarray, dtype: str, label: str = "test", mode: str = "auto"):
    """A buffer of ``dtype`` holding ``x`` rounded to it."""
    x = np.ascontiguousarray(x)
    if dtype == "bfloat16":
        return dev.from_host(bf16_bits(x).tobytes(), dtype="bfloat16", shape=list(x.shape), label=label, mode=mode)
    return dev.from_host(x.astype(dtype), label=label, mode=mode)


def download(q, buf) -> np.ndarray:
    """The buffer's contents as float64 (any float dtype) or its integer dtype."""
    raw = q.download(buf)
    shape = tuple(buf.shape)
    if buf.dtype == "bfloat16":
        bits = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).astype(np.float64).reshape(shape)
    a = np.frombuffer(raw, dtype=buf.dtype).reshape(shape)
    return a.astype(np.float64) if a.dtype.kind == "f" else a.copy()


def poisoned(dev, q, shape, dtype: str, label: str = "out"):
    """An output buffer filled with NaN (or all-ones bits for integers), so that an op that
    writes nothing, or only part, fails the comparison."""
    b = dev.alloc(list(shape), dtype, label=label)
    if dtype in FLOATS:
        q.fill(b, float("nan"))
    else:
        q.fill(b, int(np.iinfo(dtype).max))
    return b


def assert_close(got: np.ndarray, want: np.ndarray, dtype: str, scale: float | None = None):
    """Every element within the dtype's tolerance of the reference, relative to ``scale``
    (default: each element's magnitude, floored at 1e-3 of the largest)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.all(np.isfinite(got)), "non-finite output (unwritten poison?)"
    tol = TOL[dtype]
    if scale is None:
        ref = np.maximum(np.abs(want), 1e-3 * np.max(np.abs(want)))
    else:
        ref = scale
    err = np.abs(got - want) / ref
    worst = np.unravel_index(np.argmax(err), err.shape)
    assert err.max() <= tol, f"max rel error {err.max():.3g} > {tol} at {worst}: {got[worst]} vs {want[worst]}"
