//! `unibuf bench`: measurements run side by side with the platform's own ceiling.

pub mod alloc;
pub mod ceiling;
pub mod kernels;
pub mod launch;
pub mod load;
pub mod matmul;
pub mod transfers;

use crate::{open_device, Context, Failure};
use std::io::Write;
use std::time::Instant;
use unibuf::ledger::fmt_bytes;

/// The benchmarks.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Host<->device from pinned, pageable and External memory, device copy and fills.
    Transfers(TransferArgs),
    /// Host time per kernel launch, beside the platform's bare launch.
    Launch(LaunchArgs),
    /// The allocator on synthetic workloads, on the device and simulated.
    Alloc(AllocArgs),
    /// Loading a safetensors file from the page cache, beside the pinned copy ceiling.
    Load(load::Args),
    /// The fused ops at inference sizes, beside the device's copy bandwidth.
    Kernels(kernels::Args),
    /// ops::matmul (cuBLAS / gemm as external work) at prefill and decode shapes, and its host
    /// overhead beside a bare cuBLAS call.
    Matmul(matmul::Args),
}

/// Options of `unibuf bench alloc`.
#[derive(Debug, clap::Args)]
pub struct AllocArgs {
    /// The backend (default: $UNIBUF_BACKEND, else the best found).
    #[arg(long)]
    backend: Option<String>,
}

/// Options of `unibuf bench launch`.
#[derive(Debug, clap::Args)]
pub struct LaunchArgs {
    /// The backend (default: $UNIBUF_BACKEND, else the best found).
    #[arg(long)]
    backend: Option<String>,
    /// Launches per sample.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    count: u32,
    /// Samples (the median is reported).
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u32).range(1..=1000))]
    samples: u32,
}

/// Options of `unibuf bench transfers`.
#[derive(Debug, clap::Args)]
pub struct TransferArgs {
    /// The backend (default: $UNIBUF_BACKEND, else the best found).
    #[arg(long)]
    backend: Option<String>,
    /// Transfer sizes, comma-separated, with binary units.
    #[arg(long, default_value = "64K,1M,16M,256M,1G", value_delimiter = ',', value_parser = parse_size)]
    sizes: Vec<usize>,
    /// Samples per measurement (the median is reported).
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u32).range(1..=1000))]
    samples: u32,
    /// Also write the rows as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// The staging ring as CHUNK,COUNT (e.g. 16M,8); default: the device's.
    #[arg(long, value_parser = parse_staging)]
    staging: Option<(usize, usize)>,
    /// Only the operations whose names contain this (e.g. "pageable").
    #[arg(long)]
    only: Option<String>,
}

fn parse_staging(s: &str) -> Result<(usize, usize), String> {
    let (chunk, count) = s
        .split_once(',')
        .ok_or_else(|| format!("'{s}' is not CHUNK,COUNT (e.g. 16M,8)"))?;
    let count: usize = count
        .trim()
        .parse()
        .map_err(|_| format!("'{count}' is not a chunk count"))?;
    Ok((parse_size(chunk)?, count))
}

/// Runs a benchmark and prints its table.
pub fn run(cmd: &Command, out: &mut dyn Write) -> Result<(), Failure> {
    match cmd {
        Command::Transfers(args) => run_transfers(args, out),
        Command::Launch(args) => run_launch(args, out),
        Command::Alloc(args) => run_alloc(args, out),
        Command::Load(args) => load::run(args, out),
        Command::Kernels(args) => kernels::run(args, out),
        Command::Matmul(args) => matmul::run(args, out),
    }
}

