//! `unibuf bench kernels`: the fused ops at inference sizes, each beside the memory bandwidth
//! the device's own copy reaches in the same run.
//!
//! Two passes over the cases, each launched `--iters` times after warm-up launches:
//! - on a device opened with `gpu_timing(true)`, on a queue labelled with the case's name: the
//!   device time per launch (the mean of the submissions' device times: timing events around
//!   each one on CUDA) and the CPU time per launch (their mean encode time: the op's launch
//!   overhead);
//! - on a device without timing events: the time per launch of `--iters` back-to-back launches,
//!   from the first launch to the end of a drain, which is how the PyTorch peer measures (CUDA
//!   events around back-to-back calls) and what the GB/s column uses.
//!
//! The effective bandwidth counts the bytes an op must move at least once (inputs read, outputs
//! written); the ceiling is the driver's device-to-device copy of 1 GiB (read + write) on CUDA, a
//! host memcpy on the CPU. The peer measurement is `bench/peers/torch_kernels.py`.

use crate::load::json_str;
use crate::{Context, Failure};
use std::io::Write;
use unibuf::ops::{self, GgmlMatrix, Q4Matrix, RopeStyle, Sampling};
use unibuf::weights::gguf::GgmlType;
use unibuf::{Buffer, DType, Device, Element, Fence, Queue, StorageMode};

/// Options of `unibuf bench kernels`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The backend (default: $UNIBUF_BACKEND, else the best found).
    #[arg(long)]
    backend: Option<String>,
    /// Timed launches per case (after 3 warm-up launches).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    iters: u32,
    /// Small shapes (a smoke run that finishes in seconds on the CPU backend).
    #[arg(long)]
    small: bool,
    /// Only the cases whose names contain this (e.g. "rms_norm").
    #[arg(long)]
    only: Option<String>,
    /// Also write the rows as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

/// One measured case.
struct Row {
    name: String,
    bytes: u64,
    device_us: Option<f64>,
    encode_us: f64,
    back_to_back_us: f64,
}

type Launch<'a> = Box<dyn Fn(&Queue) -> unibuf::Result<Fence> + 'a>;

/// A case: its name, the bytes it moves at least once, and how to launch it once.
struct Case<'a> {
    name: String,
    bytes: u64,
    launch: Launch<'a>,
}

/// Random values in [-2, 2) from a fixed seed: the figures do not depend on the values, only
/// NaN-free non-trivial inputs are needed.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = crate::rng::SplitMix64(seed);
    (0..n).map(|_| 2.0 * rng.symmetric()).collect()
}

fn filled<T: Element>(
    dev: &Device,
    label: &str,
    shape: &[usize],
    seed: u64,
    conv: impl Fn(f32) -> T,
) -> unibuf::Result<Buffer> {
    let n = shape.iter().product();
    let data: Vec<T> = values(n, seed).into_iter().map(conv).collect();
    dev.from_slice(label, &data, shape)
}

fn half(v: f32) -> half::f16 {
    half::f16::from_f32(v)
}

fn bf16(v: f32) -> half::bf16 {
    half::bf16::from_f32(v)
}

/// The shapes: full inference sizes, or small ones for a smoke run.
struct Sizes {
    rows: usize,
    hidden: usize,
    ffn: usize,
    vocab: usize,
    heads: usize,
    head_dim: usize,
    q4: Vec<(usize, usize)>,
}

impl Sizes {
    fn new(small: bool) -> Sizes {
        if small {
            Sizes {
                rows: 16,
                hidden: 512,
                ffn: 1408,
                vocab: 4099,
                heads: 4,
                head_dim: 64,
                q4: vec![(256, 512)],
            }
        } else {
            Sizes {
                rows: 8192,
                hidden: 8192,
                ffn: 14336,
                vocab: 128_256,
                heads: 32,
                head_dim: 128,
                q4: vec![(8192, 8192), (14336, 4096), (4096, 14336), (28672, 8192)],
            }
        }
    }
}

