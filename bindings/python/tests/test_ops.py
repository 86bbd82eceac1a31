"""Every op against a float64 NumPy reference, on fresh random inputs, odd sizes, outputs
poisoned before each run."""

from __future__ import annotations

import numpy as np
import pytest

import unibuf
from unibuf import ops
from conftest import FLOATS, TOL, assert_close, download, poisoned, rounded, upload


def rms_ref(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(1, 576), (5, 77), (3, 1000)])
def test_rms_norm(dev, q, rng, dtype, shape):
    x = rng.standard_normal(shape) * 3
    w = rng.standard_normal(shape[-1])
    xb, wb = upload(dev, x, dtype), upload(dev, w, dtype)
    want = rms_ref(rounded(x, dtype), rounded(w, dtype), 1e-5)
    assert_close(download(q, ops.rms_norm(q, xb, wb, 1e-5)), want, dtype)
    out = poisoned(dev, q, shape, dtype)
    f = ops.rms_norm_into(q, xb, wb, out, 1e-5)
    q.wait(f)
    assert_close(download(q, out), want, dtype)


@pytest.mark.parametrize("dtype", FLOATS)
def test_rms_norm_residual(dev, q, rng, dtype):
    shape = (3, 129)
    x, r, w = rng.standard_normal(shape), rng.standard_normal(shape), rng.standard_normal(shape[-1])
    xb, rb, wb = upload(dev, x, dtype), upload(dev, r, dtype), upload(dev, w, dtype)
    s = rounded(rounded(x, dtype) + rounded(r, dtype), dtype)
    want = rms_ref(s, rounded(w, dtype), 1e-6)
    normed, total = ops.rms_norm_residual(q, xb, rb, wb)
    assert_close(download(q, total), s, dtype)
    assert_close(download(q, normed), want, dtype)
    n_out, s_out = poisoned(dev, q, shape, dtype), poisoned(dev, q, shape, dtype)
    q.wait(ops.rms_norm_residual_into(q, xb, rb, wb, n_out, s_out, 1e-6))
    assert_close(download(q, n_out), want, dtype)
    assert_close(download(q, s_out), s, dtype)


@pytest.mark.parametrize("dtype", FLOATS)
def test_softmax(dev, q, rng, dtype):
    x = rng.standard_normal((4, 333)) * 4
    xb = upload(dev, x, dtype)
    xr = rounded(x, dtype)
    e = np.exp(xr - xr.max(axis=-1, keepdims=True))
    want = e / e.sum(axis=-1, keepdims=True)
    assert_close(download(q, ops.softmax(q, xb)), want, dtype)
    out = poisoned(dev, q, x.shape, dtype)
    q.wait(ops.softmax_into(q, xb, out))
    assert_close(download(q, out), want, dtype)


@pytest.mark.parametrize("dtype", FLOATS)
def test_swiglu(dev, q, rng, dtype):
    g, u = rng.standard_normal((3, 1537)) * 3, rng.standard_normal((3, 1537))
    gb, ub = upload(dev, g, dtype), upload(dev, u, dtype)
    gr, ur = rounded(g, dtype), rounded(u, dtype)
    want = gr / (1 + np.exp(-gr)) * ur
    assert_close(download(q, ops.swiglu(q, gb, ub)), want, dtype)
    out = poisoned(dev, q, g.shape, dtype)
    q.wait(ops.swiglu_into(q, gb, ub, out))
    assert_close(download(q, out), want, dtype)


