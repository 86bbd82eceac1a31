//! `unibuf demo`: the runtime end to end on a tiny decoder-style stack with random weights.
//!
//! The model is a stack of SwiGLU MLP blocks with RMS norms and residual connections (no
//! attention), run one token at a time the way a decode loop runs:
//!
//! ```text
//! x = embedding[token]                                  device copy out of External memory
//! per layer:  xn = rms_norm(x) * norm                   kernel launches, stream-ordered
//!             x  = x + down * (silu(gate * xn) . (up * xn))
//! out[token] = rms_norm(x) * final_norm                 written straight into a row view
//! ```
//!
//! The weights are random, so the output means nothing as language; what the demo shows is the
//! runtime doing its job (staged and zero-copy uploads, views, the kernel registry, completion
//! epochs, the copy ledger, the caching allocator, traces) and then proves the arithmetic right
//! by comparing every output against an independent f64 evaluation on the host. Any mismatch,
//! like any runtime error, ends the command with a non-zero exit status.

use crate::demo_kernels::{Kernels, ALL as ALL_KERNELS};
use crate::{open_device, Context, Failure};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use unibuf::ledger::fmt_bytes;
use unibuf::{Buffer, DType, Device, MemoryStats, StorageMode};

/// Rows of the embedding table; token ids are drawn from it.
const VOCAB: usize = 64;
/// The RMS norm epsilon.
const EPS: f32 = 1e-5;
/// The largest accepted `max |device - reference| / max |reference|`. The device computes in
/// f32 (unit roundoff 6e-8); a few layers of dot products of a few hundred terms accumulate
/// errors around 1e-6 of the output's magnitude, so 1e-4 leaves wide margin for larger
/// shapes and other summation orders (GPU kernels) while still catching any real bug, which
/// shows up as errors of order one.
const TOLERANCE: f64 = 1e-4;

/// Options of `unibuf demo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Backend to run on: cpu, cuda or metal [default: $UNIBUF_BACKEND, else the best found]
    #[arg(long, value_name = "NAME")]
    backend: Option<String>,
    /// Write a Chrome trace (Perfetto, chrome://tracing) of the copies and submissions to FILE
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// Width of the residual stream; the MLP's inner width is twice this
    #[arg(long, value_name = "N", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..))]
    hidden: u32,
    /// Number of MLP blocks in the stack
    #[arg(long, value_name = "N", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..))]
    layers: u32,
    /// Number of tokens to decode, one after another
    #[arg(long, value_name = "N", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..))]
    tokens: u32,
    /// Seed of the random weights, inputs and token ids
    #[arg(long, value_name = "N", default_value_t = 0x5eed)]
    seed: u64,
}

/// The model's dimensions, in host units.
#[derive(Clone, Copy, Debug)]
struct Shape {
    hidden: usize,
    ffn: usize,
    layers: usize,
    tokens: usize,
}

impl Shape {
    fn new(args: &Args) -> Result<Shape, Failure> {
        // The kernels take sizes as u32, so the inner width must fit one too.
        let ffn = args.hidden.checked_mul(2).ok_or_else(|| {
            Failure::new(format!(
                "--hidden {} is too large: the MLP's inner width (2 x hidden) must fit in 32 bits",
                args.hidden
            ))
        })?;
        Ok(Shape {
            hidden: args.hidden as usize,
            ffn: ffn as usize,
            layers: args.layers as usize,
            tokens: args.tokens as usize,
        })
    }

    /// Bytes on the device and on the host, in u128 so that no flag values can overflow.
    fn footprint(&self) -> (u128, u128) {
        let (h, f, l, t) = (
            self.hidden as u128,
            self.ffn as u128,
            self.layers as u128,
            self.tokens as u128,
        );
        let weights = l * (3 * h * f + h) + h;
        let embedding = VOCAB as u128 * h;
        // Two residual buffers, the normed input, gate, up, their product, the block's output,
        // and one output row per token.
        let activations = 2 * h + h + 3 * f + h + t * h;
        let f32_bytes = 4;
        // The embedding is wrapped zero-copy, so it lives on the host only.
        let device = f32_bytes * (weights + activations);
        // Host weights, the downloaded outputs (f32) and their f64 reference.
        let host = f32_bytes * (weights + embedding + t * h) + 8 * t * h;
        (device, host)
    }
}