fn cases<'a>(dev: &Device, z: &Sizes) -> unibuf::Result<Vec<Case<'a>>> {
    let mut cases: Vec<Case<'a>> = Vec::new();
    let (rows, hidden) = (z.rows, z.hidden);
    let n = (rows * hidden) as u64;
    // RMSNorm in each storage dtype, then fused with the residual add.
    for (dtype, name) in [
        (DType::F16, "f16"),
        (DType::BF16, "bf16"),
        (DType::F32, "f32"),
    ] {
        let (x, w) = match dtype {
            DType::F16 => (
                filled(dev, "x", &[rows, hidden], 1, half)?,
                filled(dev, "w", &[hidden], 2, half)?,
            ),
            DType::BF16 => (
                filled(dev, "x", &[rows, hidden], 1, bf16)?,
                filled(dev, "w", &[hidden], 2, bf16)?,
            ),
            _ => (
                filled(dev, "x", &[rows, hidden], 1, |v| v)?,
                filled(dev, "w", &[hidden], 2, |v| v)?,
            ),
        };
        let out = dev.alloc_labelled("out", dtype, &[rows, hidden], StorageMode::Auto)?;
        let size = dtype.size() as u64;
        cases.push(Case {
            name: format!("rms_norm {name} {rows}x{hidden}"),
            bytes: 2 * n * size + hidden as u64 * size,
            launch: Box::new(move |q| ops::rms_norm_into(q, &x, &w, 1e-6, &out)),
        });
    }
    {
        let x = filled(dev, "x", &[rows, hidden], 3, half)?;
        let r = filled(dev, "residual", &[rows, hidden], 4, half)?;
        let w = filled(dev, "w", &[hidden], 5, half)?;
        let normed =
            dev.alloc_labelled("normed", DType::F16, &[rows, hidden], StorageMode::Auto)?;
        let sum = dev.alloc_labelled("sum", DType::F16, &[rows, hidden], StorageMode::Auto)?;
        cases.push(Case {
            name: format!("rms_norm+residual f16 {rows}x{hidden}"),
            bytes: 4 * n * 2 + hidden as u64 * 2,
            launch: Box::new(move |q| {
                ops::rms_norm_residual_into(q, &x, &r, &w, 1e-6, &normed, &sum)
            }),
        });
    }
    // Softmax: attention-sized rows in f16, decode logits in f32.
    {
        let x = filled(dev, "scores", &[rows, hidden], 6, half)?;
        let out = dev.alloc_labelled("probs", DType::F16, &[rows, hidden], StorageMode::Auto)?;
        cases.push(Case {
            name: format!("softmax f16 {rows}x{hidden}"),
            bytes: 2 * n * 2,
            launch: Box::new(move |q| ops::softmax_into(q, &x, &out)),
        });
        let batch = 32;
        let logits = filled(dev, "logits", &[batch, z.vocab], 7, |v| v * 4.0)?;
        let out = dev.alloc_labelled("probs", DType::F32, &[batch, z.vocab], StorageMode::Auto)?;
        cases.push(Case {
            name: format!("softmax f32 {batch}x{}", z.vocab),
            bytes: 2 * (batch * z.vocab) as u64 * 4,
            launch: Box::new(move |q| ops::softmax_into(q, &logits, &out)),
        });
    }
    // SwiGLU over a prefill's FFN activations.
    {
        let tokens = (rows / 4).max(1);
        let shape = [tokens, z.ffn];
        let gate = filled(dev, "gate", &shape, 8, half)?;
        let up = filled(dev, "up", &shape, 9, half)?;
        let out = dev.alloc_labelled("act", DType::F16, &shape, StorageMode::Auto)?;
        cases.push(Case {
            name: format!("swiglu f16 {tokens}x{}", z.ffn),
            bytes: 3 * (tokens * z.ffn) as u64 * 2,
            launch: Box::new(move |q| ops::swiglu_into(q, &gate, &up, &out)),
        });
    }
    // Rotary embedding of a prefill's queries.
    {
        let tokens = (rows / 2).max(1);
        let shape = [tokens, z.heads, z.head_dim];
        let x = filled(dev, "q", &shape, 10, half)?;
        let positions: Vec<u32> = (0..tokens as u32).collect();
        let pos = dev.from_slice("positions", &positions, &[tokens])?;
        let out = dev.alloc_labelled("q_rot", DType::F16, &shape, StorageMode::Auto)?;
        let elems = (tokens * z.heads * z.head_dim) as u64;
        cases.push(Case {
            name: format!("rope neox f16 {tokens}x{}x{}", z.heads, z.head_dim),
            bytes: 2 * elems * 2 + tokens as u64 * 4,
            launch: Box::new(move |q| {
                ops::rope_into(q, &x, &pos, 500_000.0, RopeStyle::Neox, &out)
            }),
        });
    }
    // The 4-bit matvec of a decode step (batch 1), weight bytes only in the count; beside it the
    // integer path on x quantised beforehand (the quantisation is shared by every matrix that
    // reads x, so it is timed once, below).
    for &(out_rows, cols) in &z.q4 {
        let group = 64;
        let weights = values(out_rows * cols, 11);
        let m = Q4Matrix::quantize(dev, "w_q4", &weights, out_rows, cols, group)?;
        drop(weights);
        let x = filled(dev, "x", &[cols], 12, half)?;
        let xq = ops::quantize_activations(&dev.queue(), &x)?;
        let y = dev.alloc_labelled("y", DType::F32, &[out_rows], StorageMode::Auto)?;
        let weight_bytes = (out_rows * cols / 2 + out_rows * (cols / group) * 2) as u64;
        let (m_q8, y_q8) = (m.clone(), y.clone());
        cases.push(Case {
            name: format!("q4 matvec {out_rows}x{cols} g{group}"),
            bytes: weight_bytes,
            launch: Box::new(move |q| ops::q4_matvec_into(q, &m, &x, &y)),
        });
        cases.push(Case {
            name: format!("q4 matvec q8 {out_rows}x{cols} g{group}"),
            bytes: weight_bytes,
            launch: Box::new(move |q| ops::q4_matvec_q8_into(q, &m_q8, &xq, &y_q8)),
        });
    }
    // The GGUF block formats read natively (a decode step of a GGUF model, batch 1): random
    // blocks with small f16 scales, weight bytes only in the count.
    for &(out_rows, cols) in &z.q4 {
        for (ty, block_bytes) in [
            (GgmlType::Q8_0, 34usize),
            (GgmlType::Q4_0, 18),
            (GgmlType::Q4_1, 20),
        ] {
            let row_bytes = cols / 32 * block_bytes;
            let mut bytes: Vec<u8> = (0..out_rows * row_bytes)
                .map(|i| {
                    (i as u64)
                        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                        .rotate_left(17) as u8
                })
                .collect();
            // Finite scales (and Q4_1 offsets): f16 0.01 (0x211f) at the start of each block.
            for blk in bytes.chunks_exact_mut(block_bytes) {
                blk[..2].copy_from_slice(&0x211fu16.to_le_bytes());
                if ty == GgmlType::Q4_1 {
                    blk[2..4].copy_from_slice(&0x211fu16.to_le_bytes());
                }
            }
            let w = dev.from_slice("w_ggml", &bytes, &[out_rows, row_bytes])?;
            drop(bytes);
            let m = GgmlMatrix::new(w, ty, out_rows, cols)?;
            let x = filled(dev, "x", &[cols], 15, half)?;
            let y = dev.alloc_labelled("y", DType::F32, &[out_rows], StorageMode::Auto)?;
            cases.push(Case {
                name: format!("ggml matvec {} {out_rows}x{cols}", ty.name()),
                bytes: (out_rows * row_bytes) as u64,
                launch: Box::new(move |q| ops::ggml_matvec_into(q, &m, &x, &y)),
            });
        }
    }
    // The int8 quantisation of a decode step's f16 activations: x read, values, scales and
    // block sums written.
    {
        let n = z.hidden;
        let x = filled(dev, "x", &[n], 14, half)?;
        let xq = ops::Q8Activations::alloc(dev, "x_q8", &[n])?;
        cases.push(Case {
            name: format!("quantize q8 {n}"),
            bytes: (n * 2 + n + n / ops::Q8_BLOCK * 8) as u64,
            launch: Box::new(move |q| ops::quantize_activations_into(q, &x, &xq)),
        });
    }
    // Sampling a decode step's logits on the device.
    for batch in [1usize, 8] {
        let logits = filled(dev, "logits", &[batch, z.vocab], 13, |v| v * 4.0)?;
        let out = dev.alloc_labelled("tokens", DType::U32, &[batch], StorageMode::Auto)?;
        let s = Sampling {
            temperature: 0.7,
            top_k: 50,
            top_p: 0.9,
            seed: 42,
        };
        cases.push(Case {
            name: format!("sample top-k 50 top-p 0.9 {batch}x{}", z.vocab),
            bytes: (batch * z.vocab) as u64 * 4,
            launch: Box::new(move |q| ops::sample_into(q, &logits, &s, 0, &out)),
        });
    }
    Ok(cases)
}