fn run_alloc(args: &AllocArgs, out: &mut dyn Write) -> Result<(), Failure> {
    let (dev, how) = open_device(args.backend.as_deref())?;
    let mut ceiling = ceiling_for(&dev);
    let rows = alloc::run(&dev, &mut |size| ceiling.alloc_pair_ns(size))
        .context("benchmarking the allocator")?;
    writeln!(
        out,
        "unibuf bench alloc on {} ({} backend, {how}); virtual memory: {}",
        dev.info().name,
        dev.info().backend,
        rows.first().is_some_and(|r| r.device.stats.virtual_memory)
    )?;
    writeln!(
        out,
        "{:<38} {:>10} {:>9} {:>10} {:>12} {:>12} {:>12}",
        "workload", "ns/event", "in calls", "sim ns", "reserved/live", "buffer pair", "driver pair"
    )?;
    for r in &rows {
        writeln!(
            out,
            "{:<38} {:>10.1} {:>9.1} {:>10.1} {:>12.3} {:>12} {:>12}",
            r.name,
            r.device.ns_per_event,
            r.device.device_call_ns_per_event(),
            r.simulated.ns_per_event,
            r.device.fragmentation(),
            r.buffer_pair_ns
                .map_or_else(|| "-".to_owned(), |n| format!("{n:.0} ns")),
            r.driver_pair_ns
                .map_or_else(|| "-".to_owned(), |n| format!("{n:.0} ns"))
        )?;
    }
    writeln!(out, "a pair is two events; in calls: the part of ns/event spent in the backend's memory calls; buffer pair: Device::alloc_labelled + drop of a Private buffer of that size (the whole path a program takes); driver pair: cuMemAllocAsync+cuMemFreeAsync on a pool that keeps its memory")?;
    Ok(())
}

fn run_launch(args: &LaunchArgs, out: &mut dyn Write) -> Result<(), Failure> {
    let (dev, how) = open_device(args.backend.as_deref())?;
    let mut ceiling = ceiling_for(&dev);
    let f = launch::run(
        &dev,
        ceiling.as_mut(),
        args.count as usize,
        args.samples as usize,
    )
    .context("benchmarking launches")?;
    writeln!(
        out,
        "unibuf bench launch on {} ({} backend, {how}); {} launches per sample, median of {}",
        dev.info().name,
        dev.info().backend,
        args.count,
        args.samples
    )?;
    writeln!(
        out,
        "{:<28} {:>10} {:>10}   (us per launch; burst: {} launches, then an untimed drain)",
        "launch (empty kernel)",
        "burst",
        "sustained",
        launch::BURST
    )?;
    writeln!(
        out,
        "{:<28} {:>10.3} {:>10.3}",
        "unibuf (checked, labelled)", f.unibuf_us, f.unibuf_sustained_us
    )?;
    let cell = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
    write!(
        out,
        "{:<28} {:>10} {:>10}",
        ceiling.name(),
        cell(f.ceiling_us),
        cell(f.ceiling_sustained_us)
    )?;
    match (f.ceiling_us, f.ceiling_sustained_us) {
        (Some(b), Some(s)) => writeln!(
            out,
            "   ratio {:.2} / {:.2}",
            f.unibuf_us / b,
            f.unibuf_sustained_us / s
        )?,
        _ => writeln!(out)?,
    }
    writeln!(
        out,
        "{:<28} {:>10.3}   per kernel, batches of {} (LaunchBatch{})",
        "unibuf batched",
        f.batched_us,
        launch::BATCH,
        if dev.info().backend == "cuda" {
            ": one CUDA graph launch each"
        } else {
            ""
        }
    )?;
    Ok(())
}

fn ceiling_for(dev: &unibuf::Device) -> Box<dyn ceiling::Ceiling> {
    #[cfg(feature = "cuda")]
    if dev.info().backend == "cuda" {
        if let Some(c) = ceiling::DriverCeiling::open() {
            return Box::new(c);
        }
    }
    let _ = dev;
    Box::new(ceiling::HostCeiling)
}

/// Opens the device as `open_device` does, with the staging ring `--staging` asked for.
fn open_with_staging(
    backend: Option<&str>,
    staging: Option<(usize, usize)>,
) -> Result<(unibuf::Device, &'static str), Failure> {
    let Some((chunk, count)) = staging else {
        return open_device(backend);
    };
    let mut b = unibuf::Device::builder().staging(chunk, count);
    if let Some(name) = backend {
        b = b.backend(name);
    }
    Ok((b.open().context("opening the device")?, "--staging"))
}

