//! `unibuf bench matmul`: `ops::matmul` (cuBLAS or the `gemm` crate, run as external work) at
//! prefill and decode shapes, and the host cost of running it through `Queue::external`.
//!
//! Products: f16 and bf16 at 4096 x 4096 x 4096 (both layouts of `b`) and at decode shapes,
//! `m` = 1, 4 and 16 rows against a linear layer's weight `[n, k]` of 4096 x 4096 and
//! 14336 x 4096 (an up-projection) and 4096 x 14336 (the down-projection). Each case is timed
//! as `--samples` samples of back-to-back products, from the first submission to the end of a
//! drain, after a warm-up; the median sample is reported, per product, with the TFLOP/s it
//! makes (2·m·n·k flops) and the GB/s of the bytes it must move once (a, b and out). The
//! number of products per sample adapts so that a sample takes about 50 ms (at most `--iters`).
//!
//! Overhead: `--calls` back-to-back tiny products (16 x 16 x 16 f16) timed on the host, no
//! drain inside the timing, the median of 7 samples: `ops::matmul_into` (checks, the epochs'
//! bookkeeping, `Queue::external`, `cublasSetStream` and `cublasGemmEx`), `Queue::external`
//! with an empty closure (unibuf's part alone) and, on CUDA, a bare `cublasGemmEx` on the same
//! stream with a handle of its own (the floor).
//!
//! The peer is `bench/peers/matmul_torch.py`: the same cases through `torch.matmul`, printing
//! the same columns.

use crate::load::json_str;
use crate::{Context, Failure};
use std::io::Write;
use std::time::Instant;
use unibuf::ops;
use unibuf::{Buffer, DType, Device, Queue, StorageMode};

/// Options of `unibuf bench matmul`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The backend (default: $UNIBUF_BACKEND, else the best found).
    #[arg(long)]
    backend: Option<String>,
    /// The most products per sample (fewer when a sample would pass about 50 ms).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    iters: u32,
    /// Samples per case (the median is reported).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    samples: u32,
    /// Back-to-back tiny products per sample of the overhead rows.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    calls: u32,
    /// Small shapes (a smoke run that finishes in seconds on the CPU backend).
    #[arg(long)]
    small: bool,
    /// Only the cases whose names contain this (e.g. "m=1 ").
    #[arg(long)]
    only: Option<String>,
    /// Also write the rows as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

/// `b` as `[k, n]` (`a @ b`) or as a linear layer's `[n, k]` (`a @ b.T`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    KxN,
    NxK,
}

impl Layout {
    fn name(self) -> &'static str {
        match self {
            Layout::KxN => "a@b",
            Layout::NxK => "a@b.T",
        }
    }
}

/// One case: a product of `m x k` by `k x n` in `dtype`, `b` stored as `layout` says.
#[derive(Clone, Debug)]
struct Case {
    name: String,
    dtype: DType,
    layout: Layout,
    m: usize,
    n: usize,
    k: usize,
}

/// The cases, as the peer script lists them.
fn cases(small: bool) -> Vec<Case> {
    let (square, hidden, ffn) = if small {
        (256, 512, 1792)
    } else {
        (4096, 4096, 14336)
    };
    let mut shapes = vec![
        ("prefill", Layout::KxN, square, square, square),
        ("prefill", Layout::NxK, square, square, square),
    ];
    for m in [1, 4, 16] {
        shapes.push(("decode qkv/o", Layout::NxK, m, hidden, hidden));
        shapes.push(("decode up", Layout::NxK, m, ffn, hidden));
        shapes.push(("decode down", Layout::NxK, m, hidden, ffn));
    }
    let mut out = Vec::new();
    for dtype in [DType::F16, DType::BF16] {
        for &(what, layout, m, n, k) in &shapes {
            out.push(Case {
                name: format!("{what} {dtype} m={m} n={n} k={k}"),
                dtype,
                layout,
                m,
                n,
                k,
            });
        }
    }
    out
}

