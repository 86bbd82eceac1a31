//! `unibuf load FILE`: a safetensors or GGUF file onto the device, with a progress bar, the rate
//! achieved, a table by dtype and, with `--verify`, a checksum of every tensor compared with
//! the file.

use crate::{open_device, Context, Failure};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use unibuf::ledger::fmt_bytes;
use unibuf::weights::{LoadOptions, LoadReport, LoadedWeights, Route, Selection, WeightsFile};
use unibuf::{DType, Device};

/// How the bytes get to the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RouteArg {
    /// Zero copy on unified memory, staged on a discrete GPU.
    Auto,
    /// Views of the mapped file (External memory).
    ZeroCopy,
    /// pread into pinned staging chunks, copied into device memory.
    Staged,
}

impl From<RouteArg> for Route {
    fn from(r: RouteArg) -> Route {
        match r {
            RouteArg::Auto => Route::Auto,
            RouteArg::ZeroCopy => Route::ZeroCopy,
            RouteArg::Staged => Route::Staged,
        }
    }
}

/// Options of `unibuf load`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The safetensors or GGUF file.
    file: PathBuf,
    /// Backend: cpu, cuda or metal [default: $UNIBUF_BACKEND, else the best found]
    #[arg(long, value_name = "NAME")]
    backend: Option<String>,
    /// Also check every tensor: CRC-32 of its bytes on the device against the file's.
    #[arg(long)]
    verify: bool,
    /// Print the report as JSON instead of tables (no progress bar).
    #[arg(long)]
    json: bool,
    /// The route.
    #[arg(long, value_enum, default_value = "auto")]
    route: RouteArg,
    /// Reader threads on the staged route (0: one per core, up to 16).
    #[arg(long, default_value_t = 0)]
    readers: usize,
    /// Load only the tensors whose names start with this.
    #[arg(long, value_name = "PREFIX")]
    only: Option<String>,
}

/// The checksum of one tensor.
struct Check {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    file_crc: u32,
    device_crc: u32,
}

/// CRC-32 (zlib's, so Python's `zlib.crc32` gives the same) of `bytes`.
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut c = flate2::Crc::new();
    c.update(bytes);
    c.sum()
}

/// The options for a load with `route` and `readers`, with a progress bar over `total`
/// bytes unless `quiet`. The bar draws on stderr, and only on a terminal.
pub fn options(
    route: Route,
    readers: usize,
    total: u64,
    quiet: bool,
) -> (LoadOptions, ProgressBar) {
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
    };
    if let Ok(style) = ProgressStyle::with_template(
        "{bar:40} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style);
    }
    let b = bar.clone();
    let opts = LoadOptions {
        route,
        readers,
        progress: Some(Arc::new(move |n| b.inc(n))),
        ..LoadOptions::default()
    };
    (opts, bar)
}

/// Loads the file and prints the report.
pub fn run(args: &Args, out: &mut dyn Write) -> Result<(), Failure> {
    let file = WeightsFile::open(&args.file).context("opening the weights file")?;
    let (dev, how) = open_device(args.backend.as_deref())?;
    let selection = match &args.only {
        Some(p) => Selection::Prefix(p.clone()),
        None => Selection::All,
    };
    let total: u64 = file
        .tensors()
        .iter()
        .filter(|t| args.only.as_deref().is_none_or(|p| t.name.starts_with(p)))
        .map(|t| t.byte_len())
        .sum();
    if !args.json {
        writeln!(
            out,
            "unibuf load {} on {} ({} backend, {how}): {} tensors, {}",
            args.file.display(),
            dev.info().name,
            dev.info().backend,
            file.tensors().len(),
            fmt_bytes(file.data_len())
        )?;
    }
    let (opts, bar) = options(args.route.into(), args.readers, total, args.json);
    let queue = dev
        .new_queue("weights")
        .context("creating the copy queue")?;
    let loaded = file.load_with(&dev, &queue, &selection, &opts);
    bar.finish_and_clear();
    let loaded = loaded.context("loading the weights")?;
    let checks = if args.verify {
        Some(verify(&file, &loaded)?)
    } else {
        None
    };
    if args.json {
        write_json(out, args, &dev, loaded.report(), checks.as_deref())?;
    } else {
        write!(out, "{}", loaded.report())?;
        if let Some(checks) = &checks {
            writeln!(
                out,
                "{:<48} {:<8} {:<16} {:>10} {:>10}",
                "tensor", "dtype", "shape", "file crc", "device crc"
            )?;
            for c in checks {
                writeln!(
                    out,
                    "{:<48} {:<8} {:<16} {:>10} {:>10}{}",
                    c.name,
                    c.dtype,
                    format!("{:?}", c.shape),
                    format!("{:08x}", c.file_crc),
                    format!("{:08x}", c.device_crc),
                    if c.file_crc == c.device_crc {
                        ""
                    } else {
                        "  MISMATCH"
                    }
                )?;
            }
        }
    }
    if let Some(checks) = &checks {
        let bad = checks.iter().filter(|c| c.file_crc != c.device_crc).count();
        if bad > 0 {
            return Err(Failure::new(format!(
                "verify: {bad} of {} tensors differ from the file",
                checks.len()
            )));
        }
        if !args.json {
            writeln!(
                out,
                "verified {} tensors: every checksum matches the file",
                checks.len()
            )?;
        }
    }
    Ok(())
}

