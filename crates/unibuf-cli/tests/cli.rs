//! End-to-end tests of the `unibuf` binary: exit statuses, the lines scripts rely on, and
//! clean failures on bad input.
//!
//! The tests inherit `UNIBUF_BACKEND`, so that on a GPU machine the same binary is exercised on
//! the backend the conformance run selects; only the test about that variable sets it.

mod common;

use common::{binary, unibuf};
use std::path::PathBuf;
use std::process::{Command, Output};

/// Runs `unibuf` with `args`; `env` adds variables.
fn unibuf_with_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(binary());
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("the unibuf binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts that the command succeeded, showing its output otherwise.
fn assert_success(o: &Output) {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        stdout(o),
        stderr(o)
    );
}

/// Asserts a clean failure: a non-zero exit status (not a signal), an `error:` message that
/// contains every one of `needles`, and no panic.
fn assert_clean_failure(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert!(
        matches!(o.status.code(), Some(c) if c != 0),
        "expected a non-zero exit, got {:?}\nstdout:\n{}\nstderr:\n{err}",
        o.status.code(),
        stdout(o)
    );
    assert!(err.starts_with("error: "), "stderr: {err}");
    assert!(!err.contains("panicked"), "stderr: {err}");
    for needle in needles {
        assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
    }
}

/// A path under Cargo's per-package scratch directory for integration tests.
fn scratch(name: &str) -> PathBuf {
    // Cargo's scratch directory where it exists; the system's elsewhere (a copied bundle).
    let cargo_tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let dir = if cargo_tmp.is_dir() {
        cargo_tmp
    } else {
        std::env::temp_dir()
    };
    dir.join(format!("{}-{name}", std::process::id()))
}

#[test]
fn info_lists_the_backends_and_describes_the_device() {
    let o = unibuf(&["info"]);
    assert_success(&o);
    let out = stdout(&o);
    assert!(out.contains("cpu"), "{out}");
    for field in [
        "name",
        "backend",
        "memory",
        "unified memory",
        "page size",
        "max buffer length",
        "alloc alignment",
        "timestamps",
    ] {
        assert!(out.contains(field), "missing {field:?} in:\n{out}");
    }
}

#[test]
fn info_on_the_cpu_backend_says_so() {
    let o = unibuf(&["info", "--backend", "cpu"]);
    assert_success(&o);
    let out = stdout(&o);
    assert!(out.contains("chosen by --backend"), "{out}");
    assert!(out.contains("backend           cpu"), "{out}");
}

#[test]
fn info_with_an_absent_backend_fails_naming_it() {
    let o = unibuf(&["info", "--backend", "nosuch"]);
    assert_clean_failure(&o, &["nosuch"]);
}

#[test]
fn an_absent_backend_in_the_environment_is_an_error_not_a_fallback() {
    let o = unibuf_with_env(&["demo"], &[("UNIBUF_BACKEND", "nosuch")]);
    assert_clean_failure(&o, &["nosuch"]);
    assert!(!stdout(&o).contains("check passed"));
}

/// Flags for a small, fast demo run (a debug build runs the CPU kernels unoptimised).
const SMALL: [&str; 8] = [
    "--hidden", "64", "--ffn", "128", "--vocab", "256", "--tokens", "4",
];

