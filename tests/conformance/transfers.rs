//! Transfers: every storage-mode pair, offsets, every fill width, every dtype, async variants.

use unibuf::{DType, FillPattern, StorageMode};
use unibuf_conformance::{buffer, device, poison, Rng, MODES};

/// Copies a random range between views at odd offsets for every (source, destination) mode
/// pair, and checks the whole destination: the copied range holds the source's bytes and
/// everything around it still holds the poison.
#[test]
fn copy_between_every_mode_pair_at_odd_offsets() {
    let dev = device();
    let q = dev.queue();
    let mut rng = Rng::new("copy_between_every_mode_pair_at_odd_offsets");
    for src_mode in MODES {
        for dst_mode in MODES {
            for _ in 0..3 {
                let (n_src, n_dst) = (rng.range(1, 5000), rng.range(1, 5000));
                let count = rng.range(1, n_src.min(n_dst) + 1);
                let (s_off, d_off) = (
                    rng.range(0, n_src - count + 1),
                    rng.range(0, n_dst - count + 1),
                );
                let src = buffer(&dev, src_mode, DType::U8, &[n_src], "src");
                let dst = buffer(&dev, dst_mode, DType::U8, &[n_dst], "dst");
                let data = rng.bytes(n_src);
                q.upload(&src, &data).unwrap();
                poison(&dev, &dst);
                q.copy(
                    &src.slice(s_off..s_off + count).unwrap(),
                    &dst.slice(d_off..d_off + count).unwrap(),
                )
                .unwrap();
                let got: Vec<u8> = q.download(&dst).unwrap();
                let mut want = vec![0xA5u8; n_dst];
                want[d_off..d_off + count].copy_from_slice(&data[s_off..s_off + count]);
                assert_eq!(
                    got, want,
                    "{src_mode:?} -> {dst_mode:?}: {count} bytes {s_off} -> {d_off}"
                );
            }
        }
    }
}

/// Uploads and downloads views at odd offsets and lengths in every mode, with sizes that cross
/// staging-chunk boundaries.
#[test]
fn upload_download_views_in_every_mode() {
    let dev = unibuf_conformance::builder()
        .staging(64 << 10, 3)
        .open()
        .unwrap();
    let q = dev.queue();
    let mut rng = Rng::new("upload_download_views_in_every_mode");
    for mode in MODES {
        for n in [1usize, 7, 4097, (64 << 10) / 4 * 3 + 5] {
            let b = buffer(&dev, mode, DType::F32, &[n + 9], "views");
            poison(&dev, &b);
            let off = rng.range(0, 10);
            let len = n.min(n + 9 - off);
            let view = b.slice(off..off + len).unwrap();
            let data: Vec<f32> = rng.elements(len);
            q.upload(&view, &data).unwrap();
            assert_eq!(
                q.download::<f32>(&view).unwrap(),
                data,
                "{mode:?} n={n} off={off}"
            );
            let whole: Vec<u32> = q.download(&b.cast(DType::U32).unwrap()).unwrap();
            for (i, w) in whole.iter().enumerate() {
                if i < off || i >= off + len {
                    assert_eq!(
                        *w, 0xA5A5_A5A5,
                        "{mode:?}: element {i} outside the view was written"
                    );
                }
            }
        }
    }
}

/// Fills with every pattern width over views at aligned odd offsets and odd lengths.
/// The fill widths, with an unsigned dtype of each.
const FILL_WIDTHS: [(DType, usize); 4] = [
    (DType::U8, 1),
    (DType::U16, 2),
    (DType::U32, 4),
    (DType::U64, 8),
];

/// A fill pattern of `width` bytes: the low bytes of `value`.
fn pattern_of(width: usize, value: u64) -> FillPattern {
    match width {
        1 => FillPattern::u8(value as u8),
        2 => FillPattern::u16(value as u16),
        4 => FillPattern::u32(value as u32),
        _ => FillPattern::u64(value),
    }
}

#[test]
fn fill_every_width_in_every_mode() {
    let dev = device();
    let q = dev.queue();
    let mut rng = Rng::new("fill_every_width_in_every_mode");
    for mode in MODES {
        for (dtype, width) in FILL_WIDTHS {
            let n = rng.range(3, 3000) | 1;
            let b = buffer(&dev, mode, dtype, &[n], "fill");
            poison(&dev, &b);
            let (off, len) = (1, n - 2);
            let value = rng.next_u64() | 1;
            let pattern = pattern_of(width, value);
            q.fill(&b.slice(off..off + len).unwrap(), pattern).unwrap();
            let got: Vec<u8> = q.download(&b.cast(DType::U8).unwrap()).unwrap();
            for (i, chunk) in got.chunks(width).enumerate() {
                let inside = i >= off && i < off + len;
                let want: &[u8] = if inside {
                    pattern.bytes()
                } else {
                    &[0xA5; 8][..width]
                };
                assert_eq!(chunk, want, "{mode:?} width {width}: element {i} of {n}");
            }
        }
    }
}

