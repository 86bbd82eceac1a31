//! `unibuf bench launch`: host time per kernel launch, beside the driver's bare cuLaunchKernel.
//!
//! A kernel that does nothing is launched many times on one queue without waiting; the host time
//! per launch is what an inference engine pays per op on its CPU thread. Two ways:
//! - in bursts of [`BURST`] launches, the device drained between bursts outside the timed part:
//!   the CPU cost of a launch. A burst stays well below the driver's queue of pending launches,
//!   so no launch waits for the GPU to make room.
//! - sustained, thousands back to back: once the queue is full each launch waits for the GPU to
//!   retire one, so this measures the device's rate of empty kernels as much as the CPU.
//!
//! The same launches are also recorded into a [`LaunchBatch`] of `BATCH` launches (a decode
//! step's worth) and submitted batch by batch: on CUDA one graph launch each, so the host time
//! per kernel is the batch's cost divided by `BATCH`.

use super::ceiling::Ceiling;
use std::time::Instant;
use unibuf::{
    DType, Device, KernelSource, LaunchBatch, LaunchDims, Param, Result, ScalarType, StorageMode,
};

/// Launches per batch in the batched measurement: about a decode step of a small model.
pub const BATCH: usize = 64;

/// Launches per timed burst: a decode step's worth, far below the driver's queue depth.
pub const BURST: usize = 128;

/// Host seconds per call of `launch`, `count` calls per sample, timed in bursts of `burst`
/// with `drain` between them (untimed), median of `samples` after a warm-up sample.
pub fn per_launch_seconds<E>(
    count: usize,
    burst: usize,
    samples: usize,
    mut launch: impl FnMut() -> std::result::Result<(), E>,
    mut drain: impl FnMut() -> std::result::Result<(), E>,
) -> std::result::Result<f64, E> {
    let burst = burst.clamp(1, count.max(1));
    let mut times = Vec::with_capacity(samples);
    for sample in 0..=samples {
        let (mut spent, mut done) = (0.0, 0);
        while done < count.max(1) {
            let n = burst.min(count.max(1) - done);
            let t = Instant::now();
            for _ in 0..n {
                launch()?;
            }
            spent += t.elapsed().as_secs_f64();
            drain()?;
            done += n;
        }
        if sample > 0 {
            times.push(spent / done as f64); // sample 0 warms up
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times.get(times.len() / 2).copied().unwrap_or(0.0))
}

/// The empty kernel: its CUDA C is shared with the driver ceiling.
pub const NOOP_CUDA: &str = r#"extern "C" __global__ void unibuf_bench_noop(unsigned int* out, unsigned int n) {
    if (n != 0u && threadIdx.x == 0u) out[0] = n;
}"#;

/// The empty kernel as a registry entry.
pub static NOOP: KernelSource = KernelSource {
    name: "unibuf_bench_noop",
    params: &[
        Param::output("out", DType::U32),
        Param::scalar("n", ScalarType::U32),
    ],
    cuda: Some(NOOP_CUDA),
    msl: Some(
        r#"#include <metal_stdlib>
using namespace metal;
kernel void unibuf_bench_noop(device uint* out [[buffer(0)]], constant uint& n [[buffer(1)]],
                              uint tid [[thread_position_in_threadgroup]]) {
    if (n != 0u && tid == 0u) out[0] = n;
}"#,
    ),
    cpu: Some(|args| {
        let n = args.u32(1)?;
        if n != 0 {
            args.output::<u32>(0)?[0] = n;
        }
        Ok(())
    }),
};

/// Microseconds of host time per launch: unibuf, and the ceiling where it can measure one.
pub struct LaunchFigures {
    /// unibuf's typed, checked launch, in bursts of [`BURST`] (the CPU cost).
    pub unibuf_us: f64,
    /// The same, sustained: `count` launches back to back.
    pub unibuf_sustained_us: f64,
    /// Per kernel, submitted as batches of [`BATCH`] launches.
    pub batched_us: f64,
    /// The platform's bare launch in bursts of [`BURST`].
    pub ceiling_us: Option<f64>,
    /// The platform's bare launch, sustained.
    pub ceiling_sustained_us: Option<f64>,
}

/// Launches `count` times per sample and reports the median of `samples` samples.
pub fn run(
    dev: &Device,
    ceiling: &mut dyn Ceiling,
    count: usize,
    samples: usize,
) -> Result<LaunchFigures> {
    dev.register_kernel(NOOP)?;
    let kernel = dev.kernel(NOOP.name)?;
    let out = dev.alloc_labelled("bench launch", DType::U32, &[1], StorageMode::Private)?;
    let q = dev.queue().labelled("noop");
    let launch = || {
        q.launch(
            &kernel,
            LaunchDims::linear(1, 32),
            &[(&out).into(), 0u32.into()],
        )
        .map(drop)
    };
    let burst = per_launch_seconds(count, BURST, samples, launch, || q.drain())?;
    let sustained = per_launch_seconds(count, count, samples, launch, || q.drain())?;
    let mut batch = LaunchBatch::new(dev, "noop batch");
    for _ in 0..BATCH {
        batch.push(
            &kernel,
            LaunchDims::linear(1, 32),
            &[(&out).into(), 0u32.into()],
        )?;
    }
    let batches = count.div_ceil(BATCH).max(1);
    let mut batched = Vec::with_capacity(samples);
    for sample in 0..=samples {
        let t = Instant::now();
        for _ in 0..batches {
            q.launch_batch(&batch)?;
        }
        let per = t.elapsed().as_secs_f64() / (batches * BATCH) as f64;
        q.drain()?;
        if sample > 0 {
            batched.push(per); // sample 0 warms up (and prepares the batch)
        }
    }
    batched.sort_by(|a, b| a.total_cmp(b));
    Ok(LaunchFigures {
        unibuf_us: burst * 1e6,
        unibuf_sustained_us: sustained * 1e6,
        batched_us: batched[batched.len() / 2] * 1e6,
        ceiling_us: ceiling
            .launch_seconds(count, BURST, samples)
            .map(|s| s * 1e6),
        ceiling_sustained_us: ceiling
            .launch_seconds(count, count, samples)
            .map(|s| s * 1e6),
    })
}
