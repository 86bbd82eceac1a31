#!/usr/bin/env python3
"""torch.matmul at the shapes of `unibuf bench matmul`, printing the same columns.

The same cases as `unibuf bench matmul` (full sizes, or `--small`): f16 and bf16 at
4096 x 4096 x 4096 with b as [k, n] (`a @ b`) and as a linear layer's [n, k] (`a @ b.T`, a
transposed view, which cuBLAS reads with op T), and decode shapes, m = 1, 4 and 16 rows against
weights [n, k] of 4096 x 4096, 14336 x 4096 and 4096 x 14336. Each case: warm-up calls, then
`--samples` samples of back-to-back `torch.matmul(a, b, out=c)` calls timed with CUDA events
(sized to about 50 ms, at most `--iters` calls), the median sample per call. TFLOP/s counts
2·m·n·k flops; GB/s the bytes of a, b and out once.

Overhead: `--calls` back-to-back 16x16x16 f16 products timed on the host (no sync inside the
timing), the median of 7 samples, beside `unibuf bench matmul`'s rows.

PyTorch lets cuBLAS reduce split-k partial sums in f16/bf16 by default; unibuf's matmul does
not (CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION). `--match-unibuf` turns PyTorch's
`allow_fp16/bf16_reduced_precision_reduction` off to compare like with like.

    python3 bench/peers/matmul_torch.py [--small] [--match-unibuf] [--samples 5] [--json out.json]
"""
import argparse
import json
import statistics
import time

import torch


def cases(small):
    square, hidden, ffn = (256, 512, 1792) if small else (4096, 4096, 14336)
    shapes = [("prefill", "a@b", square, square, square), ("prefill", "a@b.T", square, square, square)]
    for m in (1, 4, 16):
        shapes.append(("decode qkv/o", "a@b.T", m, hidden, hidden))
        shapes.append(("decode up", "a@b.T", m, ffn, hidden))
        shapes.append(("decode down", "a@b.T", m, hidden, ffn))
    out = []
    for dt, name in ((torch.float16, "F16"), (torch.bfloat16, "BF16")):
        for what, layout, m, n, k in shapes:
            out.append((f"{what} {name} m={m} n={n} k={k}", dt, layout, m, n, k))
    return out


def time_case(dt, layout, m, n, k, iters, samples):
    """Median seconds per call over `samples` samples of back-to-back calls (CUDA events)."""
    a = torch.rand(m, k, device="cuda", dtype=dt) * 2 - 1
    if layout == "a@b":
        b = torch.rand(k, n, device="cuda", dtype=dt) * 2 - 1
    else:
        b = (torch.rand(n, k, device="cuda", dtype=dt) * 2 - 1).T
    c = torch.empty(m, n, device="cuda", dtype=dt)
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        torch.matmul(a, b, out=c)
    torch.cuda.synchronize()
    start.record()
    for _ in range(3):
        torch.matmul(a, b, out=c)
    end.record()
    end.synchronize()
    warm = start.elapsed_time(end) / 1e3 / 3
    per_sample = max(1, min(iters, int(0.05 / max(warm, 1e-9))))
    times = []
    for _ in range(samples):
        start.record()
        for _ in range(per_sample):
            torch.matmul(a, b, out=c)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / per_sample)
    return statistics.median(times), per_sample


def host_ns_per_call(calls):
    a = torch.rand(16, 16, device="cuda", dtype=torch.float16)
    b = torch.rand(16, 16, device="cuda", dtype=torch.float16)
    c = torch.empty(16, 16, device="cuda", dtype=torch.float16)
    times = []
    for sample in range(8):
        t = time.perf_counter()
        for _ in range(calls):
            torch.matmul(a, b, out=c)
        ns = (time.perf_counter() - t) / calls * 1e9
        torch.cuda.synchronize()
        if sample > 0:
            times.append(ns)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--only", default=None)
    ap.add_argument("--match-unibuf", action="store_true",
                    help="disallow reduced-precision split-k reductions, as unibuf does")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    # The default is off in PyTorch too, but say so: f32 would otherwise compare TF32 with FP32.
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.match_unibuf:
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    reduction = "disallowed" if args.match_unibuf else "PyTorch's default (allowed)"
    print(f"torch.matmul {torch.__version__} on {torch.cuda.get_device_name(0)}; median of "
          f"{args.samples} samples of back-to-back calls (CUDA events, at most {args.iters} per "
          f"sample, about 50 ms); reduced-precision reductions: {reduction}")
    print(f"{'case':<44} {'layout':>6} {'µs':>11} {'TFLOP/s':>9} {'GB/s':>8}")
    rows = []
    for name, dt, layout, m, n, k in cases(args.small):
        if args.only is not None and args.only not in name:
            continue
        s, per_sample = time_case(dt, layout, m, n, k, args.iters, args.samples)
        us = s * 1e6
        tflops = 2 * m * n * k / s / 1e12
        size = torch.tensor([], dtype=dt).element_size()
        gbps = (m * k + k * n + m * n) * size / s / 1e9
        print(f"{name:<44} {layout:>6} {us:>11.2f} {tflops:>9.2f} {gbps:>8.0f}")
        rows.append({"case": name, "dtype": str(dt).removeprefix("torch."), "layout": layout,
                     "m": m, "n": n, "k": k, "us": us, "tflops": tflops, "gbps": gbps,
                     "per_sample": per_sample})
    print("µs per call (back-to-back, CUDA events); TFLOP/s: 2·m·n·k; GB/s: a, b and out once")
    ns = host_ns_per_call(args.calls)
    print(f"host overhead: {args.calls} back-to-back 16x16x16 f16 products, median of 7 samples")
    print(f"{'torch.matmul(a, b, out=c)':<44} {ns:>9.0f} ns per call")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                       "match_unibuf": args.match_unibuf, "rows": rows,
                       "overhead_ns_per_call": {"torch.matmul(a, b, out=c)": ns}}, f)
            f.write("\n")


if __name__ == "__main__":
    main()