def rope_ref(x, pos, base, style):
    t, h, d = x.shape
    out = x.copy()
    i = np.arange(d // 2)
    inv = base ** (-2.0 * i / d)
    ang = pos[:, None].astype(np.float64) * inv[None, :]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    if style == "neox":
        a, b = x[..., : d // 2], x[..., d // 2 :]
        out[..., : d // 2] = a * c - b * s
        out[..., d // 2 :] = a * s + b * c
    else:
        a, b = x[..., 0::2], x[..., 1::2]
        out[..., 0::2] = a * c - b * s
        out[..., 1::2] = a * s + b * c
    return out


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("style", ["neox", "interleaved"])
def test_rope(dev, q, rng, dtype, style):
    x = rng.standard_normal((5, 3, 64))
    pos = rng.integers(0, 2000, size=5).astype(np.uint32)
    xb, pb = upload(dev, x, dtype), dev.from_host(pos)
    want = rope_ref(rounded(x, dtype), pos, 100000.0, style)
    # The angle is computed in f32 (as the references do): about 1e-4 rad at position 2000.
    scale = np.max(np.abs(want))
    got = download(q, ops.rope(q, xb, pb, 100000.0, style))
    assert_close(got, want, dtype, scale=scale * (1 + 10 * (dtype == "float32")))
    out = poisoned(dev, q, x.shape, dtype)
    q.wait(ops.rope_into(q, xb, pb, out, 100000.0, style))
    assert_close(download(q, out), want, dtype, scale=scale * (1 + 10 * (dtype == "float32")))


@pytest.mark.parametrize("dtype", FLOATS)
def test_matmul(dev, q, rng, dtype):
    m, k, n = 7, 65, 33
    a, b = rng.standard_normal((m, k)), rng.standard_normal((k, n))
    ab, bb = upload(dev, a, dtype), upload(dev, b, dtype)
    ar, br = rounded(a, dtype), rounded(b, dtype)
    scale = np.abs(ar) @ np.abs(br)  # error bound of an f32 sum, rounded once
    assert_close(download(q, ops.matmul(q, ab, bb)), ar @ br, dtype, scale=scale)
    out = poisoned(dev, q, (m, n), dtype)
    q.wait(ops.matmul_into(q, ab, bb, out))
    assert_close(download(q, out), ar @ br, dtype, scale=scale)
    bt = upload(dev, b.T.copy(), dtype)
    assert_close(download(q, ops.matmul_bt(q, ab, bt)), ar @ br, dtype, scale=scale)
    out2 = poisoned(dev, q, (m, n), dtype)
    q.wait(ops.matmul_bt_into(q, ab, bt, out2))
    assert_close(download(q, out2), ar @ br, dtype, scale=scale)


@pytest.mark.parametrize("dtype", FLOATS)
def test_sample_greedy_and_top_k(dev, q, rng, dtype):
    rows, vocab = 3, 4099
    logits = rng.standard_normal((rows, vocab)) * 5
    lb = upload(dev, logits, dtype)
    lr = rounded(logits, dtype)
    greedy = download(q, ops.sample(q, lb, temperature=0.0))
    # Ties (after rounding) go to the lower id: argmax does the same.
    np.testing.assert_array_equal(greedy, lr.argmax(axis=-1))
    out = poisoned(dev, q, (rows,), "uint32")
    q.wait(ops.sample_into(q, lb, out, temperature=0.8, top_k=5, top_p=0.95, seed=3, step=11))
    tokens = download(q, out)
    top5 = np.argsort(-lr, axis=-1)[:, :5]
    assert all(t in top5[r] for r, t in enumerate(tokens))
    again = download(q, ops.sample(q, lb, temperature=0.8, top_k=5, top_p=0.95, seed=3, step=11))
    np.testing.assert_array_equal(again, tokens)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_q4_matvec(dev, q, rng, group):
    rows, cols = 67, 256
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    m = ops.Q4Matrix.quantize(dev, w, rows, cols, group)
    assert (m.rows, m.cols, m.group) == (rows, cols, group)
    assert m.packed.shape == (rows, cols // 2) and m.scales.shape == (rows, cols // group)
    wq = np.frombuffer(m.dequantize(q), dtype=np.float32).reshape(rows, cols).astype(np.float64)
    assert np.max(np.abs(wq - w)) <= np.max(np.abs(w)) / 7  # within half a step of the code
    for batch in (1, 3):
        x = rng.standard_normal((batch, cols))
        xb = upload(dev, x, "float32")
        want = rounded(x, "float32") @ wq.T
        scale = np.abs(rounded(x, "float32")) @ np.abs(wq).T
        assert_close(download(q, ops.q4_matvec(q, m, xb)), want, "float32", scale=scale)
        out = poisoned(dev, q, (batch, rows), "float32")
        q.wait(ops.q4_matvec_into(q, m, xb, out))
        assert_close(download(q, out), want, "float32", scale=scale)
        # int8 activations: each block's values are rounded to 1/127 of its largest.
        xq = ops.quantize_activations(q, xb)
        assert (xq.batch, xq.cols) == (batch, cols)
        y8 = download(q, ops.q4_matvec_q8(q, m, xq))
        err = np.abs(y8 - want) / scale
        assert err.max() < 2 / 127, err.max()
        pre = ops.Q8Activations.alloc(dev, [batch, cols])
        q.wait(ops.quantize_activations_into(q, xb, pre))
        out8 = poisoned(dev, q, (batch, rows), "float32")
        q.wait(ops.q4_matvec_q8_into(q, m, pre, out8))
        np.testing.assert_array_equal(download(q, out8), y8)


def test_q4_matrix_from_parts(dev, q, rng):
    w = rng.standard_normal((8, 64)).astype(np.float32)
    m = ops.Q4Matrix.quantize(dev, w, 8, 64, 32)
    again = ops.Q4Matrix(m.packed, m.scales, 8, 64, 32)
    x = upload(dev, rng.standard_normal(64), "float32")
    np.testing.assert_array_equal(download(q, ops.q4_matvec(q, again, x)), download(q, ops.q4_matvec(q, m, x)))
    assert again.weight_bytes == 8 * 32 + 8 * 2 * 2


def ggml_blocks(rng, ty: str, rows: int, cols: int):
    """Random blocks of a ggml format and their weights decoded in float64 (ggml's layout:
    a 4-bit block's weight j < 16 is the low nibble of byte j, j + 16 its high nibble)."""
    nb = rows * cols // 32
    d = (rng.standard_normal(nb) * 0.02).astype(np.float16)
    m = (rng.standard_normal(nb) * 0.02).astype(np.float16)
    if ty == "Q8_0":
        q = rng.integers(-128, 128, size=(nb, 32), dtype=np.int8)
        blocks = np.concatenate([d.view(np.uint8).reshape(nb, 2), q.view(np.uint8)], axis=1)
        w = d.astype(np.float64)[:, None] * q
    else:
        qs = rng.integers(0, 256, size=(nb, 16), dtype=np.uint8)
        nib = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.float64)
        if ty == "Q4_0":
            blocks = np.concatenate([d.view(np.uint8).reshape(nb, 2), qs], axis=1)
            w = d.astype(np.float64)[:, None] * (nib - 8)
        else:
            blocks = np.concatenate([d.view(np.uint8).reshape(nb, 2), m.view(np.uint8).reshape(nb, 2), qs], axis=1)
            w = d.astype(np.float64)[:, None] * nib + m.astype(np.float64)[:, None]
    return blocks.reshape(rows, -1), w.reshape(rows, cols)


@pytest.mark.parametrize("ty", ["Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("dtype", FLOATS)
def test_ggml_matvec(dev, q, rng, ty, dtype):
    rows, cols = 67, 96
    blocks, w = ggml_blocks(rng, ty, rows, cols)
    m = ops.GgmlMatrix(dev.from_host(np.ascontiguousarray(blocks)), ty, rows, cols)
    assert (m.ggml_type, m.rows, m.cols) == (ty, rows, cols)
    np.testing.assert_array_equal(np.frombuffer(m.dequantize(q), np.float32).reshape(rows, cols), w)
    for batch in (1, 3):
        x = rng.standard_normal((batch, cols))
        xb = upload(dev, x, dtype)
        xr = rounded(x, dtype)
        want, scale = xr @ w.T, np.abs(xr) @ np.abs(w).T
        got = download(q, ops.ggml_matvec(q, m, xb))
        assert_close(got, want, "float32", scale=scale * 4)
        out = poisoned(dev, q, (batch, rows), "float32")
        q.wait(ops.ggml_matvec_into(q, m, xb, out))
        assert_close(download(q, out), want, "float32", scale=scale * 4)
    with pytest.raises(unibuf.InvalidArgumentError, match="Q8_0"):
        ops.GgmlMatrix(m.bytes, "Q4_K", rows, cols)


@pytest.mark.parametrize("dtype", FLOATS)
def test_embed_rows(dev, q, rng, dtype):
    vocab, cols = 29, 64
    blocks, w = ggml_blocks(rng, "Q8_0", vocab, cols)
    m = ops.GgmlMatrix(dev.from_host(np.ascontiguousarray(blocks)), "Q8_0", vocab, cols)
    ids = rng.integers(0, vocab, size=7).astype(np.uint32)
    idb = dev.from_host(ids)
    for table, ref in ((ops.EmbeddingTable.blocks(m), w), (ops.EmbeddingTable.rows(upload(dev, w, "float32")), rounded(w, "float32"))):
        assert (table.vocab, table.cols) == (vocab, cols)
        want = rounded(ref[ids], dtype)
        np.testing.assert_array_equal(download(q, ops.embed_rows(q, table, idb, dtype)), want)
        out = poisoned(dev, q, (7, cols), dtype)
        q.wait(ops.embed_rows_into(q, table, idb, out))
        np.testing.assert_array_equal(download(q, out), want)
    bad = dev.from_host(np.array([vocab], np.uint32))
    assert np.all(np.isnan(download(q, ops.embed_rows(q, ops.EmbeddingTable.blocks(m), bad))))


def test_constants():
    assert ops.Q4_GROUPS == [32, 64, 128]
    assert ops.Q8_BLOCK == 32 and ops.Q4_MAX_BATCH == 8 and ops.SAMPLE_MAX_K == 1024
    assert TOL["float32"] < TOL["float16"] < TOL["bfloat16"]
    assert unibuf.ops.rms_norm is ops.rms_norm
