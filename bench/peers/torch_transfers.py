#!/usr/bin/env python3
"""PyTorch's transfers on this machine, beside `unibuf bench transfers` in the same run.

Measures host->device and device->host from pinned and pageable memory, device->device copy and
fill, at the sizes unibuf uses, with CUDA events around each operation (median of --iters runs
after one warm-up). device->device counts bytes read plus written, as the driver ceiling does.

    python3 bench/peers/torch_transfers.py [--sizes 64K,1M,16M,256M,1G] [--iters 10] [--json FILE]
"""
import argparse
import json
import statistics
import sys

import torch

UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(s):
    s = s.strip().upper().removesuffix("B").removesuffix("I")
    return int(s[:-1]) * UNITS[s[-1]] if s[-1] in UNITS else int(s)


def timed(fn, iters):
    """Median seconds of `fn` over `iters` runs, timed with CUDA events on the current stream."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="64K,1M,16M,256M,1G")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows = []
    for size in [parse_size(s) for s in args.sizes.split(",")]:
        pinned = torch.empty(size, dtype=torch.uint8, pin_memory=True).fill_(7)
        pageable = torch.empty(size, dtype=torch.uint8).fill_(7)
        gpu = torch.empty(size, dtype=torch.uint8, device=dev)
        gpu2 = torch.empty(size, dtype=torch.uint8, device=dev)
        gpu32 = gpu.view(torch.int32) if size % 4 == 0 else None
        ops = {
            "h2d_pinned": (lambda: gpu.copy_(pinned, non_blocking=True), size),
            "h2d_pageable": (lambda: gpu.copy_(pageable), size),
            "d2h_pinned": (lambda: pinned.copy_(gpu, non_blocking=True), size),
            "d2h_pageable": (lambda: pageable.copy_(gpu), size),
            "d2d_copy": (lambda: gpu2.copy_(gpu), 2 * size),
            "fill_u8": (lambda: gpu.fill_(3), size),
        }
        if gpu32 is not None:
            ops["fill_u32"] = (lambda: gpu32.fill_(0x01020304), size)
        for name, (fn, moved) in ops.items():
            t = timed(fn, args.iters)
            rows.append({"peer": "pytorch", "op": name, "bytes": size, "seconds": t, "gbps": moved / t / 1e9})
        del pinned, pageable, gpu, gpu2
        torch.cuda.empty_cache()
    info = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)
    print(f"pytorch {info['torch']} on {info['device']} (CUDA {info['cuda']})")
    print(f"{'op':<14} {'bytes':>12} {'GB/s':>9}")
    for r in rows:
        print(f"{r['op']:<14} {r['bytes']:>12} {r['gbps']:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
