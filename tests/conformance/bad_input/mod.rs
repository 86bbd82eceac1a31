//! Bad input is an error, never a crash: every test feeds one public call an invalid argument
//! and asserts the exact `Error` variant, the values it carries, and that its message names the
//! offending values; then that the refused call changed nothing it should not have, and that
//! nothing leaked (everything dropped, `trim`, then no active, reserved or wrapped bytes). One
//! test per case, so that one failure does not hide the others.
//!
//! Cases per area (one test each; the counts are checked by `every_area_keeps_its_cases`):
//!
//! | area | file | cases |
//! |---|---|---|
//! | views (slice, rows, reshape, cast) | `views.rs` | 15 |
//! | dtype and length of transfers | `transfers.rs` | 11 |
//! | fills | `fills.rs` | 5 |
//! | copies | `copies.rs` | 5 |
//! | host access (guards, conflicts with device work) | `host_access.rs` | 13 |
//! | external wrapping | `external.rs` | 15 |
//! | kernels (registry, compile, launch checks) | `kernels.rs` | 23 |
//! | device and builder options, waits | `device_options.rs` | 11 |
//! | budgets and out of memory | `budgets.rs` | 10 |
//! | cross-device misuse | `cross_device.rs` | 12 |
//! | faults (sticky, reset, panics, a fault nobody waited for) | `faults.rs` | 12 |
//! | **total** | | **132** |
//!
//! A case that checks a call in every storage mode is one test that loops over the modes. The
//! launch checks run where the test kernel has a source (CPU, CUDA and Metal); the fault cases
//! run on the CPU only, where a kernel can return an error or panic and the device recovers with
//! `reset`: elsewhere those tests return at once. Caller memory wrapped here is page-aligned
//! (`PageBuffer`, file mappings) wherever it must register on a GPU, since CUDA registers whole
//! pages and refuses a page twice.

use unibuf::{
    CpuKernelArgs, DType, Device, KernelArg, KernelSource, PageBuffer, Param, ScalarType,
};
use unibuf_conformance::backend_name;

/// `refused!(call, Pattern [if guard], [needles...] [, context])`: `call` must fail with an
/// error matching the pattern (variant and values), whose message contains every needle.
/// Evaluates to the error. `context` (shown with `{:?}`) tells a failure in one pass of a loop,
/// such as the storage mode, from the others.
macro_rules! refused {
    ($call:expr, $pat:pat $(if $guard:expr)?, [$($needle:expr),* $(,)?] $(, $context:expr)?) => {{
        let context = String::new() $(+ &format!(" ({:?})", $context))?;
        match $call {
            Ok(_) => panic!("{}{context}: expected an error, got Ok", stringify!($call)),
            Err(e) => {
                assert!(
                    matches!(&e, $pat $(if $guard)?),
                    "{}{context}: wrong error: {e:?}",
                    stringify!($call)
                );
                let msg = e.to_string();
                $({
                    let needle: String = ($needle).to_string();
                    assert!(
                        msg.contains(&needle),
                        "{}{context}: message {msg:?} does not name {needle:?}",
                        stringify!($call)
                    );
                })*
                e
            }
        }
    }};
}

mod budgets;
mod copies;
mod cross_device;
mod device_options;
mod external;
mod faults;
mod fills;
mod host_access;
mod kernels;
mod transfers;
mod views;

/// Drains, trims, and checks that the device holds no memory: no live or cached allocation, no
/// wrapped region, no staging chunk.
fn assert_no_leak(dev: &Device) {
    dev.drain().expect("drain");
    dev.trim();
    let s = dev.memory_stats();
    assert!(
        s.active_bytes == 0 && s.reserved_bytes == 0 && s.external_count == 0,
        "memory leaked after bad input:\n{s}"
    );
    assert_eq!(s.active_count, 0, "{s}");
    assert_eq!(s.staging_bytes, 0, "{s}");
}

fn on_cpu() -> bool {
    backend_name() == "cpu"
}

/// Whether the test kernel `SCALE` has a source for the backend under test.
fn can_launch() -> bool {
    matches!(backend_name().as_str(), "cpu" | "cuda" | "metal")
}

/// Page-aligned memory holding `values`.
fn page_memory(values: &[f32]) -> PageBuffer {
    PageBuffer::from_slice(bytemuck::cast_slice(values)).expect("host memory")
}

// ---- the test kernel (launch checks and faults) -----------------------------------------------

fn scale_cpu(args: &mut CpuKernelArgs<'_>) -> Result<(), String> {
    let x = args.input::<f32>(0)?;
    let factor = args.f32(2)?;
    let y = args.output::<f32>(1)?;
    for (y, x) in y.iter_mut().zip(x) {
        *y = x * factor;
    }
    Ok(())
}

const SCALE_PARAMS: &[Param] = &[
    Param::input("x", DType::F32),
    Param::output("y", DType::F32),
    Param::scalar("factor", ScalarType::F32),
];

