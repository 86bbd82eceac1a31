"""safetensors loading and the expert cache, on files written here."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

import unibuf
from conftest import download


def write_safetensors(path, tensors: dict, metadata=None):
    """The safetensors format: an 8-byte little-endian header length, a JSON header of
    dtype/shape/data_offsets per tensor, then the data."""
    names = {"float32": "F32", "float16": "F16", "int32": "I32", "uint8": "U8"}
    header, blobs, at = {}, [], 0
    for name, a in tensors.items():
        raw = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": names[a.dtype.name], "shape": list(a.shape), "data_offsets": [at, at + len(raw)]}
        blobs.append(raw)
        at += len(raw)
    if metadata:
        header["__metadata__"] = metadata
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def test_load_every_tensor(dev, q, rng, tmp_path):
    tensors = {
        "embed": rng.standard_normal((11, 7)).astype(np.float32),
        "norm": rng.standard_normal(7).astype(np.float16),
        "ids": rng.integers(-5, 5, size=(3, 3)).astype(np.int32),
    }
    path = tmp_path / "model.safetensors"
    write_safetensors(path, tensors, {"format": "pt"})
    f = unibuf.weights.WeightsFile(path)
    assert [t["name"] for t in f.tensors] == list(tensors)
    assert f.metadata == {"format": "pt"}
    assert f.tensors[0]["dtype"] == "float32" and f.tensors[0]["shape"] == [11, 7]
    w = unibuf.weights.load(dev, f)
    assert len(w) == 3 and set(w.keys()) == set(tensors) and "norm" in w and 3 not in w
    assert list(w) == w.keys() and [n for n, _ in w.items()] == w.keys()
    for name, a in tensors.items():
        np.testing.assert_array_equal(download(q, w[name]), a.astype(np.float64) if a.dtype.kind == "f" else a)
    r = w.report
    assert r["tensors"] == 3 and r["bytes"] == sum(a.nbytes for a in tensors.values())
    assert "GB/s" in r["text"]
    sub = unibuf.weights.load(dev, str(path), names=["norm"])
    assert list(sub.keys()) == ["norm"]
    with pytest.raises(KeyError):
        sub["embed"]
    with pytest.raises(unibuf.InvalidArgumentError):
        unibuf.weights.load(dev, path, names=["a"], prefix="b")


def test_expert_cache(dev, q, rng, tmp_path):
    layers, experts = 2, 4
    tensors = {}
    for layer in range(layers):
        for e in range(experts):
            tensors[f"l{layer}.e{e}.w1"] = rng.standard_normal((5, 3)).astype(np.float32)
            tensors[f"l{layer}.e{e}.w2"] = rng.standard_normal(9).astype(np.float32)
    path = tmp_path / "moe.safetensors"
    write_safetensors(path, tensors)
    cache = unibuf.weights.ExpertCache(dev, path, layers, experts, "l{layer}.e{expert}.", 2)
    cache.prefetch(1, [3])
    cache.wait_prefetches()
    e = cache.get(0, 2)
    assert (e.layer, e.expert) == (0, 2) and sorted(e.keys()) == ["w1", "w2"]
    assert "w1" in e and "w3" not in e and 1 not in e and sorted(e) == ["w1", "w2"] and len(e) == 2
    np.testing.assert_array_equal(download(q, e["w1"]), tensors["l0.e2.w1"])
    hit = cache.get(1, 3)
    np.testing.assert_array_equal(download(q, hit["w2"]), tensors["l1.e3.w2"])
    s = cache.stats()
    assert s["misses"] == 1 and s["prefetch_hits"] == 1
    for ex in range(experts):
        cache.get(0, ex)
    assert len(cache.resident(0)) == 2 and cache.stats()["evictions"] >= 2
    with pytest.raises(unibuf.InvalidArgumentError):
        unibuf.weights.ExpertCache(dev, path, layers, experts, "l{layer}.", 2)


def write_gguf(path, norm: np.ndarray, q8_rows: bytes):
    """A GGUF v3 file: one string key, an F32 tensor and a Q8_0 matrix of 2 rows of 32 values
    (34 bytes a row), data aligned to 32 bytes."""
    def string(s: bytes) -> bytes:
        return struct.pack("<Q", len(s)) + s

    def info(name: bytes, dims, ggml: int, offset: int) -> bytes:
        return string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", ggml, offset)

    head = b"GGUF" + struct.pack("<IQQ", 3, 2, 1)
    head += string(b"general.architecture") + struct.pack("<I", 8) + string(b"llama")
    norm_bytes = norm.astype("<f4").tobytes()
    q8_at = (len(norm_bytes) + 31) // 32 * 32
    head += info(b"norm", [norm.size], 0, 0) + info(b"w", [32, 2], 8, q8_at)
    head += b"\0" * (-len(head) % 32)
    data = norm_bytes + b"\0" * (q8_at - len(norm_bytes)) + q8_rows
    path.write_bytes(head + data)


def test_load_gguf(dev, q, rng, tmp_path):
    norm = rng.standard_normal(11).astype(np.float32)
    q8 = rng.integers(0, 256, size=68, dtype=np.uint8).tobytes()
    path = tmp_path / "model.gguf"
    write_gguf(path, norm, q8)
    f = unibuf.weights.WeightsFile(path)
    assert f.format == "gguf" and f.metadata["general.architecture"] == "llama"
    by_name = {t["name"]: t for t in f.tensors}
    assert by_name["w"]["file_dtype"] == "Q8_0" and by_name["w"]["shape"] == [2, 34]
    w = unibuf.weights.load(dev, f)
    np.testing.assert_array_equal(download(q, w["norm"]), norm.astype(np.float64))
    assert w["w"].dtype == "uint8" and w["w"].shape == (2, 34)
    assert q.download(w["w"]) == q8
    assert [r for r in w.report["text"].splitlines() if r.startswith("Q8_0")]