#[test]
fn demo_passes_its_check_and_prints_the_audit() {
    let o = unibuf(&["demo"]);
    assert_success(&o);
    let out = stdout(&o);
    for line in [
        "random weights: the numbers are a runtime check, not a model",
        "weights   generated",
        "(temporary, removed at exit)",
        "tokens/s",
        "experts   hit rate",
        "prefetch hits",
        "stall",
        "pre-gate",
        "check passed",
        "submissions (per label)",
        "expert w1, w3 (q4 matvec)",
        "expert copies (cache queue)",
        "sample",
        "memory (buffers alive)",
        "copy audit",
        "all memory returned",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    // The temporary weights file is gone.
    let path = out
        .lines()
        .find_map(|l| l.strip_prefix("weights   generated "))
        .and_then(|rest| rest.split(' ').next())
        .expect("the weights line names the file");
    assert!(
        !std::path::Path::new(path).exists(),
        "{path} was left behind"
    );
}

#[test]
fn demo_handles_odd_shapes_and_budgets_below_the_experts_per_token() {
    for flags in [
        &[
            "--hidden",
            "32",
            "--ffn",
            "32",
            "--layers",
            "1",
            "--experts",
            "1",
            "--experts-per-token",
            "1",
            "--budget",
            "1",
            "--vocab",
            "1",
            "--tokens",
            "1",
        ][..],
        &[
            "--hidden",
            "96",
            "--ffn",
            "160",
            "--layers",
            "2",
            "--experts",
            "5",
            "--experts-per-token",
            "3",
            "--budget",
            "2",
            "--vocab",
            "37",
            "--tokens",
            "3",
        ][..],
        &[
            "--hidden",
            "64",
            "--ffn",
            "64",
            "--tokens",
            "3",
            "--temperature",
            "0",
        ][..],
    ] {
        let o = unibuf(&[&["demo"][..], flags].concat());
        assert_success(&o);
        let out = stdout(&o);
        assert!(out.contains("check passed"), "{flags:?}:\n{out}");
        assert!(out.contains("hit rate"), "{flags:?}:\n{out}");
    }
}

#[test]
fn demo_keeps_and_reuses_its_weights_file_only_for_the_same_flags() {
    let path = scratch("weights.safetensors");
    let path_arg = path.to_str().expect("a UTF-8 temp path");
    let run =
        |extra: &[&str]| unibuf(&[&["demo", "--weights", path_arg][..], &SMALL, extra].concat());
    let o = run(&[]);
    assert_success(&o);
    assert!(stdout(&o).contains("(kept)"), "{}", stdout(&o));
    assert!(path.exists());
    let o = run(&[]);
    assert_success(&o);
    assert!(stdout(&o).contains("weights   reused"), "{}", stdout(&o));
    assert!(stdout(&o).contains("check passed"));
    let o = run(&["--seed", "7"]);
    assert_clean_failure(&o, &["--weights", "generated for other flags", "seed 7"]);
    let _ = std::fs::remove_file(&path);

    // A file the demo did not write is never overwritten.
    let other = scratch("not-demo.safetensors");
    std::fs::write(&other, b"precious").expect("scratch file");
    let o = unibuf(&["demo", "--weights", other.to_str().expect("UTF-8")]);
    assert_clean_failure(&o, &["--weights"]);
    assert_eq!(std::fs::read(&other).expect("still there"), b"precious");
    let _ = std::fs::remove_file(&other);
}

#[test]
fn demo_writes_a_chrome_trace() {
    let path = scratch("trace.json");
    let path_arg = path.to_str().expect("a UTF-8 temp path");
    let o = unibuf(&[&["demo", "--trace", path_arg][..], &SMALL].concat());
    assert_success(&o);
    let trace = std::fs::read_to_string(&path).expect("the trace file exists");
    let _ = std::fs::remove_file(&path);
    assert!(trace.starts_with('{'), "{}", &trace[..trace.len().min(200)]);
    assert!(trace.contains("\"traceEvents\""));
    assert!(trace.contains("\"ph\":\"X\""));
    assert!(trace.contains("expert w2 (q4 matvec)"));
    assert!(trace.trim_end().ends_with('}'));
    // Valid JSON: brackets and braces balance outside strings.
    let (mut depth, mut in_string, mut escaped) = (0i64, false, false);
    for c in trace.chars() {
        match (in_string, escaped, c) {
            (true, true, _) => escaped = false,
            (true, false, '\\') => escaped = true,
            (true, false, '"') => in_string = false,
            (false, _, '"') => in_string = true,
            (false, _, '{' | '[') => depth += 1,
            (false, _, '}' | ']') => {
                depth -= 1;
                assert!(depth >= 0, "unbalanced trace");
            }
            _ => {}
        }
    }
    assert_eq!((depth, in_string), (0, false), "unbalanced trace");
}

/// The demo records the allocator's allocations and frees; `unibuf replay` reads the file and
/// sees the peak the demo reported.
#[test]
fn demo_records_an_allocation_trace_that_replays() {
    let path = scratch("alloc-trace.csv.gz");
    let path_arg = path.to_str().expect("a UTF-8 temp path");
    let o = unibuf(&[&["demo", "--alloc-trace", path_arg][..], &SMALL].concat());
    assert_success(&o);
    let out = stdout(&o);
    let line = out
        .lines()
        .find(|l| l.starts_with("allocation trace"))
        .unwrap_or_else(|| panic!("no allocation trace line:\n{out}"));
    let field = |after: &str, until: char| -> String {
        let rest = &line[line
            .find(after)
            .unwrap_or_else(|| panic!("{after}: {line}"))
            + after.len()..];
        rest[..rest.find(until).unwrap_or(rest.len())]
            .trim()
            .to_owned()
    };
    let allocs: usize = field(": ", ' ').parse().expect("an allocation count");
    let peak = field("peak live ", '(');
    assert!(allocs > 0, "{line}");
    let r = unibuf(&["replay", "--simulate", path_arg]);
    assert_success(&r);
    let replay = stdout(&r);
    let _ = std::fs::remove_file(&path);
    assert!(
        replay.contains("events on simulated memory")
            && replay.contains(&format!("peak live {peak} ")),
        "demo: {line}\nreplay:\n{replay}"
    );
}

/// A Chrome trace or an allocation trace that cannot be created fails the demo, naming the flag
/// and the path.
#[test]
fn demo_reports_a_trace_it_cannot_write() {
    for (flag, file) in [("--trace", "trace.json"), ("--alloc-trace", "alloc.csv")] {
        let path = scratch("no-such-dir").join(file);
        let o = unibuf(&["demo", "--tokens", "1", flag, path.to_str().expect("UTF-8")]);
        assert_clean_failure(&o, &[flag, "no-such-dir"]);
    }
}

#[test]
fn demo_rejects_zero_sizes() {
    for flag in [
        "--hidden",
        "--ffn",
        "--layers",
        "--experts",
        "--experts-per-token",
        "--budget",
        "--vocab",
        "--tokens",
    ] {
        let o = unibuf(&["demo", flag, "0"]);
        assert_clean_failure(&o, &[flag]);
    }
}

#[test]
fn demo_rejects_values_that_are_not_sizes() {
    for (flag, value) in [
        ("--hidden", "-1"),
        ("--layers", "many"),
        ("--tokens", "1.5"),
        ("--temperature", "warm"),
    ] {
        let o = unibuf(&["demo", flag, value]);
        assert_clean_failure(&o, &[]);
    }
}

#[test]
fn demo_refuses_bad_combinations_naming_the_flag() {
    for (flags, needle) in [
        (&["--hidden", "100"][..], "--hidden 100"),
        (&["--ffn", "1000"][..], "--ffn 1000"),
        (
            &["--experts", "4", "--experts-per-token", "5"][..],
            "--experts-per-token 5",
        ),
        (&["--experts", "4", "--budget", "5"][..], "--budget 5"),
        (&["--temperature", "-1"][..], "--temperature"),
        (&["--top-p", "0"][..], "--top-p"),
        (&["--top-k", "5000"][..], "--top-k"),
    ] {
        let o = unibuf(&[&["demo"][..], flags].concat());
        assert_clean_failure(&o, &[needle]);
    }
}

#[test]
fn demo_refuses_a_model_larger_than_the_device() {
    let o = unibuf(&["demo", "--hidden", "1000000", "--layers", "1000"]);
    assert_clean_failure(&o, &["needs about", "--hidden 1000000", "--layers 1000"]);
    let o = unibuf(&["demo", "--hidden", "4000000000"]);
    assert_clean_failure(&o, &["--hidden"]);
    let o = unibuf(&["demo", "--experts", "4000000000", "--budget", "1"]);
    assert_clean_failure(&o, &["--experts 4000000000"]);
}

#[test]
fn bench_transfers_measures_every_path_beside_its_ceiling() {
    let json = scratch("bench.json");
    let o = unibuf(&[
        "bench",
        "transfers",
        "--sizes",
        "64K,1M",
        "--samples",
        "1",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_success(&o);
    let out = stdout(&o);
    for op in [
        "h2d_pinned",
        "h2d_pageable",
        "h2d_external",
        "d2h_pinned",
        "d2h_pageable",
        "d2h_external",
        "d2d_copy",
        "fill_u8",
        "fill_u32",
        "fill_u64",
    ] {
        assert_eq!(
            out.lines().filter(|l| l.starts_with(op)).count(),
            2,
            "{op} at two sizes:\n{out}"
        );
    }
    let text = std::fs::read_to_string(&json).unwrap();
    assert!(text.starts_with('{') && text.contains("\"rows\""));
    assert_eq!(text.matches("\"unibuf_gbps\"").count(), 20);
    assert!(
        !text.contains("\"unibuf_gbps\":0.0000"),
        "every path moved bytes"
    );
    let _ = std::fs::remove_file(json);
}

#[test]
fn bench_rejects_sizes_that_are_not_sizes() {
    let o = unibuf(&["bench", "transfers", "--sizes", "12Q"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("12Q"), "{}", stderr(&o));
    let o = unibuf(&["bench", "transfers", "--samples", "0"]);
    assert!(!o.status.success());
}

#[test]
fn bench_kernels_times_every_op_on_the_device() {
    let json = scratch("bench-kernels.json");
    let o = unibuf(&[
        "bench",
        "kernels",
        "--small",
        "--iters",
        "2",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_success(&o);
    let out = stdout(&o);
    for op in [
        "rms_norm f16",
        "rms_norm bf16",
        "rms_norm f32",
        "rms_norm+residual f16",
        "softmax f16",
        "softmax f32",
        "swiglu f16",
        "rope neox f16",
        "q4 matvec",
        "q4 matvec q8",
        "ggml matvec Q8_0",
        "ggml matvec Q4_0",
        "ggml matvec Q4_1",
        "quantize q8",
        "sample top-k 50",
    ] {
        assert!(
            out.lines().any(|l| l.starts_with(op)),
            "{op} measured:\n{out}"
        );
    }
    let text = std::fs::read_to_string(&json).unwrap();
    assert_eq!(text.matches("\"op\":").count(), 16, "{text}");
    assert!(
        !text.contains("\"device_us\":null"),
        "the CPU backend times every submission: {text}"
    );
    let _ = std::fs::remove_file(json);
}
