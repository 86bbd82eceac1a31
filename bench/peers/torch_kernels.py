#!/usr/bin/env python3
"""PyTorch's versions of unibuf's fused ops on this GPU, beside `unibuf bench kernels`.

The same cases and shapes as `unibuf bench kernels` (full sizes): for each, PyTorch's fused op
where it has one (F.rms_norm, softmax) and the composed eager ops an engine would otherwise
write, timed with CUDA events over `--iters` back-to-back launches after warm-up (device time
per op, including every kernel the composed form launches), plus the host time per call.

The q4 matvec has no PyTorch equivalent for this layout; the peer is the composed dequantise
(unpack nibbles, scale) + f16 matvec, and the f16 matvec alone on pre-dequantised weights
(which reads 4x the bytes). Sampling is topk + softmax + cumsum mask + multinomial.

    python3 bench/peers/torch_kernels.py [--iters 50] [--only rms_norm]
"""
import argparse
import time

import torch
import torch.nn.functional as F


def time_op(fn, iters):
    """(device µs per call, host µs per call) over `iters` calls after 3 warm-up calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    t = time.perf_counter()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    host = (time.perf_counter() - t) / iters
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters, host * 1e6


def rms_norm_composed(x, w, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--only", default=None)
    args = ap.parse_args()
    dev = "cuda"
    torch.manual_seed(0)
    rows, hidden, ffn, vocab, heads, head_dim = 8192, 8192, 14336, 128256, 32, 128
    cases = []

    for dt, name in [(torch.float16, "f16"), (torch.bfloat16, "bf16"), (torch.float32, "f32")]:
        x = torch.randn(rows, hidden, device=dev, dtype=dt)
        w = torch.randn(hidden, device=dev, dtype=dt)
        size = x.element_size()
        cases.append((f"rms_norm {name} {rows}x{hidden}", "F.rms_norm", 2 * x.numel() * size,
                      lambda x=x, w=w: F.rms_norm(x, (hidden,), w, 1e-6)))
        cases.append((f"rms_norm {name} {rows}x{hidden}", "composed", 2 * x.numel() * size,
                      lambda x=x, w=w: rms_norm_composed(x, w, 1e-6)))

    x = torch.randn(rows, hidden, device=dev, dtype=torch.float16)
    r = torch.randn(rows, hidden, device=dev, dtype=torch.float16)
    w = torch.randn(hidden, device=dev, dtype=torch.float16)

    def residual_norm(x=x, r=r, w=w):
        s = x + r
        return F.rms_norm(s, (hidden,), w, 1e-6), s

    cases.append((f"rms_norm+residual f16 {rows}x{hidden}", "add + F.rms_norm",
                  4 * x.numel() * 2, residual_norm))

    s = torch.randn(rows, hidden, device=dev, dtype=torch.float16)
    cases.append((f"softmax f16 {rows}x{hidden}", "torch.softmax", 2 * s.numel() * 2,
                  lambda s=s: torch.softmax(s, dim=-1)))
    logits = torch.randn(32, vocab, device=dev) * 4
    cases.append((f"softmax f32 32x{vocab}", "torch.softmax", 2 * logits.numel() * 4,
                  lambda l=logits: torch.softmax(l, dim=-1)))

    tokens = rows // 4
    g = torch.randn(tokens, ffn, device=dev, dtype=torch.float16)
    u = torch.randn(tokens, ffn, device=dev, dtype=torch.float16)
    cases.append((f"swiglu f16 {tokens}x{ffn}", "F.silu(g) * u", 3 * g.numel() * 2,
                  lambda g=g, u=u: F.silu(g) * u))

    tokens = rows // 2
    q = torch.randn(tokens, heads, head_dim, device=dev, dtype=torch.float16)
    pos = torch.arange(tokens, device=dev)
    inv = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2, device=dev).float() / head_dim))

    def rope(q=q, pos=pos, inv=inv):
        ang = pos[:, None].float() * inv[None, :]
        emb = torch.cat((ang, ang), dim=-1)
        cos, sin = emb.cos()[:, None, :].to(q.dtype), emb.sin()[:, None, :].to(q.dtype)
        return q * cos + rotate_half(q) * sin

    cases.append((f"rope neox f16 {tokens}x{heads}x{head_dim}", "HF composed (cos/sin each call)",
                  2 * q.numel() * 2, rope))

    group = 64
    for out_rows, cols in [(8192, 8192), (14336, 4096), (4096, 14336), (28672, 8192)]:
        packed = torch.randint(0, 256, (out_rows, cols // 2), device=dev, dtype=torch.uint8)
        scales = torch.rand(out_rows, cols // group, device=dev, dtype=torch.float16) * 0.01
        xv = torch.randn(cols, device=dev, dtype=torch.float16)
        wbytes = packed.numel() + scales.numel() * 2

        def q4_composed(packed=packed, scales=scales, xv=xv, out_rows=out_rows, cols=cols):
            lo = (packed & 0xF).to(torch.int8) - 8
            hi = (packed >> 4).to(torch.int8) - 8
            codes = torch.stack((lo, hi), dim=-1).reshape(out_rows, cols // group, group)
            wq = (codes.to(torch.float16) * scales[..., None]).reshape(out_rows, cols)
            return wq @ xv

        cases.append((f"q4 matvec {out_rows}x{cols} g{group}", "dequantise + f16 mv",
                      wbytes, q4_composed))
        wf = torch.randn(out_rows, cols, device=dev, dtype=torch.float16)
        cases.append((f"q4 matvec {out_rows}x{cols} g{group}", "f16 mv (4x the bytes)",
                      wbytes, lambda wf=wf, xv=xv: wf @ xv))

    for batch in [1, 8]:
        lg = torch.randn(batch, vocab, device=dev) * 4

        def sample(lg=lg):
            v, i = torch.topk(lg / 0.7, 50, dim=-1)
            p = torch.softmax(v, dim=-1)
            c = torch.cumsum(p, dim=-1)
            p = p.masked_fill(c - p > 0.9, 0.0)
            pick = torch.multinomial(p, 1)
            return i.gather(-1, pick)

        cases.append((f"sample top-k 50 top-p 0.9 {batch}x{vocab}",
                      "topk+softmax+cumsum+multinomial", lg.numel() * 4, sample))

    print(f"pytorch {torch.__version__} on {torch.cuda.get_device_name(0)}; "
          f"mean of {args.iters} calls per case after 3 warm-up calls")
    print(f"{'op':<40} {'pytorch form':<34} {'device µs':>10} {'GB/s':>8} {'host µs':>9}")
    for name, form, nbytes, fn in cases:
        if args.only and args.only not in name:
            continue
        dev_us, host_us = time_op(fn, args.iters)
        print(f"{name:<40} {form:<34} {dev_us:>10.1f} {nbytes / dev_us / 1e3:>8.0f} "
              f"{host_us:>9.2f}")


if __name__ == "__main__":
    main()
