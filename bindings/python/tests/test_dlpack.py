"""DLPack with NumPy: zero-copy both ways, read-only flags, lifetimes, and refusals.

NumPy arrays live in host memory, which the CPU backend addresses (a CUDA device takes only
pinned host memory), so these run on a CPU device whatever ``UNIBUF_BACKEND`` says; the GPU
side of DLPack is test_torch's."""

from __future__ import annotations

import gc

import numpy as np
import pytest

import unibuf


@pytest.fixture
def dev():
    d = unibuf.Device("cpu")
    yield d
    d.close()


@pytest.fixture
def q(dev):
    return dev.queue("pytest")


def test_numpy_views_unibuf_memory(dev, q, rng):
    x = rng.standard_normal((3, 5)).astype(np.float32)
    b = dev.from_host(x, mode="shared")
    assert b.__dlpack_device__() == (1, 0)
    a = np.from_dlpack(b)
    np.testing.assert_array_equal(a, x)
    # Zero-copy: a device-side fill is visible through the NumPy view.
    q.fill(b.rows(1, 2), 9.0)
    assert np.all(a[1] == 9.0) and np.all(a[0] == x[0])
    # The array keeps the memory alive after the buffer object is gone.
    del b
    gc.collect()
    assert np.all(a[1] == 9.0)
    assert dev.copy_report().directions["shared"]["count"] >= 1


def test_unibuf_views_numpy_memory(dev, q, rng):
    x = rng.standard_normal((4, 6)).astype(np.float16)
    b = dev.from_dlpack(x, label="np")
    assert b.mode == "foreign" and b.dtype == "float16" and b.shape == (4, 6)
    assert dev.memory_stats()["foreign_bytes"] >= x.nbytes
    # Writes by unibuf land in NumPy's array.
    q.fill(b.rows(0, 1), 0.5)
    assert np.all(x[0] == 0.5)
    # unibuf reads what NumPy wrote.
    x[3] = 7
    np.testing.assert_array_equal(b.numpy()[3], np.full(6, 7, np.float16))
    report = dev.copy_report()
    assert report.directions["shared"]["bytes"] == 0


def test_import_keeps_the_array_alive(dev, q, rng):
    x = rng.standard_normal(1000).astype(np.float32)
    want = x.copy()
    b = dev.from_dlpack(x)
    del x
    gc.collect()
    np.testing.assert_array_equal(b.numpy(), want)


def test_module_level_from_dlpack(rng):
    x = np.arange(10, dtype=np.int32)
    dev = unibuf.Device("cpu")
    b = unibuf.from_dlpack(x, dev)
    np.testing.assert_array_equal(b.numpy(), x)
    dev.close()


def test_read_only_both_ways(dev, q):
    x = np.arange(6, dtype=np.float32)
    x.setflags(write=False)
    b = dev.from_dlpack(x)
    assert not b.is_writable
    with pytest.raises(unibuf.ReadOnlyError):
        q.fill(b, 1.0)
    ro = dev.from_dlpack(np.ones(4, np.float32), read_only=True)
    with pytest.raises(unibuf.ReadOnlyError):
        q.fill(ro, 2.0)
    a = np.from_dlpack(ro)
    assert not a.flags.writeable


def test_strided_imports_copy_only_when_allowed(dev):
    x = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2]
    with pytest.raises(unibuf.InvalidArgumentError, match="strides"):
        dev.from_dlpack(x, copy=False)
    b = dev.from_dlpack(x)  # copy=None: copies what cannot be shared, as the Array API says
    np.testing.assert_array_equal(b.numpy(), x)
    assert b.mode != "foreign"
    c = dev.from_dlpack(np.arange(5, dtype=np.float32), copy=True)
    assert c.mode != "foreign"


def test_bad_dlpack_inputs(dev):
    with pytest.raises(unibuf.UnsupportedError, match="bool"):
        dev.from_dlpack(np.zeros(3, dtype=bool))
    with pytest.raises(unibuf.UnsupportedError, match="complex"):
        dev.from_dlpack(np.zeros(3, dtype=np.complex64))
    with pytest.raises(TypeError):
        dev.from_dlpack(object())
    b = dev.alloc([3], mode="shared")
    with pytest.raises(BufferError, match="zero-copy"):
        b.__dlpack__(copy=True)
    with pytest.raises(BufferError, match="cross-device"):
        b.__dlpack__(max_version=(1, 0), dl_device=(2, 0))
    with pytest.raises(unibuf.InvalidArgumentError, match="stream"):
        b.__dlpack__(stream=5)
