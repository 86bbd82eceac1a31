#!/usr/bin/env python3
"""Host time per eager PyTorch op on this machine, beside `unibuf bench launch` in the same run.

Launches a one-element in-place add back to back without synchronising (the CPU cost an engine
pays per op), `--count` per sample, and prints the median microseconds per op.

    python3 bench/peers/torch_launch.py [--count 20000] [--samples 7]
"""
import argparse
import statistics
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--samples", type=int, default=7)
    args = ap.parse_args()
    a = torch.ones(1, device="cuda")
    b = torch.ones(1, device="cuda")
    times = []
    for sample in range(args.samples + 1):
        t = time.perf_counter()
        for _ in range(args.count):
            a.add_(b)
        per = (time.perf_counter() - t) / args.count
        torch.cuda.synchronize()
        if sample > 0:
            times.append(per)
    print(f"pytorch {torch.__version__} on {torch.cuda.get_device_name(0)}")
    print(f"{'eager op (a.add_(b))':<28} {statistics.median(times) * 1e6:>10.3f} us/op")


if __name__ == "__main__":
    main()
