//! Interop: memory and work unibuf does not own, under the same fences as its own.
//!
//! ```text
//! cargo run -p unibuf --example interop
//! UNIBUF_BACKEND=cuda cargo run -p unibuf --features cuda --example interop
//! ```
//!
//! - host memory the program has (an mmap'd file, a framework's array) wrapped as External;
//! - foreign memory wrapped with its owner, dropped only after unibuf's last use;
//! - DLPack out and back in, as `__dlpack__` / `from_dlpack` pass tensors between frameworks;
//! - foreign work (a library call, a kernel of the engine's own) run on a unibuf queue with
//!   `Queue::external`, and a queue waiting for a foreign stream.
//!
//! The last two use host pointers and host signals, so they run on the CPU backend; on CUDA the
//! same calls take a `CUstream` and device pointers (see the README's Interop section).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use unibuf::interop::dlpack::{DlpackStream, DlpackTensor, ImportOptions};
use unibuf::interop::{ForeignAccess, ForeignMemory, HostSignal, NativeBuffer, NativeEncoder};
use unibuf::{ops, DType, Device, Direction, FillPattern, StorageMode};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> Result<()> {
    let dev = Device::new()?;
    let q = dev.queue();
    println!("device {:?}, queue {:?}", dev.native(), q.native()?);

    // 1. External: the program's memory, wrapped without a copy; kernels read it in place.
    // (Page-aligned memory: CUDA registers whole pages, which two wraps must not share.)
    let logits: Vec<u8> = (0..1024)
        .flat_map(|i| ((i % 10) as f32).to_le_bytes())
        .collect();
    let page = unibuf::PageBuffer::from_slice(&logits)?;
    let ext = dev.wrap_external("logits", page, DType::F32, &[4, 256])?;
    let probs = ops::softmax(&q, &ext)?;
    let p = q.download::<f32>(&probs)?;
    ensure((p[..256].iter().sum::<f32>() - 1.0).abs() < 1e-5, "softmax")?;
    let uploads = dev.ledger().totals().contains_key(&Direction::HostToDevice);
    ensure(!uploads, "the kernel read the wrapped memory in place")?;
    let wrapped = dev.memory_stats().external_bytes;
    println!("External: {wrapped} bytes wrapped and read in place by softmax, nothing uploaded");

    // 2. DLPack out and back in, through the raw pointer a Python capsule would carry.
    let x = dev.from_slice("x", &[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3])?;
    let tensor = x.to_dlpack(DlpackStream::None)?; // waits for x's pending writes first
    println!(
        "DLPack export: device {:?}, shape {:?}",
        x.dlpack_device()?,
        tensor.view()?.shape()
    );
    let raw = tensor.into_raw(); // the pointer a capsule carries
    let options = ImportOptions::new().label("x imported");
    // SAFETY: `raw` is our own export, not yet consumed, valid until its deleter runs.
    let imported = unsafe { dev.from_dlpack(DlpackTensor::from_raw(raw)?, &options)? };
    ensure(
        imported.mode() == StorageMode::Foreign,
        "imported as foreign memory",
    )?;
    let same = imported.device_address() == x.device_address();
    ensure(same, "the import is the same memory, not a copy")?;
    q.fill(&imported.rows(1..2)?, FillPattern::of(0.0f32))?; // a write through the import
    let seen = q.download::<f32>(&x)?;
    ensure(seen == [1.0, 2.0, 3.0, 0.0, 0.0, 0.0], "is a write to x")?;
    let shared = dev.ledger().totals()[&Direction::Shared];
    ensure(
        shared.count == 2 && shared.bytes == 0,
        "exchanges are recorded, 0 bytes",
    )?;

    if dev.info().backend != "cpu" {
        println!("host pointers and host signals are the CPU backend's: done");
        return Ok(());
    }

    // 3. Foreign memory with an owner: the owner (a framework's tensor) is dropped only after
    // the last view drops and the last work using the memory completes.
    struct Tensor {
        data: Vec<u32>,
        dropped: Arc<AtomicBool>,
    }
    impl Drop for Tensor {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::SeqCst);
        }
    }
    let dropped = Arc::new(AtomicBool::new(false));
    let mut theirs = Tensor {
        data: vec![0; 256],
        dropped: dropped.clone(),
    };
    let ptr = unibuf::interop::NativeHandle::from_ptr(theirs.data.as_mut_ptr().cast());
    // SAFETY: 256 u32s at `ptr`, owned by `theirs`, which the buffer keeps until its last use.
    let wrapped = unsafe {
        dev.wrap_foreign(
            "theirs",
            ForeignMemory::Host { ptr },
            theirs,
            ForeignAccess::ReadWrite,
            DType::U32,
            &[256],
        )?
    };

    // 4. A foreign stream: the queue waits for a signal host code sets (on CUDA, an event).
    let ready = HostSignal::new();
    q.wait_host_signal(&ready)?;
    let filled = q.fill_async(&wrapped, FillPattern::u32(7))?;
    ensure(!dev.is_complete(filled)?, "the fill waits for the signal")?;
    ready.set();

    // 5. Foreign work on the queue's worker (on CUDA: on its stream), after the fill, before
    // anything that reads `out`: the fence it returns goes on both buffers.
    let out = dev.alloc_labelled("out", DType::U32, &[256], StorageMode::Shared)?;
    let (NativeBuffer::Host { ptr: src, .. }, NativeBuffer::Host { ptr: dst, .. }) =
        (wrapped.native()?, out.native()?)
    else {
        return Err("host pointers expected on the CPU backend".into());
    };
    let work = q.external(&[&wrapped], &[&out], move |native| {
        assert_eq!(native, NativeEncoder::Cpu);
        // SAFETY: both hold 256 u32s and stay alive until this work's fence completes.
        let (s, d) = unsafe {
            (
                std::slice::from_raw_parts(src.as_ptr() as *const u32, 256),
                std::slice::from_raw_parts_mut(dst.as_ptr() as *mut u32, 256),
            )
        };
        d.iter_mut().zip(s).for_each(|(d, s)| *d = s * 6); // "a library call"
        Ok(())
    })?;
    let got = out.read::<u32>()?; // waits for `work`, the last write of `out`
    ensure(
        got.iter().all(|&v| v == 42),
        "the foreign work ran after the fill",
    )?;
    ensure(
        dev.is_complete(work)?,
        "a host read waits for the work it depends on",
    )?;
    drop(got);
    ensure(
        !dropped.load(Ordering::SeqCst),
        "the owner lives while a view does",
    )?;
    drop(wrapped);
    ensure(dropped.load(Ordering::SeqCst), "then it is dropped")?;
    print!("{}", dev.copy_report());
    println!("ok");
    Ok(())
}

/// Fails the example with `what` unless `ok`.
fn ensure(ok: bool, what: &str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(format!("wrong result: {what}").into())
    }
}
