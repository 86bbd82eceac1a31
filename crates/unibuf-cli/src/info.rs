//! `unibuf info`: which backends this build has and what the selected device is.

use crate::{open_device, Failure};
use std::io::Write;
use unibuf::ledger::fmt_bytes;

/// Options of `unibuf info`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Backend to describe: cpu, cuda or metal [default: $UNIBUF_BACKEND, else the best found]
    #[arg(long, value_name = "NAME")]
    backend: Option<String>,
}

/// Prints the backends, then the device. The backend list comes first so that it is shown
/// even when opening the selected device fails, which is when it is most useful.
pub fn run(args: &Args, out: &mut dyn Write) -> Result<(), Failure> {
    writeln!(out, "backends (best first)")?;
    for b in unibuf::backends() {
        let status = match (b.compiled, b.found) {
            (_, true) => "found",
            (true, false) => "not found",
            (false, false) => "not compiled",
        };
        writeln!(out, "  {:<6} {:<13} {}", b.name, status, b.detail)?;
    }

    let (dev, how) = open_device(args.backend.as_deref())?;
    let info = dev.info();
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    writeln!(out)?;
    writeln!(out, "device (chosen by {how})")?;
    writeln!(out, "  name              {}", info.name)?;
    writeln!(out, "  backend           {}", info.backend)?;
    writeln!(
        out,
        "  memory            {}",
        fmt_bytes(info.total_memory as u64)
    )?;
    writeln!(
        out,
        "  unified memory    {} (Auto storage means {})",
        yes_no(info.unified_memory),
        if info.unified_memory {
            "Shared"
        } else {
            "Private"
        }
    )?;
    writeln!(
        out,
        "  page size         {}",
        fmt_bytes(info.page_size as u64)
    )?;
    writeln!(
        out,
        "  max buffer length {}",
        fmt_bytes(info.max_buffer_len as u64)
    )?;
    writeln!(
        out,
        "  alloc alignment   {}",
        fmt_bytes(info.alloc_alignment as u64)
    )?;
    writeln!(
        out,
        "  timestamps        {}",
        if info.timestamps {
            "yes (device times in the copy audit and traces)"
        } else {
            "no (host times only)"
        }
    )?;
    Ok(())
}
