"""Buffers: allocation, views, transfers, fills and copies, checked against NumPy."""

from __future__ import annotations

import numpy as np
import pytest

import unibuf
from conftest import FLOATS, download, poisoned, rounded, upload


@pytest.mark.parametrize("dtype", ["float32", "float16", "int32", "uint8", "int64", "uint16"])
def test_upload_download_round_trip(dev, q, rng, dtype):
    shape = (7, 13)  # odd sizes
    if np.dtype(dtype).kind == "f":
        x = rng.standard_normal(shape).astype(dtype)
    else:
        info = np.iinfo(dtype)
        x = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    b = dev.alloc(list(shape), dtype, label="rt")
    q.fill(b, 0)
    q.upload(b, x)
    assert b.dtype == dtype and b.shape == shape and b.size == x.size and b.nbytes == x.nbytes
    back = np.frombuffer(q.download(b), dtype=dtype).reshape(shape)
    np.testing.assert_array_equal(back, x)
    out = np.full(shape, 3, dtype=dtype)
    q.download_into(b, out)
    np.testing.assert_array_equal(out, x)
    np.testing.assert_array_equal(b.numpy(), x)


def test_bfloat16_bytes_round_trip(dev, q, rng):
    x = rng.standard_normal((5, 9)).astype(np.float32)
    b = upload(dev, x, "bfloat16")
    assert b.dtype == "bfloat16"
    np.testing.assert_array_equal(download(q, b), rounded(x, "bfloat16"))


def test_views_share_memory(dev, q, rng):
    x = rng.standard_normal((6, 5)).astype(np.float32)
    b = dev.from_host(x, label="x")
    rows = b.rows(1, 4)
    assert rows.shape == (3, 5) and rows.byte_offset == 5 * 4 and rows.shares_memory_with(b)
    np.testing.assert_array_equal(rows.numpy(), x[1:4])
    np.testing.assert_array_equal(b[2:5].numpy(), x[2:5])
    np.testing.assert_array_equal(b[-1].numpy(), x[-1])
    np.testing.assert_array_equal(b.slice(3, 11).numpy(), x.reshape(-1)[3:11])
    np.testing.assert_array_equal(b.reshape(5, 6).numpy(), x.reshape(5, 6))
    np.testing.assert_array_equal(b.reshape((3, 10)).numpy(), x.reshape(3, 10))
    np.testing.assert_array_equal(b.cast("uint8").numpy(), x.view(np.uint8))
    assert len(b) == 6
    np.testing.assert_array_equal(np.stack([r.numpy() for r in b]), x)
    scalar = b.slice(0, 1).reshape()
    assert scalar.shape == () and scalar.numpy() == x[0, 0]
    with pytest.raises(TypeError, match="0-d"):
        len(scalar)
    # A write through a view lands in the parent.
    q.fill(b.rows(0, 1), 2.5)
    want = x.copy()
    want[0] = 2.5
    np.testing.assert_array_equal(b.numpy(), want)


@pytest.mark.parametrize("dtype", FLOATS + ["int8", "uint32"])
def test_fill_every_element(dev, q, dtype):
    b = dev.alloc([3, 7], dtype)
    q.fill(b, 0)
    v = -1.75 if dtype in FLOATS else 5
    f = q.fill_async(b.rows(1, 3), v)
    q.wait(f)
    got = download(q, b)
    want = np.zeros((3, 7))
    want[1:] = v
    np.testing.assert_array_equal(got, want)


def test_copy_between_views(dev, q, rng):
    x = rng.standard_normal((4, 3)).astype(np.float32)
    src = dev.from_host(x)
    dst = poisoned(dev, q, (4, 3), "float32")
    q.copy(src.rows(0, 2), dst.rows(2, 4))
    f = q.copy_async(src.rows(2, 4), dst.rows(0, 2))
    assert dev.wait(f) is None and dev.is_complete(f)
    np.testing.assert_array_equal(dst.numpy(), np.concatenate([x[2:], x[:2]]))


def test_from_host_bytes_and_shapes(dev, q):
    raw = bytes(range(24))
    b = dev.from_host(raw)
    assert b.dtype == "uint8" and b.shape == (24,)
    w = dev.from_host(raw, dtype="int32", shape=[2, 3])
    np.testing.assert_array_equal(w.numpy(), np.frombuffer(raw, dtype=np.int32).reshape(2, 3))


def test_device_info_stats_report_trace(dev, q, rng):
    info = dev.info()
    assert info["backend"] == dev.backend and info["total_memory"] > 0
    before = dev.memory_stats()["active_bytes"]
    b = dev.alloc([1000], "float32", label="stats")
    s = dev.memory_stats()
    assert s["active_bytes"] >= before + 4000
    assert any(label == "stats" and n >= 4000 and count == 1 for label, n, count in dev.memory_by_label())
    q.upload(b, rng.standard_normal(1000).astype(np.float32))
    r = dev.copy_report()
    assert r.directions["host->device"]["bytes"] >= 4000
    assert "host->device" in str(r)
    # The audit names this file's line, not the bindings'.
    sites = [e["site"] for e in r.sites if e["direction"] == "host->device"]
    assert sites and all(s.startswith(__file__) for s in sites), sites
    dev.set_budget(memory_limit=1 << 30)
    assert dev.budget()["memory_limit"] == 1 << 30
    unibuf.ops.softmax(q, b.reshape(10, 100))
    q.drain()
    stats = dev.submission_stats()
    assert any(e["label"] == "pytest" and e["count"] >= 1 for e in stats["labels"])
    assert dev.chrome_trace().lstrip().startswith(("[", "{"))
    assert isinstance(dev.trim(), int)
    assert dev.fault() is None


def test_fences_order_queues(dev, rng):
    q1, q2 = dev.new_queue("a"), dev.new_queue("b")
    x = rng.standard_normal(4096).astype(np.float32)
    src = dev.from_host(x)
    mid = dev.alloc([4096], "float32")
    dst = dev.alloc([4096], "float32")
    q1.copy_async(src, mid)
    f = q2.copy_async(mid, dst)  # ordered after q1's write by the buffer's fence
    q2.wait(f)
    np.testing.assert_array_equal(dst.numpy(), x)
    assert f.device == dev.id and f.queue == q2.id and f.epoch > 0
    assert q2.last_fence() == f


def test_close_refuses_and_frees(rng):
    dev = unibuf.Device("cpu")
    q = dev.queue()
    b = dev.from_host(rng.standard_normal(8).astype(np.float32))
    with dev:
        pass
    assert dev.closed
    for call in (lambda: q.download(b), lambda: dev.alloc([1]), lambda: b.rows(0, 1),
                 lambda: unibuf.ops.softmax(q, b), lambda: dev.queue(), lambda: b.numpy()):
        with pytest.raises(unibuf.DeviceClosedError, match="closed"):
            call()
    dev.close()  # twice: a no-op
    del b
