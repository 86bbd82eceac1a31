//! Kernels through the registry on every backend: each test kernel carries a CUDA C and a Rust
//! CPU version, checked against f64 references; and the pipeline cache's layers.

use unibuf::{
    Constants, DType, KernelArg, KernelSource, LaunchDims, Param, ScalarType, StorageMode,
};
use unibuf_conformance::{builder, device, poison, Rng};

/// y = a * x + y.
static SAXPY: KernelSource = KernelSource {
    name: "conf_saxpy_f32",
    params: &[
        Param::input("x", DType::F32),
        Param::output("y", DType::F32),
        Param::scalar("a", ScalarType::F32),
        Param::scalar("n", ScalarType::U32),
    ],
    cuda: Some(
        r#"extern "C" __global__ void conf_saxpy_f32(const float* x, float* y, float a, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i] + y[i];
}"#,
    ),
    msl: Some(
        r#"#include <metal_stdlib>
using namespace metal;
kernel void conf_saxpy_f32(const device float* x [[buffer(0)]], device float* y [[buffer(1)]],
                           constant float& a [[buffer(2)]], constant uint& n [[buffer(3)]],
                           uint i [[thread_position_in_grid]]) {
    if (i < n) y[i] = a * x[i] + y[i];
}"#,
    ),
    cpu: Some(|args| {
        let x = args.input::<f32>(0)?;
        let a = args.f32(2)?;
        let n = args.u32(3)? as usize;
        let y = args.output::<f32>(1)?;
        for i in 0..n {
            y[i] += a * x[i];
        }
        Ok(())
    }),
};

/// out[i] = in[i] * FACTOR, with FACTOR a specialisation constant; writes every element of out.
static SCALE: KernelSource = KernelSource {
    name: "conf_scale_i32",
    params: &[
        Param::input("src", DType::I32),
        Param::output("dst", DType::I32),
        Param::scalar("n", ScalarType::U32),
    ],
    cuda: Some(
        r#"#ifndef FACTOR
#define FACTOR 1
#endif
extern "C" __global__ void conf_scale_i32(const int* src, int* dst, unsigned int n) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        dst[i] = src[i] * FACTOR;
}"#,
    ),
    // FACTOR is a function constant on Metal; 1 where the pipeline is not specialised with it.
    msl: Some(
        r#"#include <metal_stdlib>
using namespace metal;
constant int FACTOR [[function_constant(0)]];
constant int factor = is_function_constant_defined(FACTOR) ? FACTOR : 1;
kernel void conf_scale_i32(const device int* src [[buffer(0)]], device int* dst [[buffer(1)]],
                           constant uint& n [[buffer(2)]], uint gid [[thread_position_in_grid]],
                           uint grid [[threads_per_grid]]) {
    for (uint i = gid; i < n; i += grid)
        dst[i] = src[i] * factor;
}"#,
    ),
    cpu: Some(|args| {
        let factor = args.constant("FACTOR").unwrap_or(1) as i32;
        let src = args.input::<i32>(0)?;
        let dst = args.output::<i32>(1)?;
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.wrapping_mul(factor);
        }
        Ok(())
    }),
};

fn blocks(n: usize) -> u32 {
    n.div_ceil(256).max(1) as u32
}

