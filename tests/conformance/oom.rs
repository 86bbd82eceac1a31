//! Allocating until the device is out of memory, then recovering. A test binary of its own:
//! it holds all of the device's memory for a moment, which would fail tests running beside it.
//! On the CPU backend the limit is the allocator's address-space reservation (twice the host's
//! memory); the pages are never touched, so no memory is really used.

use unibuf::{DType, Error, FillPattern, StorageMode};
use unibuf_conformance::device;

#[test]
fn allocating_until_out_of_memory_recovers() {
    let dev = device();
    let chunk = 1usize << 30;
    let mut held = Vec::new();
    let err = loop {
        match dev.alloc(DType::U8, &[chunk], StorageMode::Private) {
            Ok(b) => held.push(b),
            Err(e) => break e,
        }
        assert!(
            held.len() < 4096,
            "no out-of-memory after {} GiB",
            held.len()
        );
    };
    let Error::OutOfMemory {
        requested,
        reserved,
        ..
    } = err
    else {
        panic!("expected OutOfMemory after {} GiB, got {err}", held.len())
    };
    assert!(err.is_retryable());
    assert!(requested > 0 && reserved >= held.len() * chunk / 2, "{err}");
    assert!(!held.is_empty(), "at least one GiB fits");
    let stats = dev.memory_stats();
    assert!(stats.ooms >= 1, "{stats}");
    // Free one and the same request succeeds; the memory works.
    held.pop();
    let again = dev
        .alloc(DType::U8, &[chunk], StorageMode::Private)
        .expect("fits after a free");
    dev.queue()
        .fill(&again.slice(0..4096).unwrap(), FillPattern::u8(7))
        .unwrap();
    assert_eq!(
        dev.queue()
            .download::<u8>(&again.slice(0..4096).unwrap())
            .unwrap(),
        vec![7; 4096]
    );
    drop((held, again));
    dev.trim();
    assert_eq!(dev.memory_stats().reserved_bytes, 0);
}