/// SplitMix64 (Steele, Lea and Flood, 2014): a tiny, well-mixed, seedable generator. Hand-written
/// because the demo needs reproducible noise, not cryptography, and the tool has no `rand`
/// dependency.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1). The top 24 bits make every value exactly representable in f32.
    fn symmetric(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u32 << 23) as f32 - 1.0
    }

    /// Uniform in `0..n` (`n >= 1`); the modulo bias is irrelevant for picking demo tokens.
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// `n` values `offset + scale * u` with `u` uniform in [-1, 1). The allocation is fallible
    /// so that an oversized request is an error message, not an abort.
    fn vector(&mut self, n: usize, offset: f32, scale: f32) -> Result<Vec<f32>, Failure> {
        let mut v = try_vec(n)?;
        v.extend((0..n).map(|_| offset + scale * self.symmetric()));
        Ok(v)
    }
}

/// An empty vector with room for `n` elements, or an error if the host cannot provide it.
fn try_vec<T>(n: usize) -> Result<Vec<T>, Failure> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|e| {
        Failure::new(format!(
            "allocating {n} host elements of {} bytes: {e}",
            std::mem::size_of::<T>()
        ))
    })?;
    Ok(v)
}

/// One MLP block's weights on the host (f32, row-major).
struct HostLayer {
    norm: Vec<f32>,
    /// `[ffn, hidden]`.
    gate: Vec<f32>,
    /// `[ffn, hidden]`.
    up: Vec<f32>,
    /// `[hidden, ffn]`.
    down: Vec<f32>,
}

/// Every weight and input on the host: the source of the uploads and of the reference.
struct HostModel {
    /// `[VOCAB, hidden]`, shared with the device zero-copy (the `Arc` is read-only there).
    embedding: Arc<Vec<f32>>,
    layers: Vec<HostLayer>,
    final_norm: Vec<f32>,
    token_ids: Vec<usize>,
}

impl HostModel {
    /// Random weights scaled so that activations stay of order one through the stack: matrix
    /// entries have variance 1/fan_in, norm weights lie in [0.9, 1.1], embeddings in [-1, 1).
    /// No input is ever all zeros, which would make the check vacuous.
    fn random(shape: Shape, seed: u64) -> Result<HostModel, Failure> {
        let (h, f) = (shape.hidden, shape.ffn);
        let mut rng = SplitMix64(seed);
        // Uniform [-a, a) has variance a^2 / 3.
        let in_scale = (3.0 / h as f32).sqrt();
        let out_scale = (3.0 / f as f32).sqrt();
        let mut layers = try_vec(shape.layers)?;
        for _ in 0..shape.layers {
            layers.push(HostLayer {
                norm: rng.vector(h, 1.0, 0.1)?,
                gate: rng.vector(f * h, 0.0, in_scale)?,
                up: rng.vector(f * h, 0.0, in_scale)?,
                down: rng.vector(h * f, 0.0, out_scale)?,
            });
        }
        let embedding = Arc::new(rng.vector(VOCAB * h, 0.0, 1.0)?);
        let final_norm = rng.vector(h, 1.0, 0.1)?;
        let mut token_ids = try_vec(shape.tokens)?;
        token_ids.extend((0..shape.tokens).map(|_| rng.below(VOCAB)));
        Ok(HostModel {
            embedding,
            layers,
            final_norm,
            token_ids,
        })
    }

    /// Bytes of weights (embedding included).
    fn weight_bytes(&self) -> usize {
        let layer_elems: usize = self
            .layers
            .iter()
            .map(|l| l.norm.len() + l.gate.len() + l.up.len() + l.down.len())
            .sum();
        4 * (layer_elems + self.embedding.len() + self.final_norm.len())
    }
}

/// One MLP block's weights on the device.
struct DeviceLayer {
    norm: Buffer,
    gate: Buffer,
    up: Buffer,
    down: Buffer,
}

/// The weights on the device and the activations the decode loop works in.
struct DeviceModel {
    embedding: Buffer,
    layers: Vec<DeviceLayer>,
    final_norm: Buffer,
    /// The residual stream, ping-ponged: a kernel may not write a buffer it also reads.
    x: [Buffer; 2],
    xn: Buffer,
    gate: Buffer,
    up: Buffer,
    act: Buffer,
    down: Buffer,
    /// `[tokens, hidden]`: each token's final activations, written through a row view.
    out: Buffer,
}