/// saxpy on views at odd offsets and sizes, in every mode, against an f64 reference.
#[test]
fn saxpy_matches_an_f64_reference() {
    let dev = device();
    dev.register_kernel(SAXPY).unwrap();
    let k = dev.kernel("conf_saxpy_f32").unwrap();
    let q = dev.queue();
    let mut rng = Rng::new("saxpy_matches_an_f64_reference");
    for mode in [StorageMode::Private, StorageMode::Shared] {
        for n in [1usize, 7, 4097, 65_536 + 3] {
            let x_all = dev.alloc(DType::F32, &[n + 5], mode).unwrap();
            let y_all = dev.alloc(DType::F32, &[n + 3], mode).unwrap();
            poison(&dev, &x_all);
            poison(&dev, &y_all);
            let (x, y) = (
                x_all.slice(5..n + 5).unwrap(),
                y_all.slice(1..n + 1).unwrap(),
            );
            let (xv, yv): (Vec<f32>, Vec<f32>) = (rng.elements(n), rng.elements(n));
            let a = rng.f32() * 4.0;
            q.upload(&x, &xv).unwrap();
            q.upload(&y, &yv).unwrap();
            let args = [
                KernelArg::from(&x),
                KernelArg::from(&y),
                a.into(),
                (n as u32).into(),
            ];
            q.launch(&k, LaunchDims::linear(blocks(n), 256), &args)
                .unwrap();
            let got: Vec<f32> = q.download(&y).unwrap();
            for i in 0..n {
                let want = f64::from(a) * f64::from(xv[i]) + f64::from(yv[i]);
                let err = (f64::from(got[i]) - want).abs();
                assert!(
                    err <= 1e-6 * (1.0 + want.abs()),
                    "{mode:?} n={n} i={i}: {} vs {want}",
                    got[i]
                );
            }
            let around: Vec<u32> = q.download(&y_all.cast(DType::U32).unwrap()).unwrap();
            assert_eq!(
                (around[0], around[n + 1], around[n + 2]),
                (0xA5A5_A5A5, 0xA5A5_A5A5, 0xA5A5_A5A5),
                "wrote outside the view"
            );
        }
    }
}

/// Constants specialise pipelines; each (name, constants) compiles once per device.
#[test]
fn constants_specialise_and_pipelines_are_cached() {
    let dev = device();
    dev.register_kernel(SCALE).unwrap();
    let mut rng = Rng::new("constants_specialise_and_pipelines_are_cached");
    let n = 1000 + rng.range(0, 100);
    let src = dev.alloc(DType::I32, &[n], StorageMode::Private).unwrap();
    let dst = dev.alloc(DType::I32, &[n], StorageMode::Private).unwrap();
    let data: Vec<i32> = (0..n).map(|_| rng.range(0, 2001) as i32 - 1000).collect();
    dev.queue().upload(&src, &data).unwrap();
    // Fills may compile the backend's own fill kernel: do one first, so that the counts below
    // are those of this test's kernel alone.
    poison(&dev, &dst);
    let before = dev.kernel_cache_stats();
    for factor in [3i64, -7, 3] {
        poison(&dev, &dst);
        let k = dev
            .kernel_with("conf_scale_i32", &Constants::new().with("FACTOR", factor))
            .unwrap();
        assert_eq!(k.constants().get("FACTOR"), Some(factor));
        dev.queue()
            .launch(
                &k,
                LaunchDims::linear(4, 128),
                &[(&src).into(), (&dst).into(), (n as u32).into()],
            )
            .unwrap();
        let got: Vec<i32> = dst.to_vec().unwrap();
        assert!(
            got.iter().zip(&data).all(|(g, d)| *g == d * factor as i32),
            "FACTOR={factor}"
        );
    }
    let s = dev.kernel_cache_stats();
    assert_eq!(
        (s.compiled + s.disk_hits) - (before.compiled + before.disk_hits),
        2,
        "two distinct specialisations: {before:?} then {s:?}"
    );
    assert!(
        s.memory_hits > before.memory_hits,
        "the repeated one came from memory: {before:?} then {s:?}"
    );
}

