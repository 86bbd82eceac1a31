//! `unibuf demo`: the runtime end to end on a small mixture-of-experts decoder with random
//! weights.
//!
//! 1. **Weights file.** Random 4-bit weights in the layout of a MoE checkpoint are written to a
//!    safetensors file (`weights_file.rs`): a temporary one removed at exit, or `--weights PATH`,
//!    kept and reused by later runs with the same flags.
//! 2. **Load.** The dense tensors (embedding, norms, routers, LM head) are loaded with
//!    `WeightsFile::load`: views of the mapped file on unified memory (zero copy), streamed into
//!    device memory on a discrete GPU. The experts stay in the file: an `ExpertCache` keeps
//!    `--budget` of each layer's experts on the device and reads the others when they are
//!    routed to, or earlier when pre-gating predicts them (`model.rs`).
//! 3. **Decode.** Each step embeds its token, runs every layer (RMSNorm, router, the chosen
//!    experts' q4 SwiGLU MLPs mixed into the residual stream), the final norm, the LM head and
//!    the on-device sampler, whose token feeds the next step.
//! 4. **Check.** An independent f64 host reference recomputes every step from the file's bytes,
//!    teacher-forced on the device's tokens and experts (`reference.rs`), and every vector is
//!    compared within a stated tolerance, as are the device's expert choices and sampled tokens
//!    (`check.rs`). Any mismatch, like any runtime error, ends the command with a non-zero exit
//!    status.
//! 5. **Report.** Tokens/s, expert cache stats, the submission table by op, memory stats, the
//!    copy audit and, with `--trace`, a Chrome trace; with `--alloc-trace`, the allocator's
//!    allocations and frees as a trace for `unibuf replay`.
//!
//! The weights are random, so the tokens mean nothing as language, and the model has no
//! attention (each step sees only its own token): what the demo shows is the runtime at work.

mod check;
mod config;
mod kernels;
mod model;
mod reference;
mod weights_file;

use crate::{Context, Failure};
use check::TOLERANCE;
use config::Config;
use kernels::{Kernels, ALL as ALL_KERNELS};
use model::{Model, Step};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use unibuf::ledger::fmt_bytes;
use unibuf::{Device, LabelStats, MemoryStats, SubmissionStats};
use weights_file::WeightsPath;

/// Options of `unibuf demo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Backend to run on: cpu, cuda or metal [default: $UNIBUF_BACKEND, else the best found]
    #[arg(long, value_name = "NAME")]
    backend: Option<String>,
    /// Write a Chrome trace (Perfetto, chrome://tracing) of the copies and submissions to FILE
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// Record every allocation and free the caching allocator serves to FILE (CSV, gzip if it ends in .gz), for `unibuf replay`
    #[arg(long, value_name = "FILE")]
    alloc_trace: Option<PathBuf>,
    /// Keep the generated weights file at PATH (and reuse it if it was generated with the same flags)
    #[arg(long, value_name = "PATH")]
    weights: Option<PathBuf>,
    /// Width of the residual stream (a multiple of 32)
    #[arg(long, value_name = "N", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..))]
    hidden: u32,
    /// Inner width of each expert's SwiGLU MLP (a multiple of 32)
    #[arg(long, value_name = "N", default_value_t = 512,
          value_parser = clap::value_parser!(u32).range(1..))]
    ffn: u32,
    /// Number of MoE layers
    #[arg(long, value_name = "N", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..))]
    layers: u32,
    /// Experts per layer
    #[arg(long, value_name = "N", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..))]
    experts: u32,
    /// Experts each token runs per layer (the router's top-k)
    #[arg(long, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..))]
    experts_per_token: u32,
    /// Experts per layer the expert cache keeps on the device
    #[arg(long, value_name = "N", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..))]
    budget: u32,
    /// Vocabulary size
    #[arg(long, value_name = "N", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    vocab: u32,
    /// Number of tokens to decode, one after another
    #[arg(long, value_name = "N", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..))]
    tokens: u32,
    /// Sampling temperature; 0 always picks the most likely token
    #[arg(
        long,
        value_name = "T",
        default_value_t = 0.7,
        allow_negative_numbers = true
    )]
    temperature: f32,
    /// Sample among the K most likely tokens (0: the sampler's maximum, 1024)
    #[arg(long, value_name = "K", default_value_t = 40)]
    top_k: u32,
    /// Sample among the most likely tokens whose probabilities reach P
    #[arg(
        long,
        value_name = "P",
        default_value_t = 0.95,
        allow_negative_numbers = true
    )]
    top_p: f32,
    /// Seed of the random weights, the first token and the sampler
    #[arg(long, value_name = "N", default_value_t = 0x5eed)]
    seed: u64,
}

