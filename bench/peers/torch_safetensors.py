#!/usr/bin/env python3
"""The Python safetensors library's load to the GPU, beside `unibuf bench load` on the same file.

    python3 bench/peers/torch_safetensors.py FILE [--make 6G] [--iters 3] [--json OUT]

With --make SIZE, FILE is written first (unless it exists with about that size): bfloat16
tensors shaped like a decoder's layers (4096x4096 attention, 4096x14336 MLP, f32 norms),
random values. The file is then read once so that it sits in the page cache (nothing is dropped
from it), and `safetensors.torch.load_file(FILE, device="cuda")` is timed with a CUDA
synchronisation before and after: one warm-up, then the median of --iters loads. The result is
printed as one JSON line (and written to --json).
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
from safetensors.torch import load_file, save_file

UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(s):
    s = s.strip().upper().removesuffix("B").removesuffix("I")
    return int(float(s[:-1]) * UNITS[s[-1]]) if s[-1] in UNITS else int(s)


def make(path, size):
    """Writes about `size` bytes of decoder-shaped tensors, a layer at a time on the GPU."""
    d, ff = 4096, 14336
    layer = 4 * d * d * 2 + 3 * d * ff * 2 + 2 * d * 4
    layers = max(1, round(size / layer))
    gen = torch.Generator(device="cuda").manual_seed(0)
    tensors = {}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[p + "self_attn." + name + ".weight"] = torch.randn(
                d, d, device="cuda", dtype=torch.bfloat16, generator=gen).cpu()
        for name, shape in (("gate_proj", (ff, d)), ("up_proj", (ff, d)), ("down_proj", (d, ff))):
            tensors[p + "mlp." + name + ".weight"] = torch.randn(
                *shape, device="cuda", dtype=torch.bfloat16, generator=gen).cpu()
        for name in ("input_layernorm", "post_attention_layernorm"):
            tensors[p + name + ".weight"] = torch.rand(d, device="cuda", generator=gen).cpu()
    save_file(tensors, path, metadata={"format": "pt", "writer": "bench/peers/torch_safetensors.py"})


def warm(path):
    """Reads the file once so that it is in the page cache; returns seconds."""
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(64 << 20)
        while f.readinto(buf):
            pass
    return time.perf_counter() - t


def timed_load(path):
    torch.cuda.synchronize()
    t = time.perf_counter()
    tensors = load_file(path, device="cuda")
    torch.cuda.synchronize()
    s = time.perf_counter() - t
    n = sum(v.numel() * v.element_size() for v in tensors.values())
    del tensors
    return s, n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--make", default=None, help="write FILE of about this size first (e.g. 6G)")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.make:
        size = parse_size(args.make)
        if not (os.path.exists(args.file) and abs(os.path.getsize(args.file) - size) < size // 4):
            t = time.perf_counter()
            make(args.file, size)
            print(f"wrote {args.file}: {os.path.getsize(args.file)} bytes in "
                  f"{time.perf_counter() - t:.1f} s", file=sys.stderr)
    warm_s = warm(args.file)
    timed_load(args.file)  # warm-up: CUDA context, allocator, code paths
    times = []
    for _ in range(args.iters):
        s, n = timed_load(args.file)
        times.append(s)
    median = statistics.median(times)
    result = {
        "peer": "safetensors.torch.load_file(device='cuda')",
        "file": args.file,
        "bytes": n,
        "median_seconds": round(median, 6),
        "gbps": round(n / median / 1e9, 4),
        "samples": [round(t, 6) for t in times],
        "warm_seconds": round(warm_s, 3),
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "safetensors": __import__("safetensors").__version__,
    }
    line = json.dumps(result)
    print(line)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