fn run_transfers(args: &TransferArgs, out: &mut dyn Write) -> Result<(), Failure> {
    let (dev, how) = open_with_staging(args.backend.as_deref(), args.staging)?;
    let mut ceiling = ceiling_for(&dev);
    writeln!(
        out,
        "unibuf bench transfers on {} ({} backend, {how}); ceiling: {}; median of {} samples",
        dev.info().name,
        dev.info().backend,
        ceiling.name(),
        args.samples
    )?;
    writeln!(
        out,
        "{:<13} {:>10} {:>10} {:>10} {:>7} {:>10}",
        "op", "size", "unibuf", "ceiling", "ratio", "same path"
    )?;
    let mut rows = Vec::new();
    let mut write_err = None;
    let result = transfers::run(
        &dev,
        ceiling.as_mut(),
        &args.sizes,
        args.samples as usize,
        args.only.as_deref().unwrap_or(""),
        |r| {
            let line = format_row(r);
            if let Err(e) = writeln!(out, "{line}") {
                write_err.get_or_insert(e);
            }
            rows.push(r.clone());
        },
    );
    if let Some(e) = write_err {
        return Err(e.into());
    }
    result.context("benchmarking transfers")?;
    writeln!(out, "GB/s; d2d_copy counts bytes read plus written; fill_u64 is compared with the 4-byte memset")?;
    if let Some(path) = &args.json {
        let json = rows_json(&dev, &rows);
        std::fs::write(path, json)
            .map_err(|e| Failure::new(format!("writing {}: {e}", path.display())))?;
    }
    Ok(())
}

fn gbps(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |g| format!("{g:.2}"))
}

fn format_row(r: &transfers::Row) -> String {
    let ratio = r
        .ceiling_gbps
        .map_or_else(|| "-".to_owned(), |c| format!("{:.2}", r.unibuf_gbps / c));
    format!(
        "{:<13} {:>10} {:>10.2} {:>10} {:>7} {:>10}",
        r.op,
        fmt_bytes(r.bytes as u64),
        r.unibuf_gbps,
        gbps(r.ceiling_gbps),
        ratio,
        gbps(r.same_path_gbps)
    )
}

/// The rows as JSON. Written by hand: a flat list of numbers and names needs no serializer.
fn rows_json(dev: &unibuf::Device, rows: &[transfers::Row]) -> String {
    let num = |v: Option<f64>| v.map_or_else(|| "null".to_owned(), |g| format!("{g:.4}"));
    let body: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "  {{\"op\":\"{}\",\"bytes\":{},\"unibuf_gbps\":{:.4},\"ceiling_gbps\":{},\"same_path_gbps\":{}}}",
                r.op,
                r.bytes,
                r.unibuf_gbps,
                num(r.ceiling_gbps),
                num(r.same_path_gbps)
            )
        })
        .collect();
    format!(
        "{{\"device\":\"{}\",\"backend\":\"{}\",\"rows\":[\n{}\n]}}\n",
        dev.info().name.replace('"', "'"),
        dev.info().backend,
        body.join(",\n")
    )
}

/// Parses "64K", "16M", "1G", "4096" (binary units).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim().to_ascii_uppercase();
    let t = t.trim_end_matches('B').trim_end_matches('I');
    let (num, unit) = match t.chars().last() {
        Some('K') => (&t[..t.len() - 1], 1usize << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n: usize = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 64K, 16M, 1G)"))?;
    match n.checked_mul(unit) {
        Some(0) | None => Err(format!("'{s}' is not a positive size that fits in memory")),
        Some(v) => Ok(v),
    }
}

/// The median seconds per operation of `op`, timed over `samples` samples of `reps` calls each
/// after one warm-up call. Small transfers repeat within a sample so that the clock's
/// resolution and the call overhead do not dominate.
pub fn median_seconds<E>(
    samples: usize,
    reps: usize,
    mut op: impl FnMut() -> Result<(), E>,
) -> Result<f64, E> {
    op()?;
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t = Instant::now();
        for _ in 0..reps {
            op()?;
        }
        times.push(t.elapsed().as_secs_f64() / reps as f64);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

/// Repetitions per sample for a transfer of `bytes`: about 64 MiB moved per sample.
pub fn reps_for(bytes: usize) -> usize {
    ((64usize << 20) / bytes.max(1)).clamp(1, 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
    }
}
