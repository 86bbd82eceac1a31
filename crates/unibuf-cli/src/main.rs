//! `unibuf`: the command-line tool of the unibuf runtime.
//!
//! - `unibuf info` lists the backends and describes the device that would be opened;
//! - `unibuf demo` runs a small mixture-of-experts decoder on random weights, its experts
//!   streamed from a generated safetensors file, and checks it against an f64 host reference;
//! - `unibuf bench transfers` measures every transfer path beside the platform's own ceiling;
//! - `unibuf generate MODEL.gguf` runs a Llama-architecture GGUF model (SmolLM2, say) and
//!   reports tokens/s, the submissions and the copy audit;
//! - `unibuf replay TRACE` replays an allocation trace through the allocator.
//!
//! Every failure, whether bad input, an unavailable backend, a runtime error or a failed check,
//! ends the process with a non-zero exit status and a single `error: ...` line on stderr.

mod bench;
mod demo;
mod generate;
mod info;
mod load;
mod replay;
mod rng;

use clap::{Parser, Subcommand};
use std::fmt;
use std::io::{self, Write};
use std::process::ExitCode;
use unibuf::Device;

/// The unibuf command-line tool: device information and an end-to-end runtime demo.
#[derive(Debug, Parser)]
#[command(name = "unibuf", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The subcommands, one module each.
#[derive(Debug, Subcommand)]
enum Command {
    /// Lists the backends and describes the device that would be opened.
    Info(info::Args),
    /// Runs a small MoE decoder on generated random weights and checks it against an f64 reference.
    Demo(demo::Args),
    /// Loads a safetensors or GGUF file onto the device: progress, GB/s, a table by dtype, checksums.
    Load(load::Args),
    /// Generates text with a Llama-architecture GGUF model (greedy or sampled), with tokens/s.
    Generate(generate::Args),
    /// Replays an allocation trace through the allocator and reports fragmentation and speed.
    Replay(replay::Args),
    /// Benchmarks, each beside the platform's own ceiling measured in the same run.
    #[command(subcommand)]
    Bench(bench::Command),
}

fn main() -> ExitCode {
    // clap prints its own `error: ...` (exit status 2) for malformed command lines.
    let cli = Cli::parse();
    let mut out = io::stdout().lock();
    let result = match &cli.command {
        Command::Info(args) => info::run(args, &mut out),
        Command::Demo(args) => demo::run(args, &mut out),
        Command::Bench(cmd) => bench::run(cmd, &mut out),
        Command::Replay(args) => replay::run(args, &mut out),
        Command::Load(args) => load::run(args, &mut out),
        Command::Generate(args) => generate::run(args, &mut out),
    };
    // Flush before reporting so that stdout and the error line appear in order on a terminal.
    let result = result.and_then(|()| out.flush().map_err(Failure::from));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {failure}");
            ExitCode::FAILURE
        }
    }
}

/// Why a subcommand failed. `main` prints it as one `error: ...` line and exits non-zero.
#[derive(Debug)]
pub struct Failure(String);

impl Failure {
    /// A failure with its message. Line breaks (a compiler log, say) are folded into ` | ` so
    /// that the message stays on one line, as scripts reading stderr expect.
    pub fn new(message: impl Into<String>) -> Failure {
        let message = message.into();
        if !message.contains('\n') {
            return Failure(message);
        }
        let lines: Vec<&str> = message
            .lines()
            .map(str::trim_end)
            .filter(|l| !l.is_empty())
            .collect();
        Failure(lines.join(" | "))
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<unibuf::Error> for Failure {
    fn from(e: unibuf::Error) -> Failure {
        Failure::new(e.to_string())
    }
}

/// The only I/O the subcommands do themselves is writing their report to stdout.
impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Failure {
        Failure::new(format!("writing output: {e}"))
    }
}

/// Prefixes a library error with what the tool was doing when it happened.
pub trait Context<T> {
    /// Turns an error into a [`Failure`] that reads "`what`: the error".
    fn context(self, what: &str) -> Result<T, Failure>;
}

impl<T> Context<T> for unibuf::Result<T> {
    fn context(self, what: &str) -> Result<T, Failure> {
        self.map_err(|e| Failure::new(format!("{what}: {e}")))
    }
}

/// Opens the device the way every subcommand does: `--backend` when given, else
/// [`Device::new`]'s rule (`UNIBUF_BACKEND`, else the best backend found). Returns the device and
/// how it was chosen, for the report. Naming an absent backend is an error, never a fallback.
pub fn open_device(backend: Option<&str>) -> Result<(Device, &'static str), Failure> {
    match backend {
        Some(name) => Ok((
            Device::open(name).context("opening the device")?,
            "--backend",
        )),
        None => {
            // Only describes the choice; Device::new reads the variable itself.
            let from_env = std::env::var_os(unibuf::BACKEND_ENV).is_some_and(|v| !v.is_empty());
            let how = if from_env {
                "$UNIBUF_BACKEND"
            } else {
                "the best backend found"
            };
            Ok((Device::new().context("opening the device")?, how))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn failures_stay_on_one_line() {
        let f = Failure::new("kernel 'k' failed to compile: log\nline 1: bad\n\n");
        assert_eq!(
            f.to_string(),
            "kernel 'k' failed to compile: log | line 1: bad"
        );
    }
}
