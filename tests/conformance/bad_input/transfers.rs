//! Transfers of the wrong dtype or length, in every storage mode.

use super::assert_no_leak;
use unibuf::{Buffer, DType, Device, Error, StorageMode};
use unibuf_conformance::{buffer, device, MODES};

/// What the target holds before the refused call: values that no refused call writes.
fn seed() -> Vec<f32> {
    (0..8).map(|i| -1.0 - i as f32).collect()
}

/// A 2 x 4 f32 buffer in `mode` holding the seed, the target of every refused transfer.
fn target(dev: &Device, mode: StorageMode) -> Buffer {
    let b = buffer(dev, mode, DType::F32, &[2, 4], "t");
    dev.queue().upload(&b, &seed()).unwrap();
    b
}

/// Nothing was written by the refused call (the seed is still there); a valid round trip
/// still works.
fn round_trips(dev: &Device, b: &Buffer, mode: StorageMode) {
    let q = dev.queue();
    assert_eq!(q.download::<f32>(b).unwrap(), seed(), "{mode:?}");
    let data: Vec<f32> = (0..8).map(|i| i as f32).collect();
    q.upload(b, &data).unwrap();
    assert_eq!(q.download::<f32>(b).unwrap(), data, "{mode:?}");
}

/// The ledger holds the valid transfers (per mode: the seed's upload, the download that finds
/// it, and the round trip's upload and download) and nothing of the refused calls.
fn assert_only_valid_transfers_recorded(dev: &Device) {
    assert_eq!(dev.ledger().total().count as usize, 4 * MODES.len());
}

#[test]
fn upload_with_the_wrong_dtype_is_a_dtype_mismatch() {
    let dev = device();
    for mode in MODES {
        let b = target(&dev, mode);
        refused!(
            dev.queue().upload(&b, &[1u32; 8]),
            Error::DTypeMismatch {
                what: "upload",
                expected: DType::F32,
                got: DType::U32
            },
            ["expected dtype F32, got U32"],
            mode
        );
        round_trips(&dev, &b, mode);
    }
    assert_only_valid_transfers_recorded(&dev);
    assert_no_leak(&dev);
}

#[test]
fn upload_too_short_is_a_shape_mismatch() {
    let dev = device();
    for mode in MODES {
        let b = target(&dev, mode);
        refused!(
            dev.queue().upload(&b, &[1.0f32; 7]),
            Error::ShapeMismatch { what: "upload: elements", expected, got }
                if expected == "8 (shape [2, 4])" && got == "7",
            ["expected 8 (shape [2, 4]), got 7"],
            mode
        );
        round_trips(&dev, &b, mode);
    }
    assert_only_valid_transfers_recorded(&dev);
    assert_no_leak(&dev);
}

#[test]
fn upload_too_long_is_a_shape_mismatch() {
    let dev = device();
    for mode in MODES {
        let b = target(&dev, mode);
        refused!(
            dev.queue().upload(&b, &[1.0f32; 9]),
            Error::ShapeMismatch { what: "upload: elements", got, .. } if got == "9",
            ["got 9"],
            mode
        );
        round_trips(&dev, &b, mode);
    }
    assert_only_valid_transfers_recorded(&dev);
    assert_no_leak(&dev);
}

#[test]
fn upload_of_nothing_is_a_shape_mismatch() {
    let dev = device();
    for mode in MODES {
        let b = target(&dev, mode);
        refused!(
            dev.queue().upload::<f32>(&b, &[]),
            Error::ShapeMismatch { what: "upload: elements", got, .. } if got == "0",
            ["expected 8", "got 0"],
            mode
        );
        round_trips(&dev, &b, mode);
    }
    assert_only_valid_transfers_recorded(&dev);
    assert_no_leak(&dev);
}

