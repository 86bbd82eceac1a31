//! Device faults: classified, naming the submission's label, sticky until reset.
//!
//! A fault on a GPU poisons the whole process's context, so each scenario runs in a child
//! process: the test below re-runs this binary on one ignored test with `UNIBUF_FAULT`.

use unibuf::{DType, Error, FaultKind, FillPattern, KernelSource, LaunchDims, Param, StorageMode};
use unibuf_conformance::{backend_name, device};

/// Writes its output, then traps (CUDA `__trap()`; the CPU version returns an error).
static TRAP: KernelSource = KernelSource {
    name: "conf_trap",
    params: &[Param::output("out", DType::U32)],
    cuda: Some(
        r#"extern "C" __global__ void conf_trap(unsigned int* out) { out[0] = 1u; __trap(); }"#,
    ),
    // The Metal Shading Language has no trap or abort: no MSL version can fault this way.
    msl: None,
    cpu: Some(|args| {
        args.output::<u32>(0)?[0] = 1;
        Err("trap requested by the test".to_owned())
    }),
};

/// Writes through a wild pointer (CUDA); the CPU version panics, as a bad slice index would.
static WILD: KernelSource = KernelSource {
    name: "conf_wild_write",
    params: &[Param::output("out", DType::U32)],
    cuda: Some(
        r#"extern "C" __global__ void conf_wild_write(unsigned int* out) {
    unsigned int* wild = (unsigned int*)(out - (1ull << 40));
    wild[threadIdx.x] = 7u;
}"#,
    ),
    msl: Some(
        r#"#include <metal_stdlib>
using namespace metal;
kernel void conf_wild_write(device uint* out [[buffer(0)]],
                            uint tid [[thread_position_in_threadgroup]]) {
    device uint* wild = out - (1ul << 40);
    wild[tid] = 7u;
}"#,
    ),
    cpu: Some(|args| {
        let out = args.output::<u32>(0)?;
        let beyond = out.len() + 1_000_000;
        out[beyond] = 7; // panics: out of bounds
        Ok(())
    }),
};

fn run_child(scenario: &str) {
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args([
            "--exact",
            "faults::fault_scenario",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("UNIBUF_FAULT", scenario)
        .env(unibuf::BACKEND_ENV, backend_name())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("1 passed"),
        "scenario {scenario} failed:\n{text}"
    );
}

/// A kernel that traps and one that writes through a wild pointer each fault the device.
/// (Metal has no trap: only the wild write runs there.)
#[test]
fn device_faults_are_classified_sticky_and_named() {
    if backend_name() != "metal" {
        run_child("trap");
    }
    run_child("wild");
}

#[test]
#[ignore = "run in a child process by device_faults_are_classified_sticky_and_named"]
fn fault_scenario() {
    let scenario = std::env::var("UNIBUF_FAULT").expect("set by the parent test");
    let dev = device();
    let backend = dev.info().backend;
    let cuda = backend == "cuda";
    let source = if scenario == "trap" { TRAP } else { WILD };
    dev.register_kernel(source).unwrap();
    let k = dev.kernel(source.name).unwrap();
    let out = dev.alloc(DType::U32, &[256], StorageMode::Private).unwrap();
    let q = dev.queue().labelled("faulty step");
    let fence = q
        .launch(&k, LaunchDims::linear(1, 32), &[(&out).into()])
        .unwrap();
    let err = dev.wait(fence).unwrap_err();
    let Error::DeviceFault {
        kind,
        label,
        detail,
    } = &err
    else {
        panic!("not a fault: {err}")
    };
    assert_eq!(label, "faulty step", "{err}");
    let kinds: &[FaultKind] = match (backend, scenario.as_str()) {
        ("cuda", "trap") => &[FaultKind::Trap, FaultKind::LaunchFailed],
        ("cuda", _) => &[FaultKind::IllegalAddress],
        // Apple GPUs report a wild write as a page fault or an invalid resource; some
        // drivers give only the generic command-buffer error.
        ("metal", _) => &[
            FaultKind::PageFault,
            FaultKind::InvalidResource,
            FaultKind::Other,
        ],
        _ => &[FaultKind::Trap],
    };
    assert!(kinds.contains(kind), "{scenario}: {kind:?} ({detail})");
    // Sticky: every later call reports the same fault, nothing returns data.
    assert!(matches!(
        dev.alloc(DType::U8, &[16], StorageMode::Shared),
        Err(Error::DeviceFault { .. })
    ));
    assert!(matches!(
        dev.queue().fill(&out, FillPattern::u32(5)),
        Err(Error::DeviceFault { .. })
    ));
    assert!(matches!(
        dev.queue().download::<u32>(&out),
        Err(Error::DeviceFault { .. })
    ));
    assert!(dev.fault().is_some());
    if cuda {
        // A CUDA context that faulted is lost with its memory: reset says so, the fault stays.
        assert!(matches!(dev.reset(), Err(Error::Unsupported { .. })));
        assert!(dev.fault().is_some());
    } else {
        dev.reset().unwrap();
        dev.queue().fill(&out, FillPattern::u32(5)).unwrap();
        assert_eq!(dev.queue().download::<u32>(&out).unwrap(), vec![5; 256]);
    }
}
