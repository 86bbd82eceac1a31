//! Typed buffers, storage modes and zero-copy views.
//!
//! ```text
//! cargo run -p unibuf --example buffers_and_views
//! UNIBUF_BACKEND=cuda cargo run -p unibuf --features cuda --example buffers_and_views
//! ```
//!
//! A buffer is memory with a dtype and a shape. Its storage mode says who can touch it:
//! `Shared` (host and device see the same bytes), `Private` (device only: the host reaches it
//! through transfers), `Auto` (Shared on unified memory, Private on a discrete GPU). Views
//! (`slice`, `rows`, `reshape`, `cast`) are new handles onto the same bytes: nothing is copied,
//! and the memory lives until the last view and the last work using it are gone.

use unibuf::{DType, Device, Error, StorageMode};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> Result<()> {
    let dev = Device::new()?; // $UNIBUF_BACKEND, else the best backend found
    let info = dev.info();
    println!(
        "device: {} (backend {}, unified memory: {})",
        info.name, info.backend, info.unified_memory
    );
    let q = dev.queue();

    // A Shared buffer: the host writes it in place through a guard, no transfer involved.
    let x = dev.alloc_labelled("activations", DType::F32, &[4, 8], StorageMode::Shared)?;
    {
        let mut w = x.write::<f32>()?; // waits for device work on x, then borrows it
        for (i, v) in w.iter_mut().enumerate() {
            *v = i as f32;
        }
    } // the guard drops: the device may use x again

    // Views share x's memory. Row 2 starts 2 * 8 * 4 bytes in.
    let row2 = x.rows(2..3)?; // shape [1, 8]
    let tail = x.slice(28..32)?; // the last four elements, 1-D
    let flat = x.reshape(&[32])?;
    let bits = x.cast(DType::U32)?; // the same bytes read as u32
    ensure(row2.shape() == [1, 8], "rows keeps the inner dimensions")?;
    ensure(
        row2.shares_memory_with(&x),
        "a view shares its buffer's memory",
    )?;
    let offset = row2.device_address() - x.device_address();
    ensure(offset == 64, "row 2 is 64 bytes in")?;
    let row = row2.read::<f32>()?; // a host read of the view, in place
    ensure(*row == [16., 17., 18., 19., 20., 21., 22., 23.], "row 2")?;
    drop(row);
    ensure(*tail.read::<f32>()? == [28., 29., 30., 31.], "slice")?;
    ensure(flat.read::<f32>()?[9] == 9.0, "reshape")?;
    ensure(bits.read::<u32>()?[1] == 1.0f32.to_bits(), "cast")?;
    println!(
        "views of {:?}: rows {:?}, slice {:?}, reshape {:?}, cast to {:?}",
        x.shape(),
        row2.shape(),
        tail.shape(),
        flat.shape(),
        bits.dtype()
    );

    // Writing through a view changes what every other view sees.
    q.upload(&tail, &[-1.0f32; 4])?;
    ensure(x.read::<f32>()?[31] == -1.0, "a write through a view")?;

    // A Private buffer is the device's alone: the host reaches it through transfers, and
    // host access is a typed error, not a crash.
    let w = dev.alloc_labelled("weights", DType::F16, &[8, 8], StorageMode::Private)?;
    q.upload(&w.rows(0..1)?, &[unibuf::half::f16::from_f32(0.5); 8])?;
    match w.read::<unibuf::half::f16>() {
        Err(Error::NotHostAccessible { .. }) => {
            println!("Private: host access refused, as it should be")
        }
        other => return Err(format!("reading a Private buffer: {:?}", other.map(|_| ())).into()),
    }
    let back = q.download::<unibuf::half::f16>(&w.rows(0..1)?)?;
    ensure(
        back.iter().all(|v| v.to_f32() == 0.5),
        "a Private round trip",
    )?;

    // Every call checks its input: a wrong dtype, shape or range is an error naming the values.
    let err = x
        .rows(3..5)
        .err()
        .ok_or("rows past the end were accepted")?;
    println!("bad input: {err}");
    let err = q
        .upload(&x, &[1u32; 32])
        .err()
        .ok_or("u32s went into f32s")?;
    println!("bad input: {err}");

    // Auto picks for the device; `from_slice` allocates Auto and uploads.
    let ids = dev.from_slice("token ids", &[1u32, 2, 3], &[3])?;
    println!("Auto resolved to {:?} here", ids.mode());
    ensure(ids.to_vec::<u32>()? == [1, 2, 3], "from_slice")?;

    // The allocator knows who owns what.
    let stats = dev.memory_stats();
    println!(
        "memory: {} bytes in {} live allocations, {} reserved",
        stats.active_bytes, stats.active_count, stats.reserved_bytes
    );
    for (label, bytes, count) in dev.memory_by_label() {
        println!("  {label:12} {bytes:6} bytes in {count}");
    }
    drop((x, row2, tail, flat, bits)); // the last views go: the memory returns to the cache
    let owners = dev.memory_by_label();
    ensure(owners.iter().all(|(l, ..)| l != "activations"), "freed")?;
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
