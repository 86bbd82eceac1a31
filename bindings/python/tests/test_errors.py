"""Bad input raises the mapped exception with a message naming the values; nothing crashes
the interpreter."""

from __future__ import annotations

import numpy as np
import pytest

import unibuf
from unibuf import ops


def test_hierarchy_mirrors_the_rust_error():
    assert issubclass(unibuf.OutOfMemoryError, MemoryError)
    assert issubclass(unibuf.ShapeMismatchError, ValueError)
    assert issubclass(unibuf.DTypeMismatchError, TypeError)
    assert issubclass(unibuf.OutOfBoundsError, IndexError)
    assert issubclass(unibuf.IoError, OSError)
    for name in unibuf.errors.__all__:
        assert issubclass(getattr(unibuf, name), unibuf.UnibufError)


def test_wrong_dtype(dev, q):
    x = dev.alloc([2, 8], "float32")
    w = dev.alloc([8], "float16")
    with pytest.raises(unibuf.DTypeMismatchError) as e:
        ops.rms_norm(q, x, w)
    assert e.value.kind == "DTypeMismatch" and not e.value.is_retryable
    assert (e.value.expected, e.value.got) == ("float32", "float16")
    with pytest.raises(unibuf.DTypeMismatchError, match="expected dtype F32, got F64"):
        q.upload(x, np.zeros((2, 8), np.float64))
    with pytest.raises(unibuf.InvalidArgumentError, match="'float8' is not a dtype"):
        dev.alloc([3], "float8")
    with pytest.raises(unibuf.DTypeMismatchError):
        ops.sample_into(q, dev.alloc([4], "float32"), dev.alloc([1], "int32"))


def test_wrong_shape(dev, q):
    x = dev.alloc([3, 16], "float32")
    with pytest.raises(unibuf.ShapeMismatchError, match=r"expected \[16\], got \[15\]") as e:
        ops.rms_norm(q, x, dev.alloc([15], "float32"))
    assert (e.value.expected, e.value.got) == ("[16]", "[15]")
    with pytest.raises(unibuf.ShapeMismatchError):
        ops.matmul(q, dev.alloc([2, 3]), dev.alloc([4, 5]))
    with pytest.raises(unibuf.ShapeMismatchError, match="48 elements"):
        x.reshape(5, 10)
    with pytest.raises(unibuf.ShapeMismatchError, match="bytes"):
        q.upload(x, np.zeros(47, np.float32))
    out = np.zeros(3, np.float32)
    with pytest.raises(unibuf.ShapeMismatchError):
        q.download_into(x, out)
    with pytest.raises(unibuf.InvalidArgumentError, match="read-only"):
        q.download_into(dev.alloc([4], "uint8"), bytes(4))


def test_out_of_bounds_views(dev):
    b = dev.alloc([4, 4])
    with pytest.raises(unibuf.OutOfBoundsError) as e:
        b.rows(2, 9)
    assert e.value.len == 4
    with pytest.raises(IndexError):
        b[4]
    with pytest.raises(unibuf.OutOfBoundsError):
        b.slice(10, 40)
    with pytest.raises(unibuf.InvalidArgumentError, match="step"):
        b[::2]


def test_bad_scalars(dev, q):
    x = dev.alloc([1, 64], "float32")
    q.fill(x, 1.0)
    with pytest.raises(unibuf.InvalidArgumentError, match="temperature"):
        ops.sample(q, x, temperature=-1.0)
    with pytest.raises(unibuf.InvalidArgumentError, match="top_p"):
        ops.sample(q, x, temperature=1.0, top_p=0.0)
    with pytest.raises(unibuf.InvalidArgumentError, match="top_k"):
        ops.sample(q, x, top_k=5000)
    with pytest.raises(unibuf.InvalidArgumentError, match="rope style"):
        ops.rope(q, x.reshape(1, 1, 64), dev.alloc([1], "uint32"), 10000.0, "spiral")
    with pytest.raises(unibuf.InvalidArgumentError):
        ops.Q4Matrix.quantize(dev, np.zeros(64, np.float32), 1, 64, 48)
    with pytest.raises(unibuf.InvalidArgumentError, match="does not fit"):
        q.fill(dev.alloc([2], "uint8"), 300)
    with pytest.raises(unibuf.InvalidArgumentError, match="mode"):
        dev.alloc([2], mode="external")
    with pytest.raises(OverflowError):
        dev.alloc([-1])


def test_wrong_device(q):
    other = unibuf.Device("cpu")
    try:
        x = other.alloc([2, 8])
        w = other.alloc([8])
        with pytest.raises(unibuf.WrongDeviceError) as e:
            ops.rms_norm(q, x, w)
        assert e.value.expected != e.value.got
    finally:
        other.close()


def test_out_of_memory_is_retryable():
    dev = unibuf.Device("cpu", memory_limit=16 << 20)
    try:
        keep = dev.alloc([2_500_000], "float32")
        with pytest.raises(unibuf.BudgetExceededError) as e:
            dev.alloc([2_500_000], "float32")
        assert e.value.is_retryable and isinstance(e.value, MemoryError)
        assert e.value.budget == 16 << 20 and e.value.which == "memory"
        del keep
        dev.alloc([2_500_000], "float32")  # retrying after freeing succeeds
        with pytest.raises(unibuf.NeverFitsError) as never:
            dev.alloc([20_000_000], "float32")
        assert not never.value.is_retryable
    finally:
        dev.close()


def test_unknown_backend():
    with pytest.raises(unibuf.BackendUnavailableError, match="quantum"):
        unibuf.Device("quantum")


def test_closed_device_everywhere(rng):
    dev = unibuf.Device("cpu")
    q = dev.queue()
    x = dev.from_host(rng.standard_normal((2, 32)).astype(np.float32))
    w = dev.from_host(np.ones(32, np.float32))
    m = ops.Q4Matrix.quantize(dev, rng.standard_normal(32 * 4).astype(np.float32), 4, 32, 32)
    dev.close()
    calls = [
        lambda: ops.rms_norm(q, x, w),
        lambda: ops.q4_matvec(q, m, x),
        lambda: q.upload(x, np.zeros((2, 32), np.float32)),
        lambda: q.fill(x, 0.0),
        lambda: q.drain(),
        lambda: dev.from_dlpack(np.zeros(3, np.float32)),
        lambda: x.__dlpack__(),
        lambda: unibuf.weights.load(dev, "missing.safetensors"),
    ]
    for call in calls:
        with pytest.raises(unibuf.DeviceClosedError) as e:
            call()
        assert e.value.kind == "DeviceClosed"


def test_weights_file_errors(tmp_path):
    with pytest.raises(unibuf.IoError) as e:
        unibuf.weights.WeightsFile(tmp_path / "absent.safetensors")
    assert isinstance(e.value, OSError) and "absent.safetensors" in str(e.value)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((100).to_bytes(8, "little") + b"{not json")
    with pytest.raises(unibuf.FormatError, match="bad.safetensors"):
        unibuf.weights.WeightsFile(bad)