/// A second device (as a second process would) loads compiled kernels from the disk cache on
/// backends that compile; `warm_all` compiles every registered kernel up front.
#[test]
fn a_second_start_compiles_nothing() {
    let dir = std::env::temp_dir().join(format!(
        "unibuf-kcache-{}-{}",
        std::process::id(),
        Rng::new("kcache").next_u64()
    ));
    let open = || {
        let dev = builder()
            .kernel_cache_dir(Some(dir.clone()))
            .open()
            .unwrap();
        dev.register_kernel(SAXPY).unwrap();
        dev.register_kernel(SCALE).unwrap();
        dev
    };
    let first = open();
    first.kernel("conf_saxpy_f32").unwrap();
    let s1 = first.kernel_cache_stats();
    let second = open();
    second.kernel("conf_saxpy_f32").unwrap();
    let s2 = second.kernel_cache_stats();
    if second.info().backend == "cuda" {
        assert_eq!((s1.compiled, s1.disk_hits), (1, 0), "{s1:?}");
        assert_eq!(
            (s2.compiled, s2.disk_hits),
            (0, 1),
            "nothing compiled the second time: {s2:?}"
        );
    } else {
        // The CPU backend's kernels are Rust functions: "compiling" is a lookup.
        assert_eq!(s1.compiled, 1);
    }
    let third = open();
    // Every registered kernel: these two and the built-in ops' kernels.
    let names = third.kernel_names();
    assert!(names.contains(&"conf_saxpy_f32") && names.contains(&"conf_scale_i32"));
    let warmed = third.warm_all().unwrap();
    assert!(
        warmed >= names.len(),
        "{warmed} pipelines for {} kernels",
        names.len()
    );
    assert_eq!(
        third.warm_all().unwrap(),
        warmed,
        "a second warm-up compiles nothing"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Labelled submissions are counted per label with their encode, wait and device times.
#[test]
fn submission_stats_count_and_time_each_label() {
    let dev = builder().gpu_timing(true).open().unwrap();
    dev.register_kernel(SAXPY).unwrap();
    let k = dev.kernel("conf_saxpy_f32").unwrap();
    let n = 1 << 20;
    let x = dev.alloc(DType::F32, &[n], StorageMode::Private).unwrap();
    let y = dev.alloc(DType::F32, &[n], StorageMode::Private).unwrap();
    let q = dev.queue();
    q.fill(&x, unibuf::FillPattern::of(1.0f32)).unwrap();
    q.fill(&y, unibuf::FillPattern::of(2.0f32)).unwrap();
    dev.drain().unwrap();
    dev.reset_submission_stats();
    let step = q.labelled("decode step");
    let args = [
        KernelArg::from(&x),
        KernelArg::from(&y),
        0.5f32.into(),
        (n as u32).into(),
    ];
    let mut fence = None;
    for _ in 0..5 {
        fence = Some(
            step.launch(&k, LaunchDims::linear(blocks(n), 256), &args)
                .unwrap(),
        );
    }
    q.wait(fence.unwrap()).unwrap();
    let other = q
        .launch(&k, LaunchDims::linear(blocks(n), 256), &args)
        .unwrap();
    q.wait(other).unwrap();
    let stats = dev.submission_stats();
    let s = stats.get("decode step").expect("the label is counted");
    assert_eq!(s.count, 5);
    assert!(s.encode_ns > 0);
    // Waits count only when they find the work running: certain on the CPU backend (a
    // million-element saxpy in a debug build), a race on a fast GPU.
    let cpu = dev.info().backend == "cpu";
    assert!(s.waits <= 1, "one wait named a fence of this label");
    if cpu {
        assert_eq!(s.waits, 1);
    }
    assert!(stats.gpu_timing, "gpu_timing(true) was asked for");
    assert_eq!(s.timed, 5, "every completed submission has a device time");
    assert!(s.gpu_ns > 0);
    let unlabelled = stats
        .get("conf_saxpy_f32")
        .expect("the kernel name labels it");
    assert_eq!(unlabelled.count, 1);
    assert!(unlabelled.waits <= 1);
    let table = stats.to_string();
    assert!(
        table.contains("decode step") && table.contains("conf_saxpy_f32"),
        "{table}"
    );
    assert_eq!(
        q.download::<f32>(&y.slice(0..1).unwrap()).unwrap(),
        [2.0 + 6.0 * 0.5]
    );
    dev.reset_submission_stats();
    assert!(dev.submission_stats().labels.is_empty());
}

/// Launches the saxpy `launches` times on `q` over fresh `n`-element buffers, draining every
/// 256 launches (so that the stats window fills with completed submissions), then drains.
fn saxpy_many(
    dev: &unibuf::Device,
    k: &unibuf::Kernel,
    q: &unibuf::Queue,
    n: usize,
    launches: u64,
) {
    let x = dev.alloc(DType::F32, &[n], StorageMode::Private).unwrap();
    let y = dev.alloc(DType::F32, &[n], StorageMode::Private).unwrap();
    let args = [
        KernelArg::from(&x),
        KernelArg::from(&y),
        0.5f32.into(),
        (n as u32).into(),
    ];
    for i in 0..launches {
        q.launch(k, LaunchDims::linear(blocks(n), 256), &args)
            .unwrap();
        if i % 256 == 255 {
            q.drain().unwrap();
        }
    }
    q.drain().unwrap();
}

/// More submissions than the stats keep pending at once (4096): those completed are harvested
/// as the window fills, so every one is counted and timed.
#[test]
fn submission_stats_time_every_submission_past_the_window() {
    let dev = builder().gpu_timing(true).open().unwrap();
    dev.register_kernel(SAXPY).unwrap();
    let k = dev.kernel("conf_saxpy_f32").unwrap();
    let q = dev.queue().labelled("many");
    let launches = 5000;
    saxpy_many(&dev, &k, &q, 257, launches);
    let stats = dev.submission_stats();
    let s = stats.get("many").expect("the label is counted");
    assert_eq!(s.count, launches);
    assert_eq!(
        s.timed, launches,
        "no completed submission's time was dropped"
    );
}

/// Two queues, one slow and one fast: while the slow queue's work runs, the fast queue's
/// submissions fill the stats window. The window is cleared of the fast queue's completed
/// entries rather than of the slow queue's running ones, which keep their device and wait
/// times.
#[test]
fn submission_stats_keep_a_slow_queue_while_another_fills_the_window() {
    let dev = builder().gpu_timing(true).open().unwrap();
    dev.register_kernel(SAXPY).unwrap();
    let k = dev.kernel("conf_saxpy_f32").unwrap();
    let big = 1 << 20;
    let (x, y) = (
        dev.alloc(DType::F32, &[big], StorageMode::Private).unwrap(),
        dev.alloc(DType::F32, &[big], StorageMode::Private).unwrap(),
    );
    let slow = dev.queue().labelled("slow");
    let fast = dev.new_queue("fast queue").unwrap().labelled("fast");
    let big_args = [
        KernelArg::from(&x),
        KernelArg::from(&y),
        0.5f32.into(),
        (big as u32).into(),
    ];
    // The scenario needs the slow work still running once the fast queue has filled the
    // window (4096 submissions): more slow work on each try until it is.
    for tries in 0..4 {
        let slow_launches = 30u64 << (2 * tries);
        dev.reset_submission_stats();
        let mut last = None;
        for _ in 0..slow_launches {
            last = Some(
                slow.launch(&k, LaunchDims::linear(blocks(big), 256), &big_args)
                    .unwrap(),
            );
        }
        let last = last.unwrap();
        saxpy_many(&dev, &k, &fast, 255, 4096);
        let overlapped = !dev.is_complete(last).unwrap();
        saxpy_many(&dev, &k, &fast, 255, 904);
        slow.wait(last).unwrap();
        if !overlapped {
            continue;
        }
        let stats = dev.submission_stats();
        let s = stats.get("slow").expect("the slow label is counted");
        assert_eq!(s.count, slow_launches);
        assert_eq!(
            s.timed, slow_launches,
            "the slow queue's submissions kept their device time"
        );
        // The wait is counted if it found the slow work still running.
        assert!(s.waits <= 1);
        let f = stats.get("fast").expect("the fast label is counted");
        assert_eq!((f.count, f.timed), (5000, 5000));
        return;
    }
    // A GPU may finish any amount of this work before the host submits 4096 launches; the
    // CPU backend never does.
    assert_ne!(
        dev.info().backend,
        "cpu",
        "the slow queue never outlasted the fast queue's 4096 submissions"
    );
}

/// A launch batch replays its launches in order as one submission, reads the buffers' contents
/// as they are at each submission, and is ordered with transfers on the same memory.
#[test]
fn launch_batches_replay_in_order_with_current_contents() {
    use unibuf::{ops, Error, LaunchBatch};
    let dev = device();
    dev.register_kernel(SAXPY).unwrap();
    let k = dev.kernel("conf_saxpy_f32").unwrap();
    let q = dev.queue();
    let mut rng = Rng::new("launch_batches_replay_in_order_with_current_contents");
    let n = 4097;
    let x = dev.alloc(DType::F32, &[n], StorageMode::Private).unwrap();
    let y = dev
        .alloc(DType::F32, &[1, n], StorageMode::Private)
        .unwrap();
    let z = dev
        .alloc(DType::F32, &[1, n], StorageMode::Private)
        .unwrap();
    let w: Vec<f32> = rng.elements(n);
    let w_buf = dev.from_slice("w", &w, &[n]).unwrap();
    let mut y_host: Vec<f32> = rng.elements(n);
    q.upload(&y.reshape(&[n]).unwrap(), &y_host).unwrap();
    poison(&dev, &z);
    let a = 0.75f32;
    // y += a x, then z = rms_norm(y) * w: the norm must see the saxpy's result.
    let mut step = LaunchBatch::new(&dev, "batched step");
    let y_flat = y.reshape(&[n]).unwrap();
    step.push(
        &k,
        LaunchDims::linear(blocks(n), 256),
        &[(&x).into(), (&y_flat).into(), a.into(), (n as u32).into()],
    )
    .unwrap();
    step.push_with(|rq| ops::rms_norm_into(rq, &y, &w_buf, 1e-6, &z))
        .unwrap();
    assert_eq!(step.len(), 2);
    for round in 0..3 {
        let x_host: Vec<f32> = rng.elements(n);
        q.upload(&x, &x_host).unwrap();
        q.launch_batch(&step).unwrap();
        let got: Vec<f32> = q.download(&z.reshape(&[n]).unwrap()).unwrap();
        for i in 0..n {
            y_host[i] += a * x_host[i];
        }
        let ms: f64 = y_host
            .iter()
            .map(|v| f64::from(*v) * f64::from(*v))
            .sum::<f64>()
            / n as f64;
        let scale = 1.0 / (ms + 1e-6).sqrt();
        for i in 0..n {
            let want = f64::from(y_host[i]) * scale * f64::from(w[i]);
            let err = (f64::from(got[i]) - want).abs();
            assert!(
                err <= 1e-5 * (1.0 + want.abs()),
                "round {round} i={i}: {} vs {want}",
                got[i]
            );
        }
    }
    let stats = dev.submission_stats();
    assert_eq!(stats.get("batched step").unwrap().count, 3);
    // A launch added after submissions makes a new sequence: the next submission runs all three.
    step.push(
        &k,
        LaunchDims::linear(blocks(n), 256),
        &[(&x).into(), (&y_flat).into(), a.into(), (n as u32).into()],
    )
    .unwrap();
    assert_eq!(step.len(), 3);
    let x_host: Vec<f32> = rng.elements(n);
    q.upload(&x, &x_host).unwrap();
    q.launch_batch(&step).unwrap();
    let got: Vec<f32> = q.download(&y_flat).unwrap();
    for i in 0..n {
        // The norm read y between the two saxpys; y itself has both.
        let want = f64::from(y_host[i]) + 2.0 * f64::from(a) * f64::from(x_host[i]);
        let err = (f64::from(got[i]) - want).abs();
        assert!(
            err <= 1e-5 * (1.0 + want.abs()),
            "i={i}: {} vs {want}",
            got[i]
        );
    }
    // Bad batches are refused before anything runs.
    let empty = LaunchBatch::new(&dev, "empty");
    assert!(matches!(
        q.launch_batch(&empty),
        Err(Error::InvalidArgument { .. })
    ));
    let other = device();
    assert!(matches!(
        other.queue().launch_batch(&step),
        Err(Error::WrongDevice {
            what: "launch batch",
            ..
        })
    ));
    let mut bad = LaunchBatch::new(&dev, "bad");
    let u = dev.alloc(DType::U32, &[n], StorageMode::Private).unwrap();
    assert!(matches!(
        bad.push(
            &k,
            LaunchDims::linear(blocks(n), 256),
            &[(&u).into(), (&y_flat).into(), a.into(), (n as u32).into()],
        ),
        Err(Error::DTypeMismatch { .. })
    ));
    assert!(bad.is_empty(), "a refused launch is not recorded");
    assert!(matches!(
        bad.push_with(|rq| rq.launch_batch(&step)),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(bad.is_empty());
}
