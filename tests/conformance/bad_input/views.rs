//! Views: slices and rows out of range, reshapes to another size, casts that do not fit.

use super::assert_no_leak;
use std::ops::Range;
use unibuf::{Buffer, DType, Device, Error, StorageMode};
use unibuf_conformance::device;

/// A Shared vector of 10 f32.
fn vector(dev: &Device) -> Buffer {
    dev.alloc_labelled("v", DType::F32, &[10], StorageMode::Shared)
        .unwrap()
}

/// A Private 4 x 8 f32 matrix.
fn matrix(dev: &Device) -> Buffer {
    dev.alloc_labelled("m", DType::F32, &[4, 8], StorageMode::Private)
        .unwrap()
}

/// A Shared 2 x 6 byte matrix: 6 bytes a row, which divides into u16 but not into f32.
fn bytes(dev: &Device) -> Buffer {
    let b = dev
        .alloc_labelled("bytes", DType::U8, &[2, 6], StorageMode::Shared)
        .unwrap();
    // The same buffer is fine where the cast is valid.
    assert_eq!(b.cast(DType::U16).unwrap().shape(), &[2, 3]);
    b
}

#[test]
fn slice_past_the_end_is_out_of_bounds() {
    let dev = device();
    {
        let v = vector(&dev);
        refused!(
            v.slice(3..12),
            Error::OutOfBounds {
                what: "slice",
                start: 3,
                end: 12,
                len: 10
            },
            ["3..12", "length 10"]
        );
        assert_eq!(
            v.slice(3..10).unwrap().len(),
            7,
            "the range within it is fine"
        );
    }
    assert_no_leak(&dev);
}

#[test]
fn reversed_slice_is_out_of_bounds() {
    let dev = device();
    {
        let v = vector(&dev);
        refused!(
            v.slice(Range { start: 7, end: 3 }),
            Error::OutOfBounds {
                what: "slice",
                start: 7,
                end: 3,
                len: 10
            },
            ["7..3", "length 10"]
        );
    }
    assert_no_leak(&dev);
}

#[test]
fn empty_slice_past_the_end_is_out_of_bounds() {
    let dev = device();
    {
        let v = vector(&dev);
        refused!(
            v.slice(11..11),
            Error::OutOfBounds {
                what: "slice",
                start: 11,
                end: 11,
                len: 10
            },
            ["11..11", "length 10"]
        );
        assert_eq!(
            v.slice(10..10).unwrap().len(),
            0,
            "an empty slice at the end is fine"
        );
    }
    assert_no_leak(&dev);
}

#[test]
fn slice_near_usize_max_is_out_of_bounds() {
    let dev = device();
    {
        let v = vector(&dev);
        refused!(
            v.slice(usize::MAX - 1..usize::MAX),
            Error::OutOfBounds { what: "slice", start, end: usize::MAX, len: 10 }
                if *start == usize::MAX - 1,
            [format!("{}..{}", usize::MAX - 1, usize::MAX), "length 10".to_owned()]
        );
    }
    assert_no_leak(&dev);
}

#[test]
fn rows_past_the_end_are_out_of_bounds() {
    let dev = device();
    {
        let m = matrix(&dev);
        refused!(
            m.rows(2..5),
            Error::OutOfBounds {
                what: "rows",
                start: 2,
                end: 5,
                len: 4
            },
            ["2..5", "length 4"]
        );
        assert_eq!(
            m.rows(2..4).unwrap().shape(),
            &[2, 8],
            "the rows within it are fine"
        );
    }
    assert_no_leak(&dev);
}

#[test]
fn reversed_rows_are_out_of_bounds() {
    let dev = device();
    {
        let m = matrix(&dev);
        refused!(
            m.rows(Range { start: 3, end: 1 }),
            Error::OutOfBounds {
                what: "rows",
                start: 3,
                end: 1,
                len: 4
            },
            ["3..1", "length 4"]
        );
    }
    assert_no_leak(&dev);
}

#[test]
fn rows_to_usize_max_are_out_of_bounds() {
    let dev = device();
    {
        let m = matrix(&dev);
        refused!(
            m.rows(1..usize::MAX),
            Error::OutOfBounds {
                what: "rows",
                start: 1,
                end: usize::MAX,
                len: 4
            },
            [format!("1..{}", usize::MAX), "length 4".to_owned()]
        );
    }
    assert_no_leak(&dev);
}

