//! Fills whose pattern does not divide the view's length or offset, in every storage mode.

use super::assert_no_leak;
use half::f16;
use unibuf::{Buffer, DType, Device, Error, FillPattern, StorageMode};
use unibuf_conformance::{buffer, device, MODES};

/// The views of the refused fills: 10 bytes of 3, and 8 f16 ones.
struct Targets {
    u8s: Buffer,
    f16s: Buffer,
    /// The byte offsets of the two within their allocations: an External buffer starts where
    /// the caller's memory lies in its first page.
    o8: usize,
    o16: usize,
}

impl Targets {
    fn new(dev: &Device, mode: StorageMode) -> Targets {
        let u8s = buffer(dev, mode, DType::U8, &[10], "bytes");
        let f16s = buffer(dev, mode, DType::F16, &[8], "halves");
        let (o8, o16) = (u8s.byte_offset(), f16s.byte_offset());
        assert!(o8 % 8 == 0 && o16 % 8 == 0);
        // Aligned fills of the same views succeed.
        let q = dev.queue();
        q.fill(&u8s, FillPattern::u8(3)).unwrap();
        q.fill(&f16s, FillPattern::of(f16::ONE)).unwrap();
        Targets { u8s, f16s, o8, o16 }
    }

    /// The refused fill wrote nothing, and an aligned fill of part of the bytes works.
    fn check(&self, dev: &Device, mode: StorageMode) {
        dev.queue()
            .fill(
                &self.u8s.slice(4..8).unwrap(),
                FillPattern::u32(0x0909_0909),
            )
            .unwrap();
        assert_eq!(
            self.u8s.to_vec::<u8>().unwrap(),
            [3, 3, 3, 3, 9, 9, 9, 9, 3, 3],
            "{mode:?}"
        );
        assert_eq!(
            self.f16s.to_vec::<f16>().unwrap(),
            [f16::ONE; 8],
            "{mode:?}"
        );
    }
}

#[test]
fn u32_fill_over_10_bytes_is_misaligned() {
    let dev = device();
    for mode in MODES {
        let t = Targets::new(&dev, mode);
        refused!(
            dev.queue().fill(&t.u8s, FillPattern::u32(7)),
            Error::Misaligned {
                what: "fill: view byte length for the pattern width",
                value: 10,
                align: 4
            },
            ["10 is not a multiple of 4"],
            mode
        );
        t.check(&dev, mode);
    }
    assert_no_leak(&dev);
}

#[test]
fn u32_fill_at_byte_offset_1_is_misaligned() {
    let dev = device();
    for mode in MODES {
        let t = Targets::new(&dev, mode);
        refused!(
            dev.queue().fill(&t.u8s.slice(1..9).unwrap(), FillPattern::u32(7)),
            Error::Misaligned { what: "fill: view byte offset for the pattern width", value, align: 4 }
                if *value == t.o8 + 1,
            [format!("{} is not a multiple of 4", t.o8 + 1)],
            mode
        );
        t.check(&dev, mode);
    }
    assert_no_leak(&dev);
}

#[test]
fn u16_fill_over_3_bytes_is_misaligned() {
    let dev = device();
    for mode in MODES {
        let t = Targets::new(&dev, mode);
        refused!(
            dev.queue()
                .fill(&t.u8s.slice(0..3).unwrap(), FillPattern::u16(7)),
            Error::Misaligned {
                what: "fill: view byte length for the pattern width",
                value: 3,
                align: 2
            },
            ["3 is not a multiple of 2"],
            mode
        );
        t.check(&dev, mode);
    }
    assert_no_leak(&dev);
}

#[test]
fn u64_fill_at_byte_offset_2_is_misaligned() {
    let dev = device();
    for mode in MODES {
        let t = Targets::new(&dev, mode);
        refused!(
            dev.queue().fill(&t.f16s.slice(1..5).unwrap(), FillPattern::of(1.0f64)),
            Error::Misaligned { what: "fill: view byte offset for the pattern width", value, align: 8 }
                if *value == t.o16 + 2,
            [format!("{} is not a multiple of 8", t.o16 + 2)],
            mode
        );
        t.check(&dev, mode);
    }
    assert_no_leak(&dev);
}

#[test]
fn fill_async_of_a_u64_pattern_over_6_bytes_is_misaligned() {
    let dev = device();
    for mode in MODES {
        let t = Targets::new(&dev, mode);
        refused!(
            dev.queue()
                .fill_async(&t.u8s.slice(0..6).unwrap(), FillPattern::u64(1)),
            Error::Misaligned {
                what: "fill: view byte length for the pattern width",
                value: 6,
                align: 8
            },
            ["6 is not a multiple of 8"],
            mode
        );
        t.check(&dev, mode);
    }
    assert_no_leak(&dev);
}
