//! `unibuf bench load FILE`: the rate of loading a safetensors file from the page cache,
//! beside the platform's pinned host-to-device copy ceiling measured in the same run.
//!
//! The file is read once first so that it is in the page cache (nothing is dropped from it),
//! then loaded once as a warm-up and `--samples` times more; the median is reported. The peer
//! measurement on the same file is `bench/peers/torch_safetensors.py`.

use crate::load::json_str;
use crate::{Context, Failure};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;
use unibuf::ledger::fmt_bytes;
use unibuf::weights::{LoadOptions, Selection, WeightsFile};

/// Options of `unibuf bench load`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The safetensors file (several GB for a meaningful rate).
    file: PathBuf,
    /// The backend (default: $UNIBUF_BACKEND, else the best found).
    #[arg(long)]
    backend: Option<String>,
    /// Timed loads after the warm-up (the median is reported).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    samples: u32,
    /// The route.
    #[arg(long, value_enum, default_value = "auto")]
    route: crate::load::RouteArg,
    /// Reader threads on the staged route (0: one per core, up to 16).
    #[arg(long, default_value_t = 0)]
    readers: usize,
    /// Also write the result as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The staging ring as CHUNK,COUNT (e.g. 16M,32); default: the device's.
    #[arg(long, value_parser = super::parse_staging)]
    staging: Option<(usize, usize)>,
}

/// Runs the benchmark and prints its table.
pub fn run(args: &Args, out: &mut dyn Write) -> Result<(), Failure> {
    let file = WeightsFile::open(&args.file).context("opening the weights file")?;
    let (dev, how) = super::open_with_staging(args.backend.as_deref(), args.staging)?;
    let bytes = file.data_len();
    // Warm the page cache: read every tensor once.
    let warm = Instant::now();
    let mut buf = vec![0u8; 64 << 20];
    for t in file.tensors() {
        let mut at = 0;
        while at < t.byte_len() {
            let n = (t.byte_len() - at).min(buf.len() as u64) as usize;
            file.read_tensor(t, at, &mut buf[..n])
                .context("warming the page cache")?;
            at += n as u64;
        }
    }
    let warm_s = warm.elapsed().as_secs_f64();
    drop(buf);
    let queue = dev
        .new_queue("weights")
        .context("creating the copy queue")?;
    let opts = LoadOptions {
        route: args.route.into(),
        readers: args.readers,
        ..LoadOptions::default()
    };
    let mut times = Vec::new();
    let mut last = None;
    for i in 0..=args.samples {
        let w = file
            .load_with(&dev, &queue, &Selection::All, &opts)
            .context("loading the weights")?;
        if i > 0 {
            times.push(w.report().seconds);
        }
        last = Some(w.report().clone());
        // Freed before the next load: its memory returns to the allocator's cache.
        drop(w);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let median = times[times.len() / 2];
    let gbps = bytes as f64 / median / 1e9;
    let report = last.ok_or_else(|| Failure::new("no load ran"))?;
    let mut ceiling = super::ceiling_for(&dev);
    let probe = (1usize << 30).min(bytes.max(1 << 20) as usize);
    let ceiling_gbps = ceiling
        .seconds("h2d_pinned", probe, 5)
        .map(|s| probe as f64 / s / 1e9);
    writeln!(
        out,
        "unibuf bench load {} on {} ({} backend, {how}): {} tensors, {}; page cache warmed in \
         {warm_s:.2} s; median of {} loads after a warm-up",
        args.file.display(),
        dev.info().name,
        dev.info().backend,
        file.tensors().len(),
        fmt_bytes(bytes),
        args.samples
    )?;
    writeln!(out, "{:<44} {:>9}", "measurement", "GB/s")?;
    writeln!(
        out,
        "{:<44} {:>9.2}",
        format!(
            "unibuf load ({}, {} readers, {} allocations)",
            report.route.name(),
            report.readers,
            report.allocations
        ),
        gbps
    )?;
    match ceiling_gbps {
        Some(c) => writeln!(
            out,
            "{:<44} {:>9.2}   load/ceiling {:.2}",
            format!(
                "ceiling: {} h2d pinned {}",
                ceiling.name(),
                fmt_bytes(probe as u64)
            ),
            c,
            gbps / c
        )?,
        None => writeln!(out, "{:<44} {:>9}", "ceiling", "-")?,
    }
    if let Some(path) = &args.json {
        let json = format!(
            "{{\"file\":{},\"device\":{},\"backend\":{},\"bytes\":{bytes},\"route\":\"{}\",\
             \"readers\":{},\"samples\":{},\"median_seconds\":{median:.6},\"gbps\":{gbps:.4},\
             \"ceiling\":{},\"ceiling_gbps\":{}}}\n",
            json_str(&args.file.display().to_string()),
            json_str(&dev.info().name),
            json_str(dev.info().backend),
            report.route.name(),
            report.readers,
            args.samples,
            json_str(ceiling.name()),
            ceiling_gbps.map_or_else(|| "null".to_owned(), |c| format!("{c:.4}"))
        );
        std::fs::write(path, json)
            .map_err(|e| Failure::new(format!("writing {}: {e}", path.display())))?;
    }
    Ok(())
}
