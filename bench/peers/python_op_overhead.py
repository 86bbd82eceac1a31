#!/usr/bin/env python3
"""Host time per op call from Python: unibuf's bindings against PyTorch eager, same run.

For each shape ([1, 576], [1, 4096], [8, 4096]) and dtype (float16, float32):

- unibuf, on unibuf buffers (``Device.from_host``): ``ops.rms_norm_into(q, x, w, out, eps)``,
  ``ops.rms_norm(q, x, w, eps)`` (allocates its output), ``ops.softmax_into(q, x, out)``;
- torch-interop: ``as_tensor(ops.rms_norm(q, wrap(x), wrap_w, eps))`` on torch tensors (the
  weight wrapped once): what a PyTorch client of unibuf pays per op, DLPack both ways;
- PyTorch eager, on tensors of the same size: ``F.rms_norm(x, (h,), w, eps)``,
  ``torch.softmax(x, -1, out=o)``, and ``torch.add(a, b, out=c)`` (the cheapest eager op).

Method: warm up, then time ``--calls`` calls back to back with ``time.perf_counter_ns()``,
synchronising only before and after the loop (never inside it), ``--reps`` times; the median
of the repetitions is reported, in µs per call, with the ratio unibuf / torch. On CUDA the
default 2000 calls are few enough that the launch queue does not fill and block the host (the
time after the loop until the device is idle is reported too: ``tail``). On the CPU, PyTorch's
ops run in the calling thread (their time includes the arithmetic) while unibuf's CPU queue
runs its work on a worker thread (its time is the submission alone): the CPU ratios are not
like for like.

    python3 bench/peers/python_op_overhead.py [--device cuda|cpu] [--calls 2000] [--reps 7] \
        [--json PATH]

unibuf's bindings must be built with the backend of ``--device``
(``maturin develop --release --features cuda`` in bindings/python for CUDA).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import unibuf
import unibuf.ops
import unibuf.torch as ut

SHAPES = [(1, 576), (1, 4096), (8, 4096)]
DTYPES = {"float16": (torch.float16, np.float16), "float32": (torch.float32, np.float32)}
EPS = 1e-5

# (row name, the torch row it is compared with)
UNIBUF_ROWS = [
    ("unibuf rms_norm_into", "torch F.rms_norm"),
    ("unibuf rms_norm", "torch F.rms_norm"),
    ("unibuf softmax_into", "torch softmax(out=)"),
    ("torch-interop rms_norm", "torch F.rms_norm"),
]
TORCH_ROWS = ["torch F.rms_norm", "torch softmax(out=)", "torch add(out=)"]
ALL_ROWS = [r for r, _ in UNIBUF_ROWS] + TORCH_ROWS


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_sync(device: str, udev: unibuf.Device):
    if device == "cuda":
        def sync():
            torch.cuda.synchronize()
            udev.drain()
    else:
        def sync():
            udev.drain()
    return sync


def time_calls(fn, calls: int, reps: int, warmup: int, sync):
    """Median, min and every repetition's µs per call; and the median µs the device needed
    after the loop to go idle (the tail: large when the queue ran behind the host)."""
    for _ in range(warmup):
        fn()
    sync()
    per, tails = [], []
    clock = time.perf_counter_ns
    for _ in range(reps):
        sync()
        t0 = clock()
        for _ in range(calls):
            fn()
        t1 = clock()
        sync()
        t2 = clock()
        per.append((t1 - t0) / calls / 1e3)
        tails.append((t2 - t1) / 1e3)
    return {"us": statistics.median(per), "min_us": min(per), "reps_us": per,
            "tail_us": statistics.median(tails)}


def cases(shape, dt_name, device, udev, q, seed):
    """{row name: zero-argument callable} for one shape and dtype."""
    tdt, ndt = DTYPES[dt_name]
    rows, h = shape
    g = torch.Generator().manual_seed(seed)
    x_cpu = torch.randn(shape, generator=g).to(tdt)
    w_cpu = (1.0 + 0.1 * torch.randn(h, generator=g)).to(tdt)

    # unibuf-native buffers (uploaded once; nothing moves inside the timed loops).
    xb = udev.from_host(x_cpu.numpy(), label="x")
    wb = udev.from_host(w_cpu.numpy(), label="w")
    ob = udev.alloc(list(shape), dt_name, label="out")

    # torch tensors of the same size on the same device.
    x = x_cpu.to(device)
    w = w_cpu.to(device)
    o = torch.empty_like(x)
    a = torch.randn(shape, generator=g).to(tdt).to(device)
    b = torch.randn(shape, generator=g).to(tdt).to(device)
    c = torch.empty_like(a)
    ww = ut.wrap(w, udev, read_only=True, label="w_wrapped")  # wrapped once

    ops = unibuf.ops
    fns = {
        "unibuf rms_norm_into": lambda: ops.rms_norm_into(q, xb, wb, ob, EPS),
        "unibuf rms_norm": lambda: ops.rms_norm(q, xb, wb, EPS),
        "unibuf softmax_into": lambda: ops.softmax_into(q, xb, ob),
        "torch-interop rms_norm": lambda: ut.as_tensor(ops.rms_norm(q, ut.wrap(x, udev), ww, EPS)),
        "torch F.rms_norm": lambda: F.rms_norm(x, (h,), w, EPS),
        "torch softmax(out=)": lambda: torch.softmax(x, -1, out=o),
        "torch add(out=)": lambda: torch.add(a, b, out=c),
    }

    # Each form computes the same thing (a check that the timed calls do real work).
    def close(t, ref, what):
        tol = 2e-2 if tdt == torch.float16 else 1e-5
        err = (t.float().cpu() - ref.float().cpu()).abs().max().item()
        if not err <= tol * max(1.0, ref.float().abs().max().item()):
            raise AssertionError(f"{what} {dt_name} {shape}: max |diff| {err} vs torch")

    ref_norm = F.rms_norm(x.float(), (h,), w.float(), EPS)
    ref_soft = torch.softmax(x.float(), -1)
    ops.rms_norm_into(q, xb, wb, ob, EPS)
    close(torch.from_numpy(ob.numpy()), ref_norm, "rms_norm_into")
    close(torch.from_numpy(ops.rms_norm(q, xb, wb, EPS).numpy()), ref_norm, "rms_norm")
    ops.softmax_into(q, xb, ob)
    close(torch.from_numpy(ob.numpy()), ref_soft, "softmax_into")
    close(fns["torch-interop rms_norm"](), ref_norm, "torch-interop rms_norm")
    return fns


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--calls", type=int, default=2000, help="calls per timed repetition")
    ap.add_argument("--reps", type=int, default=7, help="repetitions (the median is reported)")
    ap.add_argument("--warmup", type=int, default=200, help="untimed calls first")
    ap.add_argument("--dtypes", default="float16,float32")
    ap.add_argument("--json", metavar="PATH", default=None)
    args = ap.parse_args()

    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: PyTorch sees no CUDA device")
        if "cuda" not in unibuf.FEATURES:
            raise SystemExit("--device cuda: this unibuf build has no CUDA backend "
                             "(maturin develop --release --features cuda)")
        device_name = torch.cuda.get_device_name()
    else:
        device_name = cpu_name()
    udev = ut.device_for(args.device)
    q = udev.queue("overhead")
    sync = make_sync(args.device, udev)
    print(f"device: {device_name} ({args.device}); unibuf {unibuf.__version__} on {udev.backend} "
          f"({udev.name}); torch {torch.__version__}; python {sys.version.split()[0]}")
    print(f"{args.calls} calls x {args.reps} repetitions (median), {args.warmup} warm-up calls; "
          "no synchronisation inside the timed loops")
    if args.device == "cpu":
        print("note: on the CPU torch's time includes the arithmetic, unibuf's is the submission "
              "(its CPU queue computes on a worker thread)")

    results = []
    table = []
    for dt_name in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        if dt_name not in DTYPES:
            raise SystemExit(f"--dtypes: {dt_name!r} is not one of {list(DTYPES)}")
        for shape in SHAPES:
            fns = cases(shape, dt_name, args.device, udev, q, seed=len(results))
            timed = {}
            for name in ALL_ROWS:
                timed[name] = time_calls(fns[name], args.calls, args.reps, args.warmup, sync)
            del fns
            sync()
            row = {"dtype": dt_name, "shape": list(shape), "ops": timed, "ratios": {}}
            for name, peer in UNIBUF_ROWS:
                row["ratios"][f"{name} / {peer}"] = timed[name]["us"] / timed[peer]["us"]
                row["ratios"][f"{name} / torch add(out=)"] = timed[name]["us"] / timed["torch add(out=)"]["us"]
            results.append(row)
            table.append(row)
            print(f"  {dt_name} {list(shape)}: " + ", ".join(f"{n} {timed[n]['us']:.2f}" for n in ALL_ROWS)
                  + " µs; max tail " + f"{max(t['tail_us'] for t in timed.values()):.0f} µs")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({
                "device": args.device,
                "device_name": device_name,
                "unibuf_backend": udev.backend,
                "unibuf_device": udev.name,
                "versions": {"torch": torch.__version__, "unibuf": unibuf.__version__,
                             "python": sys.version.split()[0]},
                "calls": args.calls,
                "reps": args.reps,
                "warmup": args.warmup,
                "eps": EPS,
                "unit": "host microseconds per call, median of reps",
                "results": results,
            }, f, indent=2)

    # The table: µs per call, then unibuf / torch for each unibuf row.
    short = {
        "unibuf rms_norm_into": "ub norm_into",
        "unibuf rms_norm": "ub norm",
        "unibuf softmax_into": "ub smax_into",
        "torch-interop rms_norm": "interop",
        "torch F.rms_norm": "F.rms_norm",
        "torch softmax(out=)": "softmax",
        "torch add(out=)": "add",
    }
    print()
    print(f"host µs per call ({device_name}, {args.device}); ratios: unibuf / torch "
          "(norm rows vs F.rms_norm, softmax_into vs torch softmax)")
    head = f"{'dtype':<8} {'shape':<10}" + "".join(f"{short[n]:>13}" for n in ALL_ROWS) + \
        "".join(f"{r:>13}" for r in ("norm_into/F", "norm/F", "smax/smax", "interop/F"))
    print(head)
    print("-" * len(head))
    for row in table:
        t = row["ops"]
        ratios = [row["ratios"][f"{n} / {p}"] for n, p in UNIBUF_ROWS]
        print(f"{row['dtype']:<8} {'x'.join(map(str, row['shape'])):<10}"
              + "".join(f"{t[n]['us']:>13.2f}" for n in ALL_ROWS)
              + "".join(f"{r:>12.2f}x" for r in ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
