//! External storage: zero-copy wrapping, page rounding, and the owner's lifetime.

use std::sync::Arc;
use unibuf::{DType, FillPattern, StorageMode};
use unibuf_conformance::{device, Rng};

/// Wrapping copies nothing: the device sees the caller's bytes and the host sees device writes.
#[test]
fn wrapped_memory_is_the_buffer() {
    let dev = device();
    let mut rng = Rng::new("wrapped_memory_is_the_buffer");
    let n = rng.range(100, 10_000);
    let data: Vec<f32> = rng.elements(n);
    let b = dev
        .wrap_external("weights", data.clone(), DType::F32, &[n])
        .unwrap();
    assert_eq!(b.mode(), StorageMode::External);
    assert_eq!(dev.ledger().total().count, 0, "wrapping records no copy");
    assert_eq!(&*b.read::<f32>().unwrap(), &data[..]);
    let page = dev.info().page_size;
    assert!(
        dev.memory_stats().external_bytes.is_multiple_of(page)
            && dev.memory_stats().external_bytes >= n * 4
    );
    assert_eq!(b.device_address() as usize % 4, 0);
    dev.queue()
        .fill(&b.slice(0..1).unwrap(), FillPattern::of(2.5f32))
        .unwrap();
    assert_eq!(b.read::<f32>().unwrap()[0], 2.5);
    assert_eq!(&b.read::<f32>().unwrap()[1..], &data[1..]);
}

/// The owner lives while any view lives and until the work that used it completes.
#[test]
fn the_owner_outlives_views_and_work() {
    let dev = device();
    let owner = Arc::new(vec![3u32; 1 << 22]);
    let b = dev
        .wrap_external("shared owner", owner.clone(), DType::U32, &[1 << 22])
        .unwrap();
    assert!(
        !b.is_writable(),
        "memory behind an Arc may have other readers: read-only"
    );
    let view = b.slice(10..1 << 21).unwrap();
    drop(b);
    assert_eq!(Arc::strong_count(&owner), 2, "the view keeps the owner");
    let dst = dev
        .alloc(DType::U32, &[(1 << 21) - 10], StorageMode::Private)
        .unwrap();
    let f = dev.queue().copy_async(&view, &dst).unwrap();
    drop(view);
    if !dev.is_complete(f).unwrap() {
        assert_eq!(
            Arc::strong_count(&owner),
            2,
            "unwrapped while a copy still reads it"
        );
    }
    dev.drain().unwrap();
    assert_eq!(
        Arc::strong_count(&owner),
        1,
        "released once the work completed"
    );
    assert!(dst.to_vec::<u32>().unwrap().iter().all(|x| *x == 3));
    assert_eq!(dev.memory_stats().external_count, 0);
}

/// A memory-mapped file wraps read-only, page-rounded, at any offset of its pages.
#[test]
fn memory_maps_wrap_read_only() {
    let dev = device();
    let mut rng = Rng::new("memory_maps_wrap_read_only");
    let path = std::env::temp_dir().join(format!(
        "unibuf-conf-{}-{}.bin",
        std::process::id(),
        rng.next_u64()
    ));
    let bytes = rng.bytes(3 * 4096 + 123);
    std::fs::write(&path, &bytes).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    // SAFETY: the test owns the file and does not modify it while mapped.
    let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
    let b = dev
        .wrap_external("file", map, DType::U8, &[bytes.len()])
        .unwrap();
    assert!(!b.is_writable());
    let tail = b.slice(4096 + 5..bytes.len()).unwrap();
    assert_eq!(&*tail.read::<u8>().unwrap(), &bytes[4096 + 5..]);
    let dst = dev
        .alloc(DType::U8, &[bytes.len() - 4096 - 5], StorageMode::Private)
        .unwrap();
    dev.queue().copy(&tail, &dst).unwrap();
    assert_eq!(dst.to_vec::<u8>().unwrap(), &bytes[4096 + 5..]);
    drop((b, tail));
    std::fs::remove_file(&path).unwrap();
}