/// A buffer of `shape` in `dtype` holding random values in [-1, 1) from `seed`.
fn random(
    dev: &Device,
    label: &str,
    dtype: DType,
    shape: &[usize],
    seed: u64,
) -> unibuf::Result<Buffer> {
    let n: usize = shape.iter().product();
    let mut rng = crate::rng::SplitMix64(seed);
    match dtype {
        DType::F16 => {
            let v: Vec<half::f16> = (0..n)
                .map(|_| half::f16::from_f32(rng.symmetric()))
                .collect();
            dev.from_slice(label, &v, shape)
        }
        DType::BF16 => {
            let v: Vec<half::bf16> = (0..n)
                .map(|_| half::bf16::from_f32(rng.symmetric()))
                .collect();
            dev.from_slice(label, &v, shape)
        }
        _ => {
            let v: Vec<f32> = (0..n).map(|_| rng.symmetric()).collect();
            dev.from_slice(label, &v, shape)
        }
    }
}

fn product_into(q: &Queue, c: &Case, a: &Buffer, b: &Buffer, out: &Buffer) -> unibuf::Result<()> {
    match c.layout {
        Layout::KxN => ops::matmul_into(q, a, b, out),
        Layout::NxK => ops::matmul_bt_into(q, a, b, out),
    }
    .map(drop)
}

/// One measured case.
struct Row {
    case: Case,
    us: f64,
    per_sample: u32,
}

impl Row {
    fn tflops(&self) -> f64 {
        2.0 * (self.case.m * self.case.n * self.case.k) as f64 / self.us / 1e6
    }
    fn gbps(&self) -> f64 {
        let c = &self.case;
        ((c.m * c.k + c.k * c.n + c.m * c.n) * c.dtype.size()) as f64 / self.us / 1e3
    }
}

/// The median seconds per product of `c`: samples of back-to-back products, each from the first
/// submission to the end of a drain, after warm-up products and a sizing run of 10.
fn time_case(dev: &Device, args: &Args, c: &Case) -> Result<(f64, u32), Failure> {
    let b_shape = match c.layout {
        Layout::KxN => [c.k, c.n],
        Layout::NxK => [c.n, c.k],
    };
    let a = random(dev, "a", c.dtype, &[c.m, c.k], 1).context("uploading a")?;
    let b = random(dev, "b", c.dtype, &b_shape, 2).context("uploading b")?;
    let out = dev
        .alloc_labelled("out", c.dtype, &[c.m, c.n], StorageMode::Auto)
        .context("allocating the output")?;
    let q = dev.queue();
    dev.drain().context("uploading the inputs")?;
    // Warm-up: the first products of a shape pay for the library's first-use work (cuBLAS's
    // handle, its heuristics for the shape, kernel loading), so they only warm.
    for _ in 0..3 {
        product_into(&q, c, &a, &b, &out).context(&c.name)?;
    }
    dev.drain().context(&c.name)?;
    // Sizing: 10 products, warm, give the samples' length.
    let t = Instant::now();
    for _ in 0..10 {
        product_into(&q, c, &a, &b, &out).context(&c.name)?;
    }
    dev.drain().context(&c.name)?;
    let each = t.elapsed().as_secs_f64() / 10.0;
    let per_sample = ((0.05 / each.max(1e-9)) as u32).clamp(1, args.iters);
    let mut times = Vec::with_capacity(args.samples as usize);
    for _ in 0..args.samples {
        let t = Instant::now();
        for _ in 0..per_sample {
            product_into(&q, c, &a, &b, &out).context(&c.name)?;
        }
        dev.drain().context(&c.name)?;
        times.push(t.elapsed().as_secs_f64() / f64::from(per_sample));
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], per_sample))
}

