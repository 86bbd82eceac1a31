//! Transfers: upload, download, copy and fill, synchronous or with fences, across two queues,
//! and the copy audit that accounts for every byte.
//!
//! ```text
//! cargo run -p unibuf --example transfers
//! UNIBUF_BACKEND=cuda cargo run -p unibuf --features cuda --example transfers
//! ```
//!
//! Each queue numbers its submissions (epochs); every transfer returns, or waits for, the fence
//! of its last submission. Buffers remember the fences that read and wrote them, so work on
//! another queue waits for them on the device (never a device-wide sync), and host access waits
//! for exactly the work it depends on.

use unibuf::{DType, Device, Direction, FillPattern, StorageMode};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const N: usize = 1 << 20; // 4 MiB of f32

fn main() -> Result<()> {
    let dev = Device::new()?;
    // A label names the queue's submissions in the stats and its transfers in the audit.
    let load = dev.queue().labelled("load");
    let compute = dev.new_queue("compute")?.labelled("compute");

    // An upload into device-only memory, staged through host-visible chunks where the device
    // cannot read host memory. `upload_async` returns once `data` may be dropped, with the
    // fence of the copy; `upload` would also wait for it.
    let data: Vec<f32> = (0..N).map(|i| i as f32).collect();
    let a = dev.alloc_labelled("a", DType::F32, &[N], StorageMode::Private)?;
    let uploaded = load.upload_async(&a, &data)?;
    drop(data);

    // `compute` copies what `load` writes: it waits for `load`'s fence on the device, and the
    // host does not block here. The fill after it on `load` waits for the copy's read.
    let b = dev.alloc_labelled("b", DType::F32, &[N], StorageMode::Private)?;
    let copied = compute.copy_async(&a.slice(N / 2..N)?, &b.slice(0..N / 2)?)?;
    let cleared = compute.fill_async(&b.slice(N / 2..N)?, FillPattern::of(0.5f32))?;
    let filled = load.fill_async(&a, FillPattern::of(-1.0f32))?;
    println!("queued: upload {uploaded:?}\n  copy {copied:?}\n  fill {cleared:?}");

    // A download started now sees `b` as of this point in `compute`'s order; `wait` returns it.
    let pending = compute.download_async::<f32>(&b)?;
    let got = pending.wait()?;
    ensure(got[0] == (N / 2) as f32, "the copy saw the upload")?;
    ensure(got[N / 2 - 1] == (N - 1) as f32, "all of it")?;
    ensure(got[N / 2..].iter().all(|&v| v == 0.5), "fill")?;
    let a_now = load.download::<f32>(&a.slice(N - 4..N)?)?; // after the fill, in load's order
    ensure(
        a_now == [-1.0; 4] && dev.is_complete(filled)?,
        "the fill came after the copy",
    )?;
    let waits: u32 = dev.ledger().submissions().iter().map(|s| s.waits).sum();
    println!("cross-queue waits inserted on the device: {waits}");

    // Shared memory is read in place: no transfer, nothing in the audit.
    let c = dev.alloc_labelled("c", DType::F32, &[N], StorageMode::Shared)?;
    let done = compute.copy_async(&b, &c)?;
    dev.wait(done)?;
    let before = dev.ledger().total().count;
    ensure(
        c.read::<f32>()?[N - 1] == 0.5,
        "a host read after a device copy",
    )?;
    let after = dev.ledger().total().count;
    ensure(after == before, "host reads are not copies")?;

    // Host memory the program already has (a PageBuffer here, an mmap'd file in an engine)
    // is wrapped as External, not copied, and is the source of a device copy.
    let page = unibuf::PageBuffer::from_slice(&[7u8; 4096])?;
    let ext = dev.wrap_external("page", page, DType::U8, &[4096])?;
    let d = dev.alloc_labelled("d", DType::U8, &[4096], StorageMode::Private)?;
    load.copy(&ext, &d)?;
    let copied = load.download::<u8>(&d)?;
    ensure(copied.iter().all(|&v| v == 7), "copy from External memory")?;

    // The audit: every transfer by direction, storage modes and call site, with bytes, what
    // went through staging, and time.
    let totals = dev.ledger().totals();
    ensure(
        totals[&Direction::HostToDevice].bytes == 4 * N as u64,
        "the upload",
    )?;
    ensure(
        totals[&Direction::DeviceToDevice].count == 3,
        "three device copies",
    )?;
    print!("{}", dev.copy_report());
    print!("{}", dev.submission_stats()); // per queue label: count, encode, wait, device time

    // The same as a timeline, one track per queue: `dev.write_chrome_trace(path)` writes it
    // for Perfetto (ui.perfetto.dev) or chrome://tracing.
    let trace: serde_json::Value = serde_json::from_str(&dev.chrome_trace())?;
    let events = trace["traceEvents"].as_array().map_or(0, Vec::len);
    println!("chrome trace: {events} events");
    ensure(events > 0, "a timeline")?;
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