/// Fills of whole buffers whose length is a multiple of 16 bytes, at every width: on CUDA these
/// take the backend's 16-byte fill kernel (the pattern repeated to 16 bytes), which the
/// offset fills above never do.
#[test]
fn whole_buffer_fills_of_every_width() {
    let dev = device();
    let q = dev.queue();
    let mut rng = Rng::new("whole_buffer_fills_of_every_width");
    for mode in MODES {
        for (dtype, width) in FILL_WIDTHS {
            let bytes = 16 * rng.range(1, 70_000);
            let b = buffer(&dev, mode, dtype, &[bytes / width], "fill16");
            poison(&dev, &b);
            // The low byte is 0x03, never the poison's 0xA5, so an unwritten element shows.
            let value = (rng.next_u64() & 0x00ff_ffff_ffff_ff00) | 0x0102_0000_0000_0003;
            let pattern = pattern_of(width, value);
            q.fill(&b, pattern).unwrap();
            let got: Vec<u8> = q.download(&b.cast(DType::U8).unwrap()).unwrap();
            for (i, chunk) in got.chunks(width).enumerate() {
                assert_eq!(
                    chunk,
                    pattern.bytes(),
                    "{mode:?} width {width}: element {i}"
                );
            }
        }
    }
}

macro_rules! round_trip {
    ($dev:expr, $rng:expr, $($t:ty),*) => {$(
        for mode in MODES {
            let n = $rng.range(1, 300);
            let b = buffer(&$dev, mode, <$t as unibuf::Element>::DTYPE, &[n], "dtype");
            poison(&$dev, &b);
            let data: Vec<$t> = $rng.elements(n);
            $dev.queue().upload(&b, &data).unwrap();
            let back: Vec<$t> = $dev.queue().download(&b).unwrap();
            assert!(
                bytemuck::cast_slice::<$t, u8>(&back) == bytemuck::cast_slice::<$t, u8>(&data),
                "{} in {mode:?}", stringify!($t)
            );
        }
    )*};
}

/// Every dtype round-trips bit-exactly through every mode.
#[test]
fn every_dtype_round_trips() {
    let dev = device();
    let mut rng = Rng::new("every_dtype_round_trips");
    round_trip!(
        dev,
        rng,
        half::f16,
        half::bf16,
        f32,
        f64,
        i8,
        u8,
        i16,
        u16,
        i32,
        u32,
        i64,
        u64
    );
}

/// Async variants: the fence completes with the data in place; an async download is a snapshot
/// at its point in the queue, unaffected by later writes.
#[test]
fn async_transfers_complete_at_their_fence() {
    let dev = device();
    let q = dev.queue();
    let mut rng = Rng::new("async_transfers_complete_at_their_fence");
    for mode in MODES {
        let n = rng.range(1000, 200_000);
        let a = buffer(&dev, mode, DType::U32, &[n], "a");
        let b = buffer(&dev, StorageMode::Private, DType::U32, &[n], "b");
        let data: Vec<u32> = rng.elements(n);
        let f1 = q.upload_async(&a, &data).unwrap();
        drop(data.clone()); // the caller's memory is free at once
        let f2 = q.copy_async(&a, &b).unwrap();
        let snapshot = q.download_async::<u32>(&b).unwrap();
        let f3 = q.fill_async(&b, FillPattern::u32(7)).unwrap();
        dev.wait(f3).unwrap();
        assert!(dev.is_complete(f1).unwrap() && dev.is_complete(f2).unwrap());
        assert_eq!(
            snapshot.wait().unwrap(),
            data,
            "{mode:?}: snapshot taken before the fill"
        );
        assert_eq!(q.download::<u32>(&b).unwrap(), vec![7; n]);
    }
}

/// `Auto` resolves to Shared on unified memory and Private otherwise.
#[test]
fn auto_mode_follows_the_memory_architecture() {
    let dev = device();
    let b = dev.alloc(DType::F32, &[4], StorageMode::Auto).unwrap();
    let want = if dev.info().unified_memory {
        StorageMode::Shared
    } else {
        StorageMode::Private
    };
    assert_eq!(b.mode(), want);
}

/// Concurrent staged transfers share a small staging ring without failing or deadlocking:
/// a transfer that holds chunks drains its own before waiting for others'.
#[test]
fn concurrent_staged_transfers_share_the_ring() {
    let dev = unibuf_conformance::builder()
        .staging(64 << 10, 4)
        .open()
        .unwrap();
    let mut rng = Rng::new("concurrent_staged_transfers_share_the_ring");
    let bufs: Vec<_> = (0..4)
        .map(|i| {
            let b = dev
                .alloc(DType::U8, &[(1 << 20) + 3 * i], StorageMode::Private)
                .unwrap();
            let data = rng.bytes(b.len());
            dev.queue().upload(&b, &data).unwrap();
            (b, data)
        })
        .collect();
    std::thread::scope(|s| {
        for (i, (b, data)) in bufs.iter().enumerate() {
            let q = if i % 2 == 0 {
                dev.queue()
            } else {
                dev.new_queue("side").unwrap()
            };
            s.spawn(move || {
                for round in 0..8 {
                    assert!(
                        q.download::<u8>(b).unwrap() == *data,
                        "buffer {i}, round {round}"
                    );
                    q.upload(b, data).unwrap();
                }
            });
        }
    });
    assert!(dev.memory_stats().staging_bytes <= 4 * (64 << 10));
}