fn open(args: &Args, gpu_timing: bool) -> Result<Device, Failure> {
    let mut b = Device::builder().gpu_timing(gpu_timing);
    if let Some(name) = &args.backend {
        b = b.backend(name);
    }
    b.open().context("opening the device")
}

fn selected(args: &Args, case: &Case<'_>) -> bool {
    args.only.as_deref().is_none_or(|o| case.name.contains(o))
}

/// Runs the benchmark and prints its table.
pub fn run(args: &Args, out: &mut dyn Write) -> Result<(), Failure> {
    let z = Sizes::new(args.small);
    let mut rows = Vec::new();
    // Pass 1: per-launch device and CPU times, with timing events.
    let dev = open(args, true)?;
    let warmed = dev.warm_all().context("compiling the kernels")?;
    let q = dev.queue();
    for case in cases(&dev, &z).context("preparing the inputs")? {
        if !selected(args, &case) {
            continue;
        }
        dev.drain().context("uploading the inputs")?;
        let labelled = q.labelled(&case.name);
        for _ in 0..3 {
            (case.launch)(&labelled).context(&case.name)?;
        }
        dev.drain().context(&case.name)?;
        dev.reset_submission_stats();
        for _ in 0..args.iters {
            (case.launch)(&labelled).context(&case.name)?;
        }
        dev.drain().context(&case.name)?;
        let stats = dev.submission_stats();
        let s = stats
            .get(&case.name)
            .ok_or_else(|| Failure::new(format!("no submissions counted for {}", case.name)))?;
        rows.push(Row {
            name: case.name,
            bytes: case.bytes,
            device_us: s.gpu_mean_ns().map(|ns| ns / 1e3),
            encode_us: s.encode_ns as f64 / s.count as f64 / 1e3,
            back_to_back_us: f64::NAN,
        });
    }
    let info = dev.info().clone();
    drop(dev);
    // Pass 2: back-to-back launches without timing events, and the copy ceiling.
    let dev = open(args, false)?;
    dev.warm_all().context("compiling the kernels")?;
    let mut ceiling = super::ceiling_for(&dev);
    let probe = if args.small { 16 << 20 } else { 1 << 30 };
    // A copy reads and writes every byte: twice the bytes cross the memory bus.
    let copy_gbps = ceiling
        .seconds("d2d_copy", probe, 5)
        .map(|s| 2.0 * probe as f64 / s / 1e9);
    let q = dev.queue();
    let mut row = rows.iter_mut();
    for case in cases(&dev, &z).context("preparing the inputs")? {
        if !selected(args, &case) {
            continue;
        }
        let r = row
            .next()
            .ok_or_else(|| Failure::new("the passes prepared different cases"))?;
        dev.drain().context("uploading the inputs")?;
        for _ in 0..3 {
            (case.launch)(&q).context(&case.name)?;
        }
        dev.drain().context(&case.name)?;
        let started = std::time::Instant::now();
        for _ in 0..args.iters {
            (case.launch)(&q).context(&case.name)?;
        }
        dev.drain().context(&case.name)?;
        r.back_to_back_us = started.elapsed().as_secs_f64() * 1e6 / f64::from(args.iters);
    }
    writeln!(
        out,
        "unibuf bench kernels on {} ({} backend): {} pipelines warmed; {} launches per case \
         after 3 warm-up launches",
        info.name, info.backend, warmed, args.iters
    )?;
    match copy_gbps {
        Some(c) => writeln!(
            out,
            "memory bandwidth ceiling: {} d2d copy of {} MiB, {c:.0} GB/s (read + write)",
            ceiling.name(),
            probe >> 20
        )?,
        None => writeln!(out, "memory bandwidth ceiling: not measured")?,
    }
    writeln!(
        out,
        "{:<40} {:>11} {:>11} {:>9} {:>8} {:>11}",
        "op", "b2b µs", "device µs", "GB/s", "of copy", "CPU µs"
    )?;
    for r in &rows {
        let gbps = r.bytes as f64 / r.back_to_back_us / 1e3;
        writeln!(
            out,
            "{:<40} {:>11.1} {:>11} {:>9.0} {:>8} {:>11.2}",
            r.name,
            r.back_to_back_us,
            r.device_us
                .map_or_else(|| "-".to_owned(), |u| format!("{u:.1}")),
            gbps,
            copy_gbps.map_or_else(|| "-".to_owned(), |c| format!("{:.0}%", 100.0 * gbps / c)),
            r.encode_us
        )?;
    }
    writeln!(
        out,
        "b2b: per launch over back-to-back launches (no timing events); device: mean of each \
         launch's timing events; GB/s (from b2b): the bytes each op must move once (inputs read, \
         outputs written; q4: weight bytes); CPU: encode time per launch"
    )?;
    if let Some(path) = &args.json {
        let mut json = format!(
            "{{\"device\":{},\"backend\":{},\"iters\":{},\"copy_gbps\":{},\"rows\":[",
            json_str(&info.name),
            json_str(info.backend),
            args.iters,
            copy_gbps.map_or_else(|| "null".to_owned(), |c| format!("{c:.2}"))
        );
        for (i, r) in rows.iter().enumerate() {
            json.push_str(&format!(
                "{}{{\"op\":{},\"bytes\":{},\"back_to_back_us\":{:.3},\"device_us\":{},\"encode_us\":{:.3}}}",
                if i == 0 { "" } else { "," },
                json_str(&r.name),
                r.bytes,
                r.back_to_back_us,
                r.device_us
                    .map_or_else(|| "null".to_owned(), |u| format!("{u:.3}")),
                r.encode_us
            ));
        }
        json.push_str("]}\n");
        std::fs::write(path, json)
            .map_err(|e| Failure::new(format!("writing {}: {e}", path.display())))?;
    }
    Ok(())
}