impl DeviceModel {
    /// Allocates everything and uploads the weights. Matrices go to Private memory (device-only:
    /// on a discrete GPU that is where they belong; the upload is staged), norm vectors and
    /// activations to Auto (Shared on unified memory, Private otherwise), and the embedding
    /// table is wrapped as External memory without copying, as a memory-mapped weights file
    /// would be. Uploads are asynchronous; one drain at the end waits for all of them.
    fn upload(dev: &Device, host: &HostModel, shape: Shape) -> Result<DeviceModel, Failure> {
        use StorageMode::{Auto, Private};
        let (h, f) = (shape.hidden, shape.ffn);
        let q = dev.queue().labelled("upload weights");
        let put = |label: &str, dims: &[usize], mode: StorageMode, data: &[f32]| {
            let b = dev
                .alloc_labelled(label, DType::F32, dims, mode)
                .context(&format!("allocating '{label}'"))?;
            q.upload_async(&b, data)
                .context(&format!("uploading '{label}'"))?;
            Ok::<Buffer, Failure>(b)
        };
        let mut layers = try_vec(shape.layers)?;
        for (i, w) in host.layers.iter().enumerate() {
            layers.push(DeviceLayer {
                norm: put(&format!("layer{i}.norm"), &[h], Auto, &w.norm)?,
                gate: put(&format!("layer{i}.gate"), &[f, h], Private, &w.gate)?,
                up: put(&format!("layer{i}.up"), &[f, h], Private, &w.up)?,
                down: put(&format!("layer{i}.down"), &[h, f], Private, &w.down)?,
            });
        }
        let final_norm = put("final_norm", &[h], Auto, &host.final_norm)?;
        let embedding = dev
            .wrap_external("embedding", host.embedding.clone(), DType::F32, &[VOCAB, h])
            .context("wrapping the embedding table")?;
        q.drain().context("waiting for the weight uploads")?;

        let scratch = |label: &str, dims: &[usize]| {
            dev.alloc_labelled(label, DType::F32, dims, Auto)
                .context(&format!("allocating '{label}'"))
        };
        Ok(DeviceModel {
            embedding,
            layers,
            final_norm,
            x: [scratch("x.0", &[h])?, scratch("x.1", &[h])?],
            xn: scratch("xn", &[h])?,
            gate: scratch("gate", &[f])?,
            up: scratch("up", &[f])?,
            act: scratch("act", &[f])?,
            down: scratch("down", &[h])?,
            out: scratch("out", &[shape.tokens, h])?,
        })
    }

    /// Runs every token through the stack. Each token waits for its own result, as a decode
    /// loop must before it can pick the next token; within a token, the launches are queued
    /// back to back and ordered by the queue alone (no host waits, no device-wide syncs).
    fn decode(
        &self,
        dev: &Device,
        kernels: &Kernels,
        token_ids: &[usize],
    ) -> Result<Latencies, Failure> {
        // Unlabelled, so each launch is named after its kernel in stats and traces.
        let q = dev.queue();
        let embed = dev.queue().labelled("embed token");
        let mut latencies = Latencies::default();
        for (t, &id) in token_ids.iter().enumerate() {
            let started = Instant::now();
            let [mut x, mut next] = [&self.x[0], &self.x[1]];
            embed
                .copy_async(&self.embedding.rows(id..id + 1)?, x)
                .context("copying the token's embedding")?;
            for layer in &self.layers {
                kernels.rms_norm(&q, x, &layer.norm, &self.xn, EPS)?;
                kernels.matvec(&q, &layer.gate, &self.xn, &self.gate)?;
                kernels.matvec(&q, &layer.up, &self.xn, &self.up)?;
                kernels.silu_mul(&q, &self.gate, &self.up, &self.act)?;
                kernels.matvec(&q, &layer.down, &self.act, &self.down)?;
                kernels.add(&q, x, &self.down, next)?;
                std::mem::swap(&mut x, &mut next);
            }
            let out_row = self.out.rows(t..t + 1)?;
            kernels.rms_norm(&q, x, &self.final_norm, &out_row, EPS)?;
            q.drain().context(&format!("decoding token {t}"))?;
            latencies.add(started.elapsed());
        }
        Ok(latencies)
    }
}