#[test]
fn rows_of_a_0d_buffer_are_invalid() {
    let dev = device();
    {
        let scalar = dev
            .alloc_labelled("scalar", DType::F32, &[], StorageMode::Shared)
            .unwrap();
        assert_eq!(scalar.len(), 1, "a 0-d buffer holds one element");
        refused!(
            scalar.rows(0..1),
            Error::InvalidArgument { what: "rows", detail } if detail.contains("0-dimensional"),
            ["rows", "0-dimensional"]
        );
    }
    assert_no_leak(&dev);
}

#[test]
fn reshape_to_another_element_count_is_a_shape_mismatch() {
    let dev = device();
    {
        let m = matrix(&dev);
        refused!(
            m.reshape(&[5, 7]),
            Error::ShapeMismatch { what: "reshape", expected, got }
                if expected == "32 elements (shape [4, 8])" && got == "35 elements (shape [5, 7])",
            ["32", "35", "[5, 7]"]
        );
        assert_eq!(m.reshape(&[2, 16]).unwrap().shape(), &[2, 16]);
    }
    assert_no_leak(&dev);
}

#[test]
fn reshape_whose_element_count_overflows_is_invalid() {
    let dev = device();
    {
        let m = matrix(&dev);
        refused!(
            m.reshape(&[usize::MAX, 2]),
            Error::InvalidArgument { what: "shape", detail } if detail.contains("overflows"),
            [usize::MAX.to_string(), "overflows".to_owned()]
        );
    }
    assert_no_leak(&dev);
}

#[test]
fn reshape_whose_byte_size_overflows_is_invalid() {
    let dev = device();
    {
        let m = matrix(&dev);
        refused!(
            m.reshape(&[usize::MAX / 2, 1]),
            Error::InvalidArgument { what: "shape", detail } if detail.contains("F32"),
            [(usize::MAX / 2).to_string(), "overflows".to_owned()]
        );
    }
    assert_no_leak(&dev);
}

#[test]
fn cast_whose_last_dimension_does_not_divide_is_a_shape_mismatch() {
    let dev = device();
    {
        let bytes = bytes(&dev);
        refused!(
            bytes.cast(DType::F32),
            Error::ShapeMismatch { what: "cast: last dimension in bytes", expected, got }
                if expected == "a multiple of 4 (F32)" && got == "6 (6 x U8)",
            ["6 (6 x U8)", "a multiple of 4"]
        );
    }
    assert_no_leak(&dev);
}

#[test]
fn cast_of_a_u8_view_at_offset_1_to_f32_is_misaligned() {
    let dev = device();
    {
        let odd = bytes(&dev).slice(1..9).unwrap();
        assert_eq!(odd.byte_offset(), 1);
        refused!(
            odd.cast(DType::F32),
            Error::Misaligned {
                what: "cast: view offset for the new dtype",
                value: 1,
                align: 4
            },
            ["1 is not a multiple of 4"]
        );
    }
    assert_no_leak(&dev);
}

#[test]
fn cast_of_an_f16_view_at_offset_2_to_f64_is_misaligned() {
    let dev = device();
    {
        let halves = dev
            .alloc_labelled("halves", DType::F16, &[8], StorageMode::Private)
            .unwrap();
        refused!(
            halves.slice(1..5).unwrap().cast(DType::F64),
            Error::Misaligned {
                value: 2,
                align: 8,
                ..
            },
            ["2 is not a multiple of 8"]
        );
        // At offset 8 the same cast is fine.
        assert_eq!(
            halves.slice(4..8).unwrap().cast(DType::F64).unwrap().len(),
            1
        );
    }
    assert_no_leak(&dev);
}

#[test]
fn cast_of_an_empty_buffer_whose_last_dimension_overflows_in_bytes_is_invalid() {
    let dev = device();
    {
        let empty = dev
            .alloc(DType::F64, &[0, usize::MAX / 4], StorageMode::Shared)
            .unwrap();
        assert_eq!(empty.len(), 0);
        refused!(
            empty.cast(DType::U8),
            Error::InvalidArgument { what: "cast", detail } if detail.contains("overflows"),
            ["overflows"]
        );
    }
    assert_no_leak(&dev);
}