#[test]
fn upload_async_too_short_is_a_shape_mismatch() {
    let dev = device();
    for mode in MODES {
        let b = target(&dev, mode);
        refused!(
            dev.queue().upload_async(&b, &[1.0f32; 3]),
            Error::ShapeMismatch { what: "upload: elements", got, .. } if got == "3",
            ["got 3"],
            mode
        );
        round_trips(&dev, &b, mode);
    }
    assert_only_valid_transfers_recorded(&dev);
    assert_no_leak(&dev);
}

#[test]
fn upload_async_with_the_wrong_dtype_is_a_dtype_mismatch() {
    let dev = device();
    for mode in MODES {
        let b = target(&dev, mode);
        refused!(
            dev.queue().upload_async(&b, &[1.0f64; 8]),
            Error::DTypeMismatch {
                what: "upload",
                expected: DType::F32,
                got: DType::F64
            },
            ["F32", "F64"],
            mode
        );
        round_trips(&dev, &b, mode);
    }
    assert_only_valid_transfers_recorded(&dev);
    assert_no_leak(&dev);
}

#[test]
fn download_into_a_short_slice_is_a_shape_mismatch() {
    let dev = device();
    for mode in MODES {
        let b = target(&dev, mode);
        let mut short = [7.5f32; 5];
        refused!(
            dev.queue().download_into(&b, &mut short),
            Error::ShapeMismatch { what: "download: elements", expected, got }
                if expected == "8 (shape [2, 4])" && got == "5",
            ["8", "got 5"],
            mode
        );
        assert_eq!(short, [7.5; 5], "the refused download wrote nothing");
        round_trips(&dev, &b, mode);
    }
    assert_only_valid_transfers_recorded(&dev);
    assert_no_leak(&dev);
}

#[test]
fn download_into_the_wrong_dtype_is_a_dtype_mismatch() {
    let dev = device();
    for mode in MODES {
        let b = target(&dev, mode);
        let mut wrong = [7i32; 8];
        refused!(
            dev.queue().download_into(&b, &mut wrong),
            Error::DTypeMismatch {
                what: "download",
                expected: DType::F32,
                got: DType::I32
            },
            ["expected dtype F32, got I32"],
            mode
        );
        assert_eq!(wrong, [7; 8], "the refused download wrote nothing");
        round_trips(&dev, &b, mode);
    }
    assert_only_valid_transfers_recorded(&dev);
    assert_no_leak(&dev);
}

#[test]
fn download_as_the_wrong_dtype_is_a_dtype_mismatch() {
    let dev = device();
    for mode in MODES {
        let b = target(&dev, mode);
        refused!(
            dev.queue().download::<half::f16>(&b),
            Error::DTypeMismatch {
                what: "download",
                expected: DType::F32,
                got: DType::F16
            },
            ["F32", "F16"],
            mode
        );
        round_trips(&dev, &b, mode);
    }
    assert_only_valid_transfers_recorded(&dev);
    assert_no_leak(&dev);
}

#[test]
fn download_async_as_the_wrong_dtype_is_a_dtype_mismatch() {
    let dev = device();
    for mode in MODES {
        let b = target(&dev, mode);
        refused!(
            dev.queue().download_async::<u16>(&b),
            Error::DTypeMismatch {
                what: "download",
                expected: DType::F32,
                got: DType::U16
            },
            ["F32", "U16"],
            mode
        );
        round_trips(&dev, &b, mode);
    }
    assert_only_valid_transfers_recorded(&dev);
    assert_no_leak(&dev);
}

#[test]
fn to_vec_as_the_wrong_dtype_is_a_dtype_mismatch() {
    let dev = device();
    for mode in MODES {
        let b = target(&dev, mode);
        refused!(
            b.rows(1..2).unwrap().to_vec::<i64>(),
            Error::DTypeMismatch {
                what: "download",
                expected: DType::F32,
                got: DType::I64
            },
            ["F32", "I64"],
            mode
        );
        round_trips(&dev, &b, mode);
    }
    assert_only_valid_transfers_recorded(&dev);
    assert_no_leak(&dev);
}