/// CRC-32 of every loaded tensor on the device and in the file.
fn verify(file: &WeightsFile, loaded: &LoadedWeights) -> Result<Vec<Check>, Failure> {
    let mut checks = Vec::with_capacity(loaded.len());
    let mut host = Vec::new();
    for (name, b) in loaded.iter() {
        let t = file
            .tensor(name)
            .ok_or_else(|| Failure::new(format!("verify: '{name}' is not in the file")))?;
        host.resize(t.byte_len() as usize, 0);
        file.read_tensor(t, 0, &mut host)
            .context("verify: reading the file")?;
        let dev_bytes = b
            .cast(DType::U8)
            .and_then(|v| v.to_vec::<u8>())
            .context("verify: reading the tensor back")?;
        checks.push(Check {
            name: name.to_owned(),
            dtype: t.file_dtype.clone(),
            shape: t.file_shape.clone(),
            file_crc: crc32(&host),
            device_crc: crc32(&dev_bytes),
        });
    }
    Ok(checks)
}

/// A JSON string literal.
pub fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// The report as one JSON object. Written by hand: flat numbers and names need no serializer.
fn write_json(
    out: &mut dyn Write,
    args: &Args,
    dev: &Device,
    r: &LoadReport,
    checks: Option<&[Check]>,
) -> Result<(), Failure> {
    let rows: Vec<String> = r
        .by_dtype
        .iter()
        .map(|d| {
            format!(
                "{{\"dtype\":{},\"tensors\":{},\"bytes\":{}}}",
                json_str(&d.dtype),
                d.tensors,
                d.bytes
            )
        })
        .collect();
    let checks = checks.map_or_else(
        || "null".to_owned(),
        |cs| {
            let v: Vec<String> = cs
                .iter()
                .map(|c| {
                    format!(
                        "{{\"name\":{},\"crc32\":\"{:08x}\",\"ok\":{}}}",
                        json_str(&c.name),
                        c.device_crc,
                        c.file_crc == c.device_crc
                    )
                })
                .collect();
            format!("[{}]", v.join(","))
        },
    );
    writeln!(
        out,
        "{{\"file\":{},\"device\":{},\"backend\":{},\"route\":\"{}\",\"tensors\":{},\"bytes\":{},\
         \"seconds\":{:.6},\"gbps\":{:.4},\"readers\":{},\"allocations\":{},\"copied_bytes\":{},\
         \"by_dtype\":[{}],\"checksums\":{}}}",
        json_str(&args.file.display().to_string()),
        json_str(&dev.info().name),
        json_str(dev.info().backend),
        r.route.name(),
        r.tensors,
        r.bytes,
        r.seconds,
        r.gbps(),
        r.readers,
        r.allocations,
        r.copied_bytes,
        rows.join(","),
        checks
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_is_zlibs() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn json_strings_escape() {
        assert_eq!(json_str("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
    }
}