/// `y = x * factor`, on every backend.
const SCALE: KernelSource = KernelSource {
    name: "bad_input_scale",
    params: SCALE_PARAMS,
    cuda: Some(SCALE_CUDA),
    msl: Some(
        r#"#include <metal_stdlib>
using namespace metal;
kernel void bad_input_scale(const device float* x [[buffer(0)]], device float* y [[buffer(1)]],
                            constant float& factor [[buffer(2)]], uint i [[thread_position_in_grid]]) {
    y[i] = x[i] * factor;
}"#,
    ),
    cpu: Some(scale_cpu),
};

/// One thread per element: launch exactly as many threads as elements.
const SCALE_CUDA: &str = r#"
extern "C" __global__ void bad_input_scale(const float* x, float* y, float factor) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    y[i] = x[i] * factor;
}
"#;

fn scale_args<'a>(x: &'a unibuf::Buffer, y: &'a unibuf::Buffer, f: f32) -> [KernelArg<'a>; 3] {
    [x.into(), y.into(), f.into()]
}

// ---- the case count ---------------------------------------------------------------------------

/// Every area's file and the number of cases in the table above.
const AREAS: [(&str, &str, usize); 11] = [
    ("views.rs", include_str!("views.rs"), 15),
    ("transfers.rs", include_str!("transfers.rs"), 11),
    ("fills.rs", include_str!("fills.rs"), 5),
    ("copies.rs", include_str!("copies.rs"), 5),
    ("host_access.rs", include_str!("host_access.rs"), 13),
    ("external.rs", include_str!("external.rs"), 15),
    ("kernels.rs", include_str!("kernels.rs"), 23),
    ("device_options.rs", include_str!("device_options.rs"), 11),
    ("budgets.rs", include_str!("budgets.rs"), 10),
    ("cross_device.rs", include_str!("cross_device.rs"), 12),
    ("faults.rs", include_str!("faults.rs"), 12),
];

/// The total in the module documentation.
const TOTAL: usize = 132;

/// The `#[test]` functions of one area's source: each one's name and text, from its `fn` line
/// to the closing brace in the first column.
fn case_tests(source: &str) -> Vec<(&str, String)> {
    let lines: Vec<&str> = source.lines().collect();
    let mut tests = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim() != "#[test]" {
            continue;
        }
        let fn_line = lines[i + 1..]
            .iter()
            .position(|l| l.starts_with("fn "))
            .map(|p| i + 1 + p)
            .expect("a #[test] attribute is followed by its function");
        let name = lines[fn_line]["fn ".len()..]
            .split('(')
            .next()
            .expect("a function name");
        let end = lines[fn_line..]
            .iter()
            .position(|l| *l == "}")
            .map(|p| fn_line + p)
            .expect("a test function ends with a brace in the first column");
        tests.push((name, lines[fn_line..=end].join("\n")));
    }
    tests
}

/// The cases that open no device, and so have none to check for leaks: refused `open` calls.
const REFUSED_OPENS: [&str; 5] = [
    "opening_an_unknown_backend_is_unavailable",
    "a_builder_with_an_unknown_backend_is_unavailable",
    "staging_chunks_below_4096_bytes_are_invalid",
    "staging_with_no_chunks_is_invalid",
    "a_ledger_capacity_of_0_is_invalid",
];

/// The case count cannot drift: a case that is deleted, or a test that stops checking its
/// refusal, fails here rather than passing unseen. Every area's file holds the number of tests
/// in the module's table; each of them checks exactly one refusal (`refused!`), and each checks
/// its devices for leaks, but for the refused opens, which leave no device to look at.
#[test]
fn every_area_keeps_its_cases() {
    let mut total = 0;
    let mut names = Vec::new();
    for (file, source, expected) in AREAS {
        let tests = case_tests(source);
        assert_eq!(
            tests.len(),
            expected,
            "{file} holds {} cases, the table says {expected}: {:#?}",
            tests.len(),
            tests.iter().map(|(n, _)| n).collect::<Vec<_>>()
        );
        for (name, body) in &tests {
            assert_eq!(
                body.matches("refused!(").count(),
                1,
                "{file}: {name} must check exactly one refusal"
            );
            if REFUSED_OPENS.contains(name) {
                assert!(
                    body.contains("open(") && !body.contains("unwrap") && !body.contains("dev"),
                    "{file}: {name} is listed as a refused open but holds a device"
                );
            } else {
                assert!(
                    body.contains("assert_no_leak("),
                    "{file}: {name} does not check its device for leaks"
                );
            }
            names.push(*name);
        }
        total += tests.len();
    }
    assert_eq!(total, TOTAL, "the areas add up to the documented total");
    for open in REFUSED_OPENS {
        assert!(names.contains(&open), "no case {open}");
    }
    let before = names.len();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), before, "every case has a name of its own");
}
