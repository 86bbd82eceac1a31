//! Views: slices, rows, reshapes and casts share memory and honour offset and length.

use unibuf::{DType, StorageMode};
use unibuf_conformance::{buffer, device, Rng, MODES};

/// A chain of views addresses exactly the bytes the arithmetic says, in every mode.
#[test]
fn view_chains_address_the_right_bytes() {
    let dev = device();
    let q = dev.queue();
    let mut rng = Rng::new("view_chains_address_the_right_bytes");
    for mode in MODES {
        let (rows, cols) = (rng.range(3, 40), rng.range(2, 40) * 2);
        let b = buffer(&dev, mode, DType::U16, &[rows, cols], "matrix");
        let data: Vec<u16> = rng.elements(rows * cols);
        q.upload(&b, &data).unwrap();

        let (r0, r1) = (1, rows - 1);
        let block = b.rows(r0..r1).unwrap();
        assert_eq!(block.shape(), &[r1 - r0, cols]);
        assert_eq!(block.byte_offset() - b.byte_offset(), r0 * cols * 2);
        assert_eq!(
            q.download::<u16>(&block).unwrap(),
            &data[r0 * cols..r1 * cols]
        );

        let flat = block.reshape(&[(r1 - r0) * cols]).unwrap();
        let (s0, s1) = (3, (r1 - r0) * cols - 1);
        let part = flat.slice(s0..s1).unwrap();
        assert_eq!(
            q.download::<u16>(&part).unwrap(),
            &data[r0 * cols + s0..r0 * cols + s1]
        );

        // u16 pairs as u32, at an offset that is a multiple of 4.
        let aligned = b.rows(2..3).unwrap().cast(DType::U32).unwrap();
        assert_eq!(aligned.shape(), &[1, cols / 2]);
        let words: Vec<u32> = q.download(&aligned).unwrap();
        for (i, w) in words.iter().enumerate() {
            let lo = data[2 * cols + 2 * i];
            let hi = data[2 * cols + 2 * i + 1];
            let expect = u32::from_ne_bytes([
                lo.to_ne_bytes()[0],
                lo.to_ne_bytes()[1],
                hi.to_ne_bytes()[0],
                hi.to_ne_bytes()[1],
            ]);
            assert_eq!(*w, expect);
        }
        assert!(part.shares_memory_with(&b) && aligned.shares_memory_with(&b));
    }
}

/// Writes through one view are seen through another, and the views keep the memory alive
/// after the original handle is dropped.
#[test]
fn views_share_memory_and_keep_it_alive() {
    let dev = device();
    let q = dev.queue();
    let b = dev.alloc(DType::F32, &[10], StorageMode::Shared).unwrap();
    let tail = b.slice(5..10).unwrap();
    drop(b);
    q.upload(&tail, &[1.0f32, 2.0, 3.0, 4.0, 5.0]).unwrap();
    let bytes = tail.cast(DType::U8).unwrap();
    assert_eq!(bytes.len(), 20);
    assert_eq!(&*tail.read::<f32>().unwrap(), &[1.0, 2.0, 3.0, 4.0, 5.0]);
    assert_eq!(dev.memory_stats().active_count, 1);
    drop((tail, bytes));
    assert_eq!(dev.memory_stats().active_count, 0);
}

/// Host write guards on Shared and External views write exactly their range.
#[test]
fn host_guards_honour_view_bounds() {
    let dev = device();
    for mode in [StorageMode::Shared, StorageMode::External] {
        let b = buffer(&dev, mode, DType::I32, &[12], "guards");
        dev.queue()
            .fill(&b, unibuf::FillPattern::of(-1i32))
            .unwrap();
        {
            let mut w = b.slice(4..7).unwrap();
            let w2 = w.clone();
            let mut g = w2.write::<i32>().unwrap();
            g.copy_from_slice(&[10, 11, 12]);
            drop(g);
            w = w.slice(1..2).unwrap();
            assert_eq!(&*w.read::<i32>().unwrap(), &[11]);
        }
        let all: Vec<i32> = b.to_vec().unwrap();
        assert_eq!(
            all,
            [-1, -1, -1, -1, 10, 11, 12, -1, -1, -1, -1, -1],
            "{mode:?}"
        );
    }
}