/// The median host nanoseconds per call of `calls` back-to-back calls of `op` (drained between
/// samples, untimed), over 7 samples after a warm-up sample.
fn host_ns_per_call(
    dev: &Device,
    calls: u32,
    mut op: impl FnMut() -> Result<(), Failure>,
) -> Result<f64, Failure> {
    let mut times = Vec::new();
    for sample in 0..8 {
        let t = Instant::now();
        for _ in 0..calls {
            op()?;
        }
        let ns = t.elapsed().as_nanos() as f64 / f64::from(calls);
        dev.drain().context("draining the overhead sample")?;
        if sample > 0 {
            times.push(ns);
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// The overhead rows: (what, ns per call).
fn overhead(dev: &Device, calls: u32) -> Result<Vec<(&'static str, f64)>, Failure> {
    let t = 16;
    let a = random(dev, "a", DType::F16, &[t, t], 3).context("uploading a")?;
    let b = random(dev, "b", DType::F16, &[t, t], 4).context("uploading b")?;
    let out = dev
        .alloc_labelled("out", DType::F16, &[t, t], StorageMode::Auto)
        .context("allocating the output")?;
    let q = dev.queue();
    dev.drain().context("uploading the inputs")?;
    let mut rows = Vec::new();
    #[cfg(feature = "cuda")]
    if dev.info().backend == "cuda" {
        let ns = bare::cublas_ns_per_call(dev, &q, (&a, &b, &out), t, calls)?;
        rows.push(("bare cublasGemmEx (same stream)", ns));
    }
    let ns = host_ns_per_call(dev, calls, || {
        ops::matmul_into(&q, &a, &b, &out)
            .map(drop)
            .context("matmul_into")
    })?;
    rows.push(("ops::matmul_into", ns));
    let ns = host_ns_per_call(dev, calls, || {
        q.external(&[&a, &b], &[&out], |_| Ok(()))
            .map(drop)
            .context("Queue::external")
    })?;
    rows.push(("Queue::external, empty closure", ns));
    Ok(rows)
}

#[cfg(feature = "cuda")]
mod bare {
    //! A bare cuBLAS call on the queue's own stream, with a handle of its own: the floor the op's
    //! host cost is compared with.

    use super::host_ns_per_call;
    use crate::{Context, Failure};
    use cudarc::cublas::sys as cublas;
    use cudarc::driver::sys as cu;
    use std::ffi::c_void;
    use unibuf::interop::{NativeBuffer, NativeDevice, NativeQueue};
    use unibuf::{Buffer, Device, Queue};

    fn ok(s: cublas::cublasStatus_t, call: &str) -> Result<(), Failure> {
        if s == cublas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            Ok(())
        } else {
            Err(Failure::new(format!("{call} returned {s:?}")))
        }
    }

    fn ptr(b: &Buffer) -> Result<u64, Failure> {
        match b.native().context("native buffer")? {
            NativeBuffer::Cuda { device_ptr, .. } => Ok(device_ptr),
            other => Err(Failure::new(format!("not a CUDA buffer: {other:?}"))),
        }
    }

    /// Host ns per bare `cublasGemmEx` of the `t x t x t` f16 product `out = a @ b`.
    pub fn cublas_ns_per_call(
        dev: &Device,
        q: &Queue,
        (a, b, out): (&Buffer, &Buffer, &Buffer),
        t: usize,
        calls: u32,
    ) -> Result<f64, Failure> {
        let NativeDevice::Cuda { context, .. } = dev.native() else {
            return Err(Failure::new("not a CUDA device"));
        };
        let NativeQueue::Cuda { stream } = q.native().context("native queue")? else {
            return Err(Failure::new("not a CUDA queue"));
        };
        let (pa, pb, po) = (ptr(a)?, ptr(b)?, ptr(out)?);
        let mut handle: cublas::cublasHandle_t = std::ptr::null_mut();
        // SAFETY: the device's own context (the one unibuf keeps current) made current, a
        // valid out-pointer; the handle is destroyed below, after the device is drained.
        unsafe {
            if cu::cuCtxSetCurrent(context.as_ptr().cast()) != cu::CUresult::CUDA_SUCCESS {
                return Err(Failure::new("cuCtxSetCurrent failed"));
            }
            ok(cublas::cublasCreate_v2(&mut handle), "cublasCreate_v2")?;
        }
        let t = t as i32;
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: a live handle and the queue's stream; the buffers outlive the calls (drained
        // before this returns) and hold t*t f16 each; out overlaps neither input. These calls
        // bypass unibuf's epochs, which is what they measure; nothing else uses the buffers.
        let gemm = || unsafe {
            ok(
                cublas::cublasGemmEx(
                    handle,
                    cublas::cublasOperation_t::CUBLAS_OP_N,
                    cublas::cublasOperation_t::CUBLAS_OP_N,
                    t,
                    t,
                    t,
                    (&alpha as *const f32).cast(),
                    pb as *const c_void,
                    cublas::cudaDataType::CUDA_R_16F,
                    t,
                    pa as *const c_void,
                    cublas::cudaDataType::CUDA_R_16F,
                    t,
                    (&beta as *const f32).cast(),
                    po as *mut c_void,
                    cublas::cudaDataType::CUDA_R_16F,
                    t,
                    cublas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                ),
                "cublasGemmEx",
            )
        };
        // SAFETY: as above.
        let result = unsafe {
            ok(
                cublas::cublasSetStream_v2(handle, stream.as_ptr().cast()),
                "cublasSetStream_v2",
            )
        }
        .and_then(|()| host_ns_per_call(dev, calls, gemm));
        let drained = dev.drain().context("draining the bare calls");
        // SAFETY: the handle's work is drained; it is not used again.
        unsafe { cublas::cublasDestroy_v2(handle) };
        drained?;
        result
    }
}

/// Runs the benchmark and prints its table.
pub fn run(args: &Args, out: &mut dyn Write) -> Result<(), Failure> {
    let (dev, how) = crate::open_device(args.backend.as_deref())?;
    let info = dev.info().clone();
    writeln!(
        out,
        "unibuf bench matmul on {} ({} backend, {how}); median of {} samples of back-to-back \
         products (at most {} per sample, about 50 ms)",
        info.name, info.backend, args.samples, args.iters
    )?;
    writeln!(
        out,
        "{:<44} {:>6} {:>11} {:>9} {:>8}",
        "case", "layout", "µs", "TFLOP/s", "GB/s"
    )?;
    let mut rows = Vec::new();
    for case in cases(args.small) {
        if !args.only.as_deref().is_none_or(|o| case.name.contains(o)) {
            continue;
        }
        let (s, per_sample) = time_case(&dev, args, &case)?;
        let row = Row {
            case,
            us: s * 1e6,
            per_sample,
        };
        writeln!(
            out,
            "{:<44} {:>6} {:>11.2} {:>9.2} {:>8.0}",
            row.case.name,
            row.case.layout.name(),
            row.us,
            row.tflops(),
            row.gbps()
        )?;
        rows.push(row);
    }
    writeln!(
        out,
        "µs per product (back-to-back, drained); TFLOP/s: 2·m·n·k; GB/s: a, b and out once"
    )?;
    let overhead = overhead(&dev, args.calls)?;
    writeln!(
        out,
        "host overhead: {} back-to-back 16x16x16 f16 products, median of 7 samples",
        args.calls
    )?;
    for (what, ns) in &overhead {
        writeln!(out, "{what:<44} {ns:>9.0} ns per call")?;
    }
    if let Some(path) = &args.json {
        let mut json = format!(
            "{{\"device\":{},\"backend\":{},\"samples\":{},\"rows\":[",
            json_str(&info.name),
            json_str(info.backend),
            args.samples
        );
        for (i, r) in rows.iter().enumerate() {
            let c = &r.case;
            json.push_str(&format!(
                "{}{{\"case\":{},\"dtype\":\"{}\",\"layout\":\"{}\",\"m\":{},\"n\":{},\"k\":{},\
                 \"us\":{:.3},\"tflops\":{:.3},\"gbps\":{:.1},\"per_sample\":{}}}",
                if i == 0 { "" } else { "," },
                json_str(&c.name),
                c.dtype,
                c.layout.name(),
                c.m,
                c.n,
                c.k,
                r.us,
                r.tflops(),
                r.gbps(),
                r.per_sample
            ));
        }
        json.push_str("],\"overhead_ns_per_call\":{");
        for (i, (what, ns)) in overhead.iter().enumerate() {
            json.push_str(&format!(
                "{}{}:{ns:.1}",
                if i == 0 { "" } else { "," },
                json_str(what)
            ));
        }
        json.push_str("}}\n");
        std::fs::write(path, json)
            .map_err(|e| Failure::new(format!("writing {}: {e}", path.display())))?;
    }
    Ok(())
}