/// Milliseconds with three decimals.
fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

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

/// Opens the device as every subcommand does (`--backend`, else `UNIBUF_BACKEND`, else the
/// best found), with device timing on so that the submission table has device times on CUDA
/// too. Returns the device and how it was chosen.
fn open_device(backend: Option<&str>) -> Result<(Device, &'static str), Failure> {
    let mut b = Device::builder().gpu_timing(true);
    let how = match backend {
        Some(name) => {
            b = b.backend(name);
            "--backend"
        }
        None if std::env::var_os(unibuf::BACKEND_ENV).is_some_and(|v| !v.is_empty()) => {
            "$UNIBUF_BACKEND"
        }
        None => "the best backend found",
    };
    Ok((b.open().context("opening the device")?, how))
}

/// The label of the expert cache's copies in the submission table: each copy is labelled with
/// its expert ("expert 2.5"), which would make one row per expert.
const EXPERT_COPIES: &str = "expert copies (cache queue)";

/// `stats` with the rows of the expert cache's copies ("expert {layer}.{expert}") merged into
/// one, [`EXPERT_COPIES`], and the rows sorted again by device time, then encode time.
fn merge_expert_copies(mut stats: SubmissionStats) -> SubmissionStats {
    let is_copy = |label: &str| {
        label.strip_prefix("expert ").is_some_and(|rest| {
            rest.split_once('.')
                .is_some_and(|(l, e)| l.parse::<usize>().is_ok() && e.parse::<usize>().is_ok())
        })
    };
    let (copies, mut rows): (Vec<LabelStats>, Vec<LabelStats>) =
        stats.labels.into_iter().partition(|l| is_copy(&l.label));
    if !copies.is_empty() {
        let mut merged = LabelStats {
            label: EXPERT_COPIES.to_owned(),
            ..LabelStats::default()
        };
        for c in copies {
            merged.count += c.count;
            merged.encode_ns += c.encode_ns;
            merged.wait_ns += c.wait_ns;
            merged.waits += c.waits;
            merged.gpu_ns += c.gpu_ns;
            merged.timed += c.timed;
        }
        rows.push(merged);
    }
    rows.sort_by_key(|l| std::cmp::Reverse((l.gpu_ns, l.encode_ns)));
    stats.labels = rows;
    stats
}

/// Per-step wall times.
fn timing(steps: &[Step]) -> (Duration, Duration, Duration) {
    let total: Duration = steps.iter().map(|s| s.time).sum();
    let min = steps.iter().map(|s| s.time).min().unwrap_or_default();
    let max = steps.iter().map(|s| s.time).max().unwrap_or_default();
    (total, min, max)
}

