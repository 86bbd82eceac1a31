//! `unibuf replay TRACE`: an allocation trace through unibuf's allocator.

use crate::{open_device, Context, Failure};
use std::io::Write;
use std::path::PathBuf;
use unibuf::alloc::{replay_simulated, Trace};

/// Options of `unibuf replay`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The trace: CSV `action,addr,size,stream`, plain or gzipped.
    trace: PathBuf,
    /// Replay on simulated memory: the policy alone, no device needed.
    #[arg(long)]
    simulate: bool,
    /// The backend for a device replay (default: $UNIBUF_BACKEND, else the best found).
    #[arg(long, conflicts_with = "simulate")]
    backend: Option<String>,
}

/// Reads the trace, replays it, prints the report.
pub fn run(args: &Args, out: &mut dyn Write) -> Result<(), Failure> {
    let trace = Trace::read(&args.trace).context("reading the trace")?;
    let report = if args.simulate {
        replay_simulated(&trace, Default::default()).context("replaying")?
    } else {
        let (dev, _) = open_device(args.backend.as_deref())?;
        dev.replay(&trace).context("replaying")?
    };
    writeln!(out, "{}: {report}", args.trace.display())?;
    Ok(())
}
