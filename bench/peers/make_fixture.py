#!/usr/bin/env python3
"""Writes the small safetensors fixtures that the conformance suite reads bit-exactly.

    python3 bench/peers/make_fixture.py [--out tests/conformance/data] [--torch]

`python_numpy.safetensors` is written by the Python safetensors library from NumPy arrays
(every dtype NumPy has); with --torch (needs PyTorch), `python_torch.safetensors` is written by
`safetensors.torch.save_file` (bfloat16, bool, float8 and the rest). Values are deterministic
formulas, so the Rust test recomputes some of them independently; the script prints each
tensor's dtype, shape and zlib CRC-32 of its bytes, which the test also checks
(tests/conformance/weights.rs, `FIXTURE_*`).
"""
import argparse
import os
import zlib

import numpy as np


def ramp(n):
    """n values in [-5, 5): i * 0.37 mod 10 - 5, computed in float64."""
    return (np.arange(n, dtype=np.float64) * 0.37) % 10.0 - 5.0


def numpy_tensors():
    t = {}
    t["f16"] = ramp(3 * 5).astype(np.float16).reshape(3, 5)
    t["f32"] = ramp(7).astype(np.float32)
    t["f64"] = ramp(2 * 3 * 2).reshape(2, 3, 2)
    t["i8"] = (np.arange(11) * 37 % 256 - 128).astype(np.int8)
    t["u8"] = (np.arange(13) * 71 % 256).astype(np.uint8)
    t["i16"] = (np.arange(5) * 12345 % 65536 - 32768).astype(np.int16)
    t["u16"] = (np.arange(6) * 40503 % 65536).astype(np.uint16)
    t["i32"] = (np.arange(4, dtype=np.int64) * 2654435761 % 2**32 - 2**31).astype(np.int32)
    t["u32"] = (np.arange(3, dtype=np.uint64) * 2654435761 % 2**32).astype(np.uint32)
    t["i64"] = np.array([-(2**62), -1, 0, 1, 2**62 + 12345], dtype=np.int64)
    t["u64"] = np.array([0, 1, 2**63 + 99, 2**64 - 1], dtype=np.uint64)
    t["bool"] = (np.arange(9) % 3 == 0).reshape(3, 3)
    t["scalar"] = np.array(2.5, dtype=np.float32)
    t["empty"] = np.zeros((0, 4), dtype=np.float32)
    return t


def torch_tensors():
    import torch

    t = {}
    t["bf16"] = torch.tensor(ramp(2 * 9), dtype=torch.float32).to(torch.bfloat16).reshape(2, 9)
    t["f16"] = torch.tensor(ramp(5), dtype=torch.float32).to(torch.float16)
    t["f32"] = torch.tensor(ramp(3 * 3), dtype=torch.float32).reshape(3, 3)
    t["bool"] = torch.arange(7) % 2 == 1
    t["i8"] = torch.tensor((np.arange(6) * 37 % 256 - 128).astype(np.int8))
    t["u8"] = torch.tensor((np.arange(10) * 71 % 256).astype(np.uint8))
    t["i64"] = torch.tensor([-(2**40), 7, 2**50], dtype=torch.int64)
    if hasattr(torch, "float8_e4m3fn"):
        t["f8_e4m3"] = torch.tensor(ramp(8), dtype=torch.float32).to(torch.float8_e4m3fn)
    return t


def describe(path):
    from safetensors import safe_open

    with safe_open(path, framework="np") as f:
        names = sorted(f.keys())
    # Read the raw bytes through the header, so that dtypes NumPy lacks are covered too.
    import json
    import struct

    with open(path, "rb") as fh:
        raw = fh.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    base = 8 + n
    print(f"{os.path.basename(path)}: {len(raw)} bytes")
    for name in names:
        e = header[name]
        b, end = e["data_offsets"]
        crc = zlib.crc32(raw[base + b : base + end])
        print(f'    ("{name}", "{e["dtype"]}", &{e["shape"]}, 0x{crc:08x}),')


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/conformance/data")
    ap.add_argument("--torch", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    from safetensors.numpy import save_file

    p = os.path.join(args.out, "python_numpy.safetensors")
    save_file(numpy_tensors(), p, metadata={"writer": "safetensors.numpy", "format": "np"})
    describe(p)
    if args.torch:
        from safetensors.torch import save_file as save_torch

        p = os.path.join(args.out, "python_torch.safetensors")
        save_torch(torch_tensors(), p, metadata={"writer": "safetensors.torch", "format": "pt"})
        describe(p)


if __name__ == "__main__":
    main()