/// Per-token wall times.
#[derive(Debug, Default)]
struct Latencies {
    count: u32,
    total: Duration,
    min: Option<Duration>,
    max: Duration,
}

impl Latencies {
    fn add(&mut self, d: Duration) {
        self.count += 1;
        self.total += d;
        self.min = Some(self.min.map_or(d, |m| m.min(d)));
        self.max = self.max.max(d);
    }

    fn mean(&self) -> Duration {
        self.total / self.count.max(1)
    }
}

/// Milliseconds with three decimals.
fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

// ---- the f64 reference ------------------------------------------------------------------------

fn rms_norm_f64(x: &[f64], weight: &[f32]) -> Vec<f64> {
    let mean_square = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let scale = 1.0 / (mean_square + f64::from(EPS)).sqrt();
    x.iter()
        .zip(weight)
        .map(|(v, &w)| v * scale * f64::from(w))
        .collect()
}

/// A dot product in f64 with four independent sums: a single running sum is a chain of
/// dependent additions that runs several times slower, and the reference is the slowest part
/// of a large demo.
fn dot_f64(w: &[f32], x: &[f64]) -> f64 {
    const LANES: usize = 4;
    let mut acc = [0.0f64; LANES];
    let (w_chunks, x_chunks) = (w.chunks_exact(LANES), x.chunks_exact(LANES));
    let tail: f64 = w_chunks
        .remainder()
        .iter()
        .zip(x_chunks.remainder())
        .map(|(&a, b)| f64::from(a) * b)
        .sum();
    for (cw, cx) in w_chunks.zip(x_chunks) {
        for ((s, &a), b) in acc.iter_mut().zip(cw).zip(cx) {
            *s += f64::from(a) * b;
        }
    }
    acc.iter().sum::<f64>() + tail
}

fn matvec_f64(w: &[f32], x: &[f64]) -> Vec<f64> {
    w.chunks_exact(x.len()).map(|row| dot_f64(row, x)).collect()
}

/// The final activations of one token, computed in f64 on the host from the same f32 weights,
/// with none of the device code: an independent evaluation of the same function.
fn reference_token(host: &HostModel, hidden: usize, id: usize) -> Vec<f64> {
    let mut x: Vec<f64> = host.embedding[id * hidden..(id + 1) * hidden]
        .iter()
        .map(|&v| f64::from(v))
        .collect();
    for layer in &host.layers {
        let xn = rms_norm_f64(&x, &layer.norm);
        let gate = matvec_f64(&layer.gate, &xn);
        let up = matvec_f64(&layer.up, &xn);
        let act: Vec<f64> = gate
            .iter()
            .zip(&up)
            .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u)
            .collect();
        let down = matvec_f64(&layer.down, &act);
        for (x, d) in x.iter_mut().zip(&down) {
            *x += d;
        }
    }
    rms_norm_f64(&x, &host.final_norm)
}

