"""PyTorch interop: zero-copy both ways, stream ordering without a device sync, lifetimes.
Runs on the CPU with CPU tensors, and on CUDA (``UNIBUF_BACKEND=cuda``) with CUDA tensors;
skipped where PyTorch is not installed."""

from __future__ import annotations

import gc

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import unibuf  # noqa: E402
import unibuf.torch as ut  # noqa: E402
from conftest import BACKEND  # noqa: E402

CUDA = BACKEND == "cuda"
if CUDA and not torch.cuda.is_available():
    pytest.skip("UNIBUF_BACKEND=cuda but PyTorch sees no GPU", allow_module_level=True)
TDEV = "cuda" if CUDA else "cpu"


@pytest.fixture
def udev():
    return ut.device_for(TDEV)


def test_wrap_shares_memory(udev):
    t = torch.randn(7, 33, device=TDEV)
    b = ut.wrap(t)
    assert b.mode == "foreign" and b.shape == (7, 33) and b.dtype == "float32"
    q = udev.queue()
    q.fill(b.rows(2, 3), 4.0)
    q.drain()
    assert torch.all(t[2] == 4.0)
    back = ut.as_tensor(b)
    assert back.data_ptr() == t.data_ptr()


def test_export_like_needs_an_exchange_api(udev):
    b = udev.alloc([3], "float32", mode="private" if CUDA else "auto")
    udev.queue().fill(b, 2.0)
    if hasattr(torch.Tensor, "__dlpack_c_exchange_api__"):
        t = b.export_like(torch.empty(0), stream=0 if CUDA else None)
        assert torch.all(t == 2.0) and t.data_ptr() == b.native()
    with pytest.raises(unibuf.UnsupportedError, match="exchange API"):
        b.export_like(object())


def test_as_tensor_shares_memory(udev):
    q = udev.queue()
    b = udev.alloc([5, 9], "float16", mode="private" if CUDA else "auto")
    q.fill(b, 1.5)
    t = ut.as_tensor(b)
    assert t.dtype == torch.float16 and tuple(t.shape) == (5, 9) and t.device.type == TDEV
    assert torch.all(t == 1.5)
    t.mul_(2)  # PyTorch writes; unibuf reads the same memory
    if CUDA:
        torch.cuda.current_stream().synchronize()
    np.testing.assert_array_equal(b.numpy(), np.full((5, 9), 3.0, np.float16))


def test_ops_on_torch_tensors_match_torch(udev):
    q = udev.queue("torch-ops")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(9, 576, device=TDEV, dtype=dtype)
        w = torch.randn(576, device=TDEV, dtype=dtype)
        y = ut.as_tensor(unibuf.ops.rms_norm(q, ut.wrap(x), ut.wrap(w), 1e-5))
        xf = x.double()
        want = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
        tol = {torch.float32: 1e-5, torch.float16: 1.2e-3, torch.bfloat16: 8e-3}[dtype]
        err = ((y.double() - want).abs() / want.abs().clamp_min(1e-3 * want.abs().max())).max().item()
        assert err < tol, (dtype, err)


@pytest.mark.skipif(not CUDA, reason="stream ordering needs CUDA")
def test_streams_ordered_both_ways_without_sync(udev):
    q = udev.queue("streams")
    n = 1 << 24  # 64 MB: a race would show
    side = torch.cuda.Stream()
    for _ in range(3):
        with torch.cuda.stream(side):
            torch.cuda._sleep(20_000_000)  # keep the stream busy, then write
            src = torch.full((n,), 3.0, device="cuda")
            b = ut.wrap(src)  # unibuf's queue waits for `side`, device-side
            out = unibuf.ops.softmax(q, b.reshape(1 << 12, 1 << 12))
            # ... and `side` waits for unibuf's softmax when PyTorch takes the output.
            t = ut.as_tensor(out)
            total = t.sum()
        side.synchronize()
        assert abs(total.item() - (1 << 12)) < 1e-2 * (1 << 12)


@pytest.mark.skipif(not CUDA, reason="the caching allocator is CUDA's")
def test_wrapped_tensor_lives_while_unibuf_uses_it(udev):
    q = udev.queue("lifetime")
    t = torch.full((1 << 22,), 2.0, device="cuda")
    b = ut.wrap(t)
    out = udev.alloc([1 << 22], "float32", mode="private")
    torch.cuda._sleep(50_000_000)  # unibuf's copy queues behind this
    q.copy_async(b, out)
    del t
    gc.collect()
    # Without the DLPack reference PyTorch would hand the same block out again here.
    junk = [torch.full((1 << 22,), -1.0, device="cuda") for _ in range(4)]
    q.drain()
    assert np.all(out.numpy() == 2.0)
    del junk, b


@pytest.mark.skipif(not CUDA, reason="stream ordering needs CUDA")
def test_exported_memory_is_reused_only_after_the_consumers_stream(udev):
    q = udev.queue("reuse")
    n = 1 << 22
    side = torch.cuda.Stream()
    for _ in range(3):
        b = udev.alloc([n], "float32", mode="private", label="exported")
        q.fill(b, 1.0)
        with torch.cuda.stream(side):
            t = ut.as_tensor(b)  # `side` waits for the fill
            torch.cuda._sleep(50_000_000)
            total = t.sum()  # queued behind the sleep, reading the memory
            del t  # the deleter runs now, while the sum is still queued
        del b
        gc.collect()
        # The freed block is reused at once: this fill must wait for `side`'s sum.
        c = udev.alloc([n], "float32", mode="private", label="reused")
        q.fill(c, -1.0)
        side.synchronize()
        assert total.item() == n
        del c


def test_copy_audit_counts_no_bytes_across_the_boundary(udev):
    udev.clear_copy_ledger()
    q = udev.queue()
    x = torch.randn(4, 64, device=TDEV)
    w = torch.ones(64, device=TDEV)
    y = ut.as_tensor(unibuf.ops.rms_norm(q, ut.wrap(x), ut.wrap(w)))
    del y
    dirs = udev.copy_report().directions
    assert dirs["shared"]["count"] == 3 and dirs["shared"]["bytes"] == 0
    assert all(v["bytes"] == 0 for k, v in dirs.items() if k != "shared")


def test_wrong_device_and_layout(udev):
    if CUDA:
        with pytest.raises(unibuf.InvalidArgumentError):
            ut.wrap(torch.zeros(4), udev)  # pageable host memory on a CUDA device
    else:
        with pytest.raises(unibuf.UnsupportedError):
            ut.wrap(torch.zeros(4, dtype=torch.complex64))
    with pytest.raises(unibuf.InvalidArgumentError, match="strides"):
        ut.wrap(torch.zeros(4, 6, device=TDEV).t())
