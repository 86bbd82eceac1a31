//! Copies between dtypes, between lengths, and between overlapping views, in every storage mode.

use super::assert_no_leak;
use unibuf::{Buffer, DType, Device, Error, StorageMode};
use unibuf_conformance::{buffer, device, MODES};

/// The buffers of the refused copies.
struct Targets {
    src: Buffer,
    ints: Buffer,
    six: Buffer,
    /// 16 f32 holding 0..16.
    big: Buffer,
    /// `big`'s byte offset within its allocation (External: from the start of the first page),
    /// which the byte ranges of the overlap errors count from.
    o: usize,
}

fn values() -> Vec<f32> {
    (0..16).map(|i| i as f32).collect()
}

impl Targets {
    fn new(dev: &Device, mode: StorageMode) -> Targets {
        let big = buffer(dev, mode, DType::F32, &[16], "big");
        dev.queue().upload(&big, &values()).unwrap();
        Targets {
            src: buffer(dev, mode, DType::F32, &[8], "src"),
            ints: buffer(dev, mode, DType::I32, &[8], "ints"),
            six: buffer(dev, mode, DType::F32, &[6], "six"),
            o: big.byte_offset(),
            big,
        }
    }

    /// The refused copy moved nothing within `big`, and its disjoint halves copy fine.
    fn check(&self, dev: &Device, mode: StorageMode) {
        let data = values();
        assert_eq!(self.big.to_vec::<f32>().unwrap(), data, "{mode:?}");
        dev.queue()
            .copy(
                &self.big.slice(0..8).unwrap(),
                &self.big.slice(8..16).unwrap(),
            )
            .unwrap();
        let back = self.big.to_vec::<f32>().unwrap();
        assert_eq!(&back[..8], &data[..8], "{mode:?}");
        assert_eq!(&back[8..], &data[..8], "{mode:?}");
    }
}

#[test]
fn copy_between_dtypes_is_a_dtype_mismatch() {
    let dev = device();
    for mode in MODES {
        let t = Targets::new(&dev, mode);
        refused!(
            dev.queue().copy(&t.src, &t.ints),
            Error::DTypeMismatch {
                what: "copy destination",
                expected: DType::I32,
                got: DType::F32
            },
            ["expected dtype I32, got F32"],
            mode
        );
        t.check(&dev, mode);
    }
    assert_no_leak(&dev);
}

#[test]
fn copy_between_lengths_is_a_shape_mismatch() {
    let dev = device();
    for mode in MODES {
        let t = Targets::new(&dev, mode);
        refused!(
            dev.queue().copy(&t.src, &t.six),
            Error::ShapeMismatch { what: "copy: elements", expected, got }
                if expected == "8 (source shape [8])" && got == "6 (destination shape [6])",
            ["8 (source shape [8])", "6 (destination shape [6])"],
            mode
        );
        t.check(&dev, mode);
    }
    assert_no_leak(&dev);
}

#[test]
fn copy_async_between_lengths_is_a_shape_mismatch() {
    let dev = device();
    for mode in MODES {
        let t = Targets::new(&dev, mode);
        refused!(
            dev.queue().copy_async(&t.six, &t.src),
            Error::ShapeMismatch { what: "copy: elements", expected, got }
                if expected == "6 (source shape [6])" && got == "8 (destination shape [8])",
            ["6", "8"],
            mode
        );
        t.check(&dev, mode);
    }
    assert_no_leak(&dev);
}

#[test]
fn copy_between_overlapping_views_is_invalid() {
    let dev = device();
    for mode in MODES {
        let t = Targets::new(&dev, mode);
        let o = t.o;
        refused!(
            dev.queue().copy(&t.big.slice(0..8).unwrap(), &t.big.slice(4..12).unwrap()),
            Error::InvalidArgument { what: "copy", detail }
                if detail.contains(&format!("bytes {}..{} and destination bytes {}..{}", o, o + 32, o + 16, o + 48)),
            [
                format!("{}..{}", o, o + 32),
                format!("{}..{}", o + 16, o + 48),
                "overlap".to_owned(),
                "'big'".to_owned()
            ],
            mode
        );
        t.check(&dev, mode);
    }
    assert_no_leak(&dev);
}

#[test]
fn copy_of_a_view_onto_itself_is_invalid() {
    let dev = device();
    for mode in MODES {
        let t = Targets::new(&dev, mode);
        let o = t.o;
        refused!(
            dev.queue().copy_async(&t.big, &t.big.reshape(&[4, 4]).unwrap()),
            Error::InvalidArgument { what: "copy", detail } if detail.contains(&format!("{}..{}", o, o + 64)),
            [format!("{}..{}", o, o + 64), "overlap".to_owned()],
            mode
        );
        t.check(&dev, mode);
    }
    assert_no_leak(&dev);
}
