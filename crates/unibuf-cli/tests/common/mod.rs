//! What the end-to-end tests share: finding the `unibuf` binary and running it.

use std::path::PathBuf;
use std::process::{Command, Output};

/// The binary under test: cargo's build of it, or, where the tests were copied elsewhere (the
/// GPU bundle of `../shared/devkit/gpu-bundle` puts tests in `tests/` beside `bin/`), the one
/// in `../bin` next to this test executable.
pub fn binary() -> PathBuf {
    let built = PathBuf::from(env!("CARGO_BIN_EXE_unibuf"));
    if built.exists() {
        return built;
    }
    let exe = std::env::current_exe().expect("the test knows its own path");
    exe.parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("bin").join("unibuf"))
        .unwrap_or(built)
}

/// Runs `unibuf` with `args`, in the test's environment.
pub fn unibuf(args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .output()
        .expect("the unibuf binary runs")
}