/// Every token's reference output, `[tokens, hidden]`. Tokens are independent, so they are
/// spread over the host's cores; if a thread cannot be started, its tokens run on this one.
fn reference_outputs(host: &HostModel, hidden: usize) -> Result<Vec<f64>, Failure> {
    let compute = |ids: &[usize]| -> Vec<f64> {
        ids.iter()
            .flat_map(|&id| reference_token(host, hidden, id))
            .collect()
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_thread = host.token_ids.len().div_ceil(threads).max(1);
    let mut all = try_vec(host.token_ids.len() * hidden)?;
    std::thread::scope(|scope| {
        let parts: Vec<_> = host
            .token_ids
            .chunks(per_thread)
            .map(|ids| {
                std::thread::Builder::new()
                    .name("unibuf-reference".to_owned())
                    .spawn_scoped(scope, move || compute(ids))
                    .map_err(|_| ids)
            })
            .collect();
        for part in parts {
            let values = match part {
                Ok(thread) => thread
                    .join()
                    .map_err(|_| Failure::new("a reference thread panicked"))?,
                Err(ids) => compute(ids),
            };
            all.extend_from_slice(&values);
        }
        Ok(all)
    })
}

/// How closely the device's output matches the reference.
#[derive(Debug)]
struct Agreement {
    /// Elements compared.
    compared: usize,
    /// Positions where the device or the reference is NaN or infinite.
    non_finite: usize,
    max_abs_err: f64,
    max_abs_ref: f64,
}

impl Agreement {
    fn measure(device: &[f32], reference: &[f64]) -> Agreement {
        let mut a = Agreement {
            compared: device.len().min(reference.len()),
            non_finite: 0,
            max_abs_err: 0.0,
            max_abs_ref: 0.0,
        };
        for (&d, &r) in device.iter().zip(reference) {
            // f64::max ignores NaN, so non-finite values are counted, never folded in.
            if !d.is_finite() || !r.is_finite() {
                a.non_finite += 1;
                continue;
            }
            a.max_abs_err = a.max_abs_err.max((f64::from(d) - r).abs());
            a.max_abs_ref = a.max_abs_ref.max(r.abs());
        }
        a
    }

    /// The error relative to the output's magnitude.
    fn relative(&self) -> f64 {
        self.max_abs_err / self.max_abs_ref
    }

    /// Why the check fails, if it does.
    fn verdict(&self, expected: usize) -> Result<(), String> {
        if self.compared != expected {
            return Err(format!(
                "compared {} values, expected {expected}",
                self.compared
            ));
        }
        if self.non_finite > 0 {
            return Err(format!("{} values are NaN or infinite", self.non_finite));
        }
        if self.max_abs_ref == 0.0 {
            return Err("the reference is all zeros, so the comparison proves nothing".into());
        }
        if self.relative() > TOLERANCE {
            return Err(format!(
                "max |device - reference| = {:.3e} is {:.3e} of max |reference| = {:.4}, above {TOLERANCE:e}",
                self.max_abs_err,
                self.relative(),
                self.max_abs_ref
            ));
        }
        Ok(())
    }
}

// ---- the command ------------------------------------------------------------------------------

/// Writes a multi-line `Display` value indented under a heading.
fn indented(out: &mut dyn Write, text: &str) -> std::io::Result<()> {
    for line in text.lines() {
        writeln!(out, "  {line}")?;
    }
    Ok(())
}

/// Fails unless the device holds no memory: nothing live, nothing cached, nothing wrapped,
/// no staging chunks.
fn check_released(s: &MemoryStats) -> Result<(), Failure> {
    let held = [
        ("active", s.active_bytes),
        ("reserved", s.reserved_bytes),
        ("cached", s.cached_bytes),
        ("external", s.external_bytes),
        ("staging", s.staging_bytes),
    ];
    if held.iter().all(|(_, b)| *b == 0) && s.active_count == 0 {
        return Ok(());
    }
    let list: Vec<String> = held
        .iter()
        .map(|(what, b)| format!("{what} {}", fmt_bytes(*b as u64)))
        .collect();
    Err(Failure::new(format!(
        "memory was not returned after dropping every buffer and trimming: {} ({} allocations alive)",
        list.join(", "),
        s.active_count
    )))
}

/// Runs the demo, writing its report to `out`.
pub fn run(args: &Args, out: &mut dyn Write) -> Result<(), Failure> {
    let shape = Shape::new(args)?;
    let (dev, how) = open_device(args.backend.as_deref())?;
    let info = dev.info();

    let (device_bytes, host_bytes) = shape.footprint();
    // On unified memory host and device allocations come out of the same memory.
    let needed = if info.unified_memory {
        device_bytes + host_bytes
    } else {
        device_bytes
    };
    if needed > info.total_memory as u128 {
        return Err(Failure::new(format!(
            "hidden {}, layers {}, tokens {} needs about {} of memory; {} has {}",
            shape.hidden,
            shape.layers,
            shape.tokens,
            fmt_bytes(u64::try_from(needed).unwrap_or(u64::MAX)),
            info.name,
            fmt_bytes(info.total_memory as u64)
        )));
    }

    writeln!(
        out,
        "unibuf demo: {} SwiGLU MLP blocks (no attention), hidden {}, inner {}, vocab {VOCAB}, {} tokens, seed {}",
        shape.layers, shape.hidden, shape.ffn, shape.tokens, args.seed
    )?;
    writeln!(
        out,
        "random weights: the numbers are a runtime check, not a model"
    )?;
    writeln!(
        out,
        "device    {} ({} backend, chosen by {how}; {} memory)",
        info.name,
        info.backend,
        if info.unified_memory {
            "unified"
        } else {
            "discrete"
        }
    )?;

    let started = Instant::now();
    let (kernels, pipelines) = Kernels::register(&dev).context("preparing the kernels")?;
    let names: Vec<&str> = ALL_KERNELS.iter().map(|k| k.name).collect();
    writeln!(
        out,
        "kernels   {} registered and compiled ({pipelines} pipelines) in {}",
        names.join(", "),
        ms(started.elapsed())
    )?;

    let host = HostModel::random(shape, args.seed)?;
    let started = Instant::now();
    let model = DeviceModel::upload(&dev, &host, shape)?;
    let upload_time = started.elapsed();
    let first = model.layers.first();
    writeln!(
        out,
        "upload    {} of weights in {}: {} matrices {}, {} norm vectors {}, embedding {} {} (zero-copy)",
        fmt_bytes(host.weight_bytes() as u64),
        ms(upload_time),
        3 * shape.layers,
        first.map_or("-", |l| l.gate.mode().name()),
        shape.layers + 1,
        model.final_norm.mode().name(),
        fmt_bytes(model.embedding.byte_len() as u64),
        model.embedding.mode().name(),
    )?;

    let latencies = model.decode(&dev, &kernels, &host.token_ids)?;
    let launches = shape.tokens * (6 * shape.layers + 1);
    writeln!(
        out,
        "compute   {} tokens in {}: {} per token (min {}, max {}), {:.1} tokens/s; {launches} launches, {} embedding copies",
        shape.tokens,
        ms(latencies.total),
        ms(latencies.mean()),
        ms(latencies.min.unwrap_or_default()),
        ms(latencies.max),
        shape.tokens as f64 / latencies.total.as_secs_f64().max(f64::MIN_POSITIVE),
        shape.tokens
    )?;

    let started = Instant::now();
    let result: Vec<f32> = dev
        .queue()
        .labelled("download activations")
        .download(&model.out)
        .context("downloading the activations")?;
    writeln!(
        out,
        "download  {} of activations ({} mode) in {}",
        fmt_bytes((result.len() * 4) as u64),
        model.out.mode().name(),
        ms(started.elapsed())
    )?;

    let started = Instant::now();
    let reference = reference_outputs(&host, shape.hidden)?;
    let agreement = Agreement::measure(&result, &reference);
    agreement.verdict(reference.len()).map_err(|why| {
        Failure::new(format!(
            "check failed against the f64 host reference: {why}"
        ))
    })?;
    writeln!(
        out,
        "check passed: {} values match the f64 host reference (computed in {}): max |error| {:.2e}, {:.2e} of max |value| {:.3}, tolerance {TOLERANCE:e}",
        agreement.compared,
        ms(started.elapsed()),
        agreement.max_abs_err,
        agreement.relative(),
        agreement.max_abs_ref
    )?;

    writeln!(out)?;
    writeln!(out, "memory (buffers alive)")?;
    indented(out, &dev.memory_stats().to_string())?;
    writeln!(out)?;
    write!(out, "{}", dev.copy_report())?;

    if let Some(path) = &args.trace {
        dev.write_chrome_trace(path)
            .context("writing the Chrome trace")?;
        writeln!(out)?;
        writeln!(
            out,
            "trace     {} (open in https://ui.perfetto.dev or chrome://tracing)",
            path.display()
        )?;
    }

    // Everything the device holds goes back: the buffers' blocks to the cache, the External
    // region to its owner (once the copies that read it are done), then trim() releases the
    // cache and the staging chunks to the backend.
    drop(model);
    let released = dev.trim();
    let after = dev.memory_stats();
    check_released(&after)?;
    writeln!(out)?;
    writeln!(
        out,
        "released  {} to the backend; active {}, reserved {}, external {}, staging {}: all memory returned",
        fmt_bytes(released as u64),
        fmt_bytes(after.active_bytes as u64),
        fmt_bytes(after.reserved_bytes as u64),
        fmt_bytes(after.external_bytes as u64),
        fmt_bytes(after.staging_bytes as u64)
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(hidden: usize, layers: usize, tokens: usize) -> Shape {
        Shape {
            hidden,
            ffn: 2 * hidden,
            layers,
            tokens,
        }
    }

    #[test]
    fn splitmix_is_reproducible_and_symmetric() {
        let mut a = SplitMix64(7);
        let mut b = SplitMix64(7);
        let xs: Vec<f32> = (0..10_000).map(|_| a.symmetric()).collect();
        assert!(xs
            .iter()
            .all(|&x| x == b.symmetric() && (-1.0..1.0).contains(&x)));
        let mean = xs.iter().map(|&x| f64::from(x)).sum::<f64>() / xs.len() as f64;
        assert!(mean.abs() < 0.05, "mean {mean}");
        assert!(xs.iter().any(|&x| x < -0.9) && xs.iter().any(|&x| x > 0.9));
    }

    #[test]
    fn reference_of_a_one_layer_model_matches_a_hand_computation() {
        // hidden 1: every norm maps x to sign(x) * weight (up to eps).
        let host = HostModel {
            embedding: Arc::new(vec![2.0; VOCAB]),
            layers: vec![HostLayer {
                norm: vec![1.0],
                gate: vec![1.0, 0.0],
                up: vec![3.0, 1.0],
                down: vec![0.5, 7.0],
            }],
            final_norm: vec![1.5],
            token_ids: vec![0],
        };
        let xn = 2.0 / (4.0 + f64::from(EPS)).sqrt();
        let gate = xn;
        let act0 = gate / (1.0 + (-gate).exp()) * 3.0 * xn;
        let x = 2.0 + 0.5 * act0; // the second row of gate is 0, so silu(0) * up = 0
        let want = x / (x * x + f64::from(EPS)).sqrt() * 1.5;
        let got = reference_token(&host, 1, 0);
        assert!((got[0] - want).abs() < 1e-12, "{got:?} vs {want}");
    }

    #[test]
    fn parallel_reference_keeps_the_token_order() {
        let host = HostModel::random(shape(5, 2, 11), 3).expect("a small model");
        let parallel = reference_outputs(&host, 5).expect("reference");
        let serial: Vec<f64> = host
            .token_ids
            .iter()
            .flat_map(|&id| reference_token(&host, 5, id))
            .collect();
        assert_eq!(parallel, serial);
    }

    #[test]
    fn agreement_rejects_nan_zero_references_and_large_errors() {
        let r = [1.0, -2.0, 0.5];
        assert!(Agreement::measure(&[1.0, -2.0, 0.5], &r).verdict(3).is_ok());
        assert!(Agreement::measure(&[1.0, -2.0, 0.51], &r)
            .verdict(3)
            .is_err());
        assert!(Agreement::measure(&[1.0, f32::NAN, 0.5], &r)
            .verdict(3)
            .is_err());
        assert!(Agreement::measure(&[1.0, -2.0, 0.5], &[1.0, f64::NAN, 0.5])
            .verdict(3)
            .is_err());
        assert!(Agreement::measure(&[0.0; 3], &[0.0; 3]).verdict(3).is_err());
        assert!(Agreement::measure(&[1.0, -2.0], &r).verdict(3).is_err());
    }

    #[test]
    fn footprint_grows_with_every_dimension_and_cannot_overflow() {
        let base = shape(256, 4, 8).footprint();
        for bigger in [shape(512, 4, 8), shape(256, 5, 8), shape(256, 4, 9)] {
            let f = bigger.footprint();
            assert!(f.0 >= base.0 && f.1 > base.1);
        }
        let max = u32::MAX as usize;
        let huge = shape(max, max, max).footprint();
        assert!(huge.0 > u64::MAX as u128);
    }

    #[test]
    fn released_memory_check_names_what_is_held() {
        assert!(check_released(&MemoryStats::default()).is_ok());
        let held = MemoryStats {
            cached_bytes: 4096,
            reserved_bytes: 4096,
            ..MemoryStats::default()
        };
        let msg = check_released(&held).expect_err("held").to_string();
        assert!(msg.contains("reserved 4.00 KiB"), "{msg}");
    }
}
