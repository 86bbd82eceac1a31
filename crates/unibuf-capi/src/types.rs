//! Element types and storage modes as C values.
//!
//! Enumerations that C passes in are plain `uint32_t` typedefs with `#define`d values, not C
//! enums: a Rust `enum` read from an out-of-range C value would be undefined behaviour, while a
//! `u32` is checked and an unknown value is `UB_STATUS_INVALID_ARGUMENT` naming it.

use crate::error::{CResult, Failure};
use unibuf::{DType, StorageMode};

/// An element type: one of the `UB_DTYPE_*` values.
pub type ub_dtype = u32;
/// IEEE 754 half precision.
pub const UB_DTYPE_F16: ub_dtype = 0;
/// bfloat16.
pub const UB_DTYPE_BF16: ub_dtype = 1;
/// IEEE 754 single precision.
pub const UB_DTYPE_F32: ub_dtype = 2;
/// IEEE 754 double precision.
pub const UB_DTYPE_F64: ub_dtype = 3;
/// Signed 8-bit integer.
pub const UB_DTYPE_I8: ub_dtype = 4;
/// Unsigned 8-bit integer (also raw bytes and packed 4-bit weights).
pub const UB_DTYPE_U8: ub_dtype = 5;
/// Signed 16-bit integer.
pub const UB_DTYPE_I16: ub_dtype = 6;
/// Unsigned 16-bit integer.
pub const UB_DTYPE_U16: ub_dtype = 7;
/// Signed 32-bit integer.
pub const UB_DTYPE_I32: ub_dtype = 8;
/// Unsigned 32-bit integer.
pub const UB_DTYPE_U32: ub_dtype = 9;
/// Signed 64-bit integer.
pub const UB_DTYPE_I64: ub_dtype = 10;
/// Unsigned 64-bit integer.
pub const UB_DTYPE_U64: ub_dtype = 11;
/// Reported for a dtype newer than this header; never accepted as an argument.
pub const UB_DTYPE_OTHER: ub_dtype = 0xFFFF_FFFF;

const DTYPES: [(ub_dtype, DType); 12] = [
    (UB_DTYPE_F16, DType::F16),
    (UB_DTYPE_BF16, DType::BF16),
    (UB_DTYPE_F32, DType::F32),
    (UB_DTYPE_F64, DType::F64),
    (UB_DTYPE_I8, DType::I8),
    (UB_DTYPE_U8, DType::U8),
    (UB_DTYPE_I16, DType::I16),
    (UB_DTYPE_U16, DType::U16),
    (UB_DTYPE_I32, DType::I32),
    (UB_DTYPE_U32, DType::U32),
    (UB_DTYPE_I64, DType::I64),
    (UB_DTYPE_U64, DType::U64),
];

/// The dtype of a C value.
pub(crate) fn dtype_in(what: &'static str, v: ub_dtype) -> CResult<DType> {
    DTYPES
        .iter()
        .find(|(c, _)| *c == v)
        .map(|(_, d)| *d)
        .ok_or_else(|| {
            Failure::invalid(
                what,
                format!("{v} is not a ub_dtype (UB_DTYPE_F16 = 0 .. UB_DTYPE_U64 = 11)"),
            )
        })
}

/// The C value of a dtype.
pub(crate) fn dtype_out(d: DType) -> ub_dtype {
    DTYPES
        .iter()
        .find(|(_, r)| *r == d)
        .map_or(UB_DTYPE_OTHER, |(c, _)| *c)
}

/// Bytes per element of a dtype; 0 for a value that is no dtype.
#[no_mangle]
pub extern "C" fn ub_dtype_size(dtype: ub_dtype) -> usize {
    dtype_in("dtype", dtype).map_or(0, |d| d.size())
}

/// Where a buffer's bytes live: one of the `UB_STORAGE_*` values.
pub type ub_storage_mode = u32;
/// The host and the device see the same bytes (host-mappable).
pub const UB_STORAGE_SHARED: ub_storage_mode = 0;
/// Device-only; the host reaches it through transfers (mapping it is refused).
pub const UB_STORAGE_PRIVATE: ub_storage_mode = 1;
/// Caller-owned host memory wrapped without copying (`ub_device_wrap_host`); never allocated.
pub const UB_STORAGE_EXTERNAL: ub_storage_mode = 2;
/// Memory another framework owns (`ub_device_wrap_foreign`); never allocated.
pub const UB_STORAGE_FOREIGN: ub_storage_mode = 3;
/// Shared on unified memory, Private on a discrete GPU (only asked for; a buffer reports the
/// mode it resolved to).
pub const UB_STORAGE_AUTO: ub_storage_mode = 4;

/// The storage mode of a C value.
pub(crate) fn mode_in(what: &'static str, v: ub_storage_mode) -> CResult<StorageMode> {
    Ok(match v {
        UB_STORAGE_SHARED => StorageMode::Shared,
        UB_STORAGE_PRIVATE => StorageMode::Private,
        UB_STORAGE_EXTERNAL => StorageMode::External,
        UB_STORAGE_FOREIGN => StorageMode::Foreign,
        UB_STORAGE_AUTO => StorageMode::Auto,
        _ => {
            return Err(Failure::invalid(
                what,
                format!(
                    "{v} is not a ub_storage_mode (UB_STORAGE_SHARED = 0 .. UB_STORAGE_AUTO = 4)"
                ),
            ))
        }
    })
}

/// The C value of a storage mode.
pub(crate) fn mode_out(m: StorageMode) -> ub_storage_mode {
    match m {
        StorageMode::Shared => UB_STORAGE_SHARED,
        StorageMode::Private => UB_STORAGE_PRIVATE,
        StorageMode::External => UB_STORAGE_EXTERNAL,
        StorageMode::Foreign => UB_STORAGE_FOREIGN,
        StorageMode::Auto => UB_STORAGE_AUTO,
    }
}

/// Copies `s` into a fixed C character array, NUL-terminated, truncated at a character
/// boundary if it does not fit.
pub(crate) fn fixed_str<const N: usize>(s: &str) -> [std::ffi::c_char; N] {
    let mut out = [0 as std::ffi::c_char; N];
    let mut end = s.len().min(N - 1);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    for (o, b) in out.iter_mut().zip(&s.as_bytes()[..end]) {
        *o = *b as std::ffi::c_char;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtypes_round_trip_and_sizes_are_the_core_s() {
        for d in DType::ALL {
            let c = dtype_out(d);
            assert_eq!(dtype_in("d", c).unwrap(), d);
            assert_eq!(ub_dtype_size(c), d.size());
        }
        assert_eq!(ub_dtype_size(12), 0);
        let e = dtype_in("dtype", 12).unwrap_err();
        assert!(e.message.contains("12 is not a ub_dtype"), "{}", e.message);
    }

    #[test]
    fn modes_round_trip() {
        for m in 0..5 {
            assert_eq!(mode_out(mode_in("m", m).unwrap()), m);
        }
        assert!(mode_in("mode", 5).is_err());
    }

    #[test]
    fn fixed_strings_truncate_on_a_character_boundary() {
        let a: [std::ffi::c_char; 4] = fixed_str("héllo");
        assert_eq!(a.map(|c| c as u8), [b'h', 0xc3, 0xa9, 0]);
        let b: [std::ffi::c_char; 3] = fixed_str("héllo");
        assert_eq!(b.map(|c| c as u8), [b'h', 0, 0]);
    }
}