/// Runs the demo, writing its report to `out`.
pub fn run(args: &Args, out: &mut dyn Write) -> Result<(), Failure> {
    let cfg = Config::new(args)?;
    if let Some(trace) = &args.trace {
        // Found out now rather than after the whole run; the trace is written at the end.
        std::fs::File::create(trace).map_err(|e| {
            Failure::new(format!(
                "--trace {}: cannot create the trace file: {e}",
                trace.display()
            ))
        })?;
    }
    let (dev, how) = open_device(args.backend.as_deref())?;
    let info = dev.info();
    if let Some(path) = &args.alloc_trace {
        // From the start: the trace holds the model's buffers as well as the decode loop's.
        dev.record_alloc_trace(path)
            .map_err(|e| Failure::new(format!("--alloc-trace: {e}")))?;
    }

    let (device_bytes, host_bytes) = cfg.footprint();
    // On unified memory host and device allocations come out of the same memory.
    let needed = if info.unified_memory {
        device_bytes + host_bytes
    } else {
        device_bytes.max(host_bytes)
    };
    if needed > info.total_memory as u128 {
        return Err(Failure::new(format!(
            "{} needs about {} of memory (a {} weights file); {} has {}",
            cfg.flags(),
            fmt_bytes(u64::try_from(needed).unwrap_or(u64::MAX)),
            fmt_bytes(u64::try_from(cfg.file_bytes()).unwrap_or(u64::MAX)),
            info.name,
            fmt_bytes(info.total_memory as u64)
        )));
    }

    writeln!(
        out,
        "unibuf demo: MoE decoder, {} layers x {} experts (top {}), hidden {}, expert ffn {}, vocab {}, q4 in groups of {}, {} tokens, seed {}",
        cfg.layers, cfg.experts, cfg.active, cfg.hidden, cfg.ffn, cfg.vocab, cfg.group, cfg.tokens, args.seed
    )?;
    writeln!(
        out,
        "random weights: the numbers are a runtime check, not a model (no attention: each step sees only its token)"
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
        "kernels   {pipelines} pipelines compiled (the ops and the demo's {}) in {}",
        names.join(", "),
        ms(started.elapsed())
    )?;

    let path = WeightsPath::new(args.weights.as_deref());
    let prepared = weights_file::prepare(&path, &cfg, args.seed)?;
    let file_len = prepared.file.header().file_len();
    let keep = if path.temporary() {
        "temporary, removed at exit"
    } else {
        "kept"
    };
    match prepared.generated {
        Some(took) => writeln!(
            out,
            "weights   generated {} ({}, {} tensors) in {} ({keep})",
            path.path().display(),
            fmt_bytes(file_len),
            prepared.file.tensors().len(),
            ms(took)
        )?,
        None => writeln!(
            out,
            "weights   reused {} ({}, {} tensors), generated earlier with the same flags",
            path.path().display(),
            fmt_bytes(file_len),
            prepared.file.tensors().len()
        )?,
    }

    let (model, load) = Model::load(&dev, &prepared.file, cfg, kernels)?;
    writeln!(
        out,
        "load      {} dense tensors, {} in {}: {} route, {:.2} GB/s, {} copied; dense weights {}",
        load.tensors,
        fmt_bytes(load.bytes),
        ms(Duration::from_secs_f64(load.seconds)),
        load.route.name(),
        load.gbps(),
        fmt_bytes(load.copied_bytes),
        model.dense_mode().name()
    )?;
    let expert_bytes = u64::try_from(cfg.expert_bytes()).unwrap_or(u64::MAX);
    writeln!(
        out,
        "experts   {} experts of {} streamed from the file through the expert cache: {} per layer on the device ({} of {}), pre-gating prefetch",
        cfg.layers * cfg.experts,
        fmt_bytes(expert_bytes),
        cfg.budget,
        fmt_bytes(expert_bytes * (cfg.layers * cfg.budget) as u64),
        fmt_bytes(expert_bytes * (cfg.layers * cfg.experts) as u64),
    )?;

    let first = crate::rng::SplitMix64(args.seed ^ 0x70c3).below(cfg.vocab);
    let steps = model.decode(first)?;
    let (total, min, max) = timing(&steps);
    writeln!(
        out,
        "decode    {} tokens in {}: {} per token (min {}, max {}), {:.1} tokens/s",
        steps.len(),
        ms(total),
        ms(total / steps.len().max(1) as u32),
        ms(min),
        ms(max),
        steps.len() as f64 / total.as_secs_f64().max(f64::MIN_POSITIVE)
    )?;
    let sampling = if cfg.greedy() {
        "greedy".to_owned()
    } else {
        format!(
            "temperature {}, top-k {}, top-p {}",
            cfg.sampling.temperature, cfg.sampling.top_k, cfg.sampling.top_p
        )
    };
    let tokens: Vec<String> = std::iter::once(first)
        .chain(steps.iter().map(|s| s.output))
        .map(|t| t.to_string())
        .collect();
    writeln!(out, "tokens    {} ({sampling})", tokens.join(" "))?;
    let stats = model.cache().stats();
    writeln!(out, "experts   {stats}")?;
    let (mut guessed, mut right) = (0, 0);
    for layer in steps.iter().flat_map(|s| &s.layers) {
        guessed += layer.predicted.len();
        right += layer
            .predicted
            .iter()
            .filter(|e| layer.chosen.contains(e))
            .count();
    }
    if guessed > 0 {
        writeln!(
            out,
            "pre-gate  {right} of {guessed} predicted experts were routed to ({:.1}%)",
            100.0 * right as f64 / guessed as f64
        )?;
    }

    // The results, then the reference from the file's bytes.
    let results = dev.queue().labelled("download results");
    let hidden: Vec<f32> = results
        .download(&model.hidden)
        .context("downloading the hidden states")?;
    let logits: Vec<f32> = results
        .download(&model.logits)
        .context("downloading the logits")?;
    let started = Instant::now();
    let bytes = std::fs::read(path.path())
        .map_err(|e| Failure::new(format!("reference: reading {}: {e}", path.path().display())))?;
    let host = reference::HostModel::parse(&bytes, cfg)?;
    let refs = reference::reference_steps(&host, &steps)?;
    let summary = check::check(&cfg, &steps, &refs, &hidden, &logits).map_err(|why| {
        Failure::new(format!(
            "check failed against the f64 host reference: {why}"
        ))
    })?;
    drop(host);
    drop(bytes);
    writeln!(
        out,
        "check passed: {} steps match the f64 host reference (teacher-forced, computed in {}): max error relative to max |value|: router {:.2e}, hidden {:.2e}, logits {:.2e}, tolerance {TOLERANCE:e}; {} routing decisions agree ({} near-ties); sampled tokens are among the reference's candidates",
        steps.len(),
        ms(started.elapsed()),
        summary.router,
        summary.hidden,
        summary.logits,
        summary.decisions,
        summary.near_ties
    )?;

    writeln!(out)?;
    writeln!(out, "submissions (per label)")?;
    indented(
        out,
        &merge_expert_copies(dev.submission_stats()).to_string(),
    )?;
    writeln!(out)?;
    writeln!(out, "memory (buffers alive)")?;
    indented(out, &dev.memory_stats().to_string())?;
    writeln!(out)?;
    write!(out, "{}", dev.copy_report())?;

    if let Some(trace) = &args.trace {
        dev.write_chrome_trace(trace)
            .context("writing the Chrome trace")?;
        writeln!(out)?;
        writeln!(
            out,
            "trace     {} (open in https://ui.perfetto.dev or chrome://tracing)",
            trace.display()
        )?;
    }

    // Everything the device holds goes back: the buffers' blocks to the cache, the expert
    // cache's experts and read buffers, the mapped file's External region (once the copies
    // reading it are done); then trim() releases the cache and the staging chunks.
    drop(model);
    dev.drain().context("finishing the device's work")?;
    if args.alloc_trace.is_some() {
        let t = dev
            .finish_alloc_trace()
            .context("writing the allocation trace")?;
        writeln!(out)?;
        writeln!(
            out,
            "allocation trace  {}: {} allocations, {} frees, peak live {} (replay: unibuf replay {})",
            t.path.display(),
            t.allocs,
            t.frees,
            fmt_bytes(t.peak_live_bytes as u64),
            t.path.display()
        )?;
    }
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

    #[test]
    fn expert_copies_merge_into_one_row() {
        let row = |label: &str, count, gpu_ns| LabelStats {
            label: label.to_owned(),
            count,
            gpu_ns,
            timed: count,
            ..LabelStats::default()
        };
        let stats = SubmissionStats {
            labels: vec![
                row("rms_norm", 4, 100),
                row("expert 0.1", 2, 60),
                row("expert 12.7", 1, 50),
                row("expert w2 (q4 matvec)", 3, 10),
            ],
            gpu_timing: true,
        };
        let merged = merge_expert_copies(stats);
        let labels: Vec<&str> = merged.labels.iter().map(|l| l.label.as_str()).collect();
        assert_eq!(
            labels,
            [
                "expert copies (cache queue)",
                "rms_norm",
                "expert w2 (q4 matvec)"
            ]
        );
        assert_eq!((merged.labels[0].count, merged.labels[0].gpu_ns), (3, 110));
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
