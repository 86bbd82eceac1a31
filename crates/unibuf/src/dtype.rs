//! Element types: [`DType`] names them at run time, [`Element`] ties a Rust type to its dtype.

use std::fmt;

/// The element type of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum DType {
    /// IEEE 754 half precision ([`half::f16`]).
    F16,
    /// bfloat16 ([`half::bf16`]).
    BF16,
    /// IEEE 754 single precision.
    F32,
    /// IEEE 754 double precision.
    F64,
    /// Signed 8-bit integer.
    I8,
    /// Unsigned 8-bit integer (also raw bytes and packed 4-bit weights).
    U8,
    /// Signed 16-bit integer.
    I16,
    /// Unsigned 16-bit integer.
    U16,
    /// Signed 32-bit integer.
    I32,
    /// Unsigned 32-bit integer.
    U32,
    /// Signed 64-bit integer.
    I64,
    /// Unsigned 64-bit integer.
    U64,
}

impl DType {
    /// Every dtype, for iteration in tests and tools.
    pub const ALL: [DType; 12] = [
        DType::F16,
        DType::BF16,
        DType::F32,
        DType::F64,
        DType::I8,
        DType::U8,
        DType::I16,
        DType::U16,
        DType::I32,
        DType::U32,
        DType::I64,
        DType::U64,
    ];

    /// Bytes per element.
    ///
    /// ```
    /// assert_eq!(unibuf::DType::BF16.size(), 2);
    /// ```
    pub const fn size(self) -> usize {
        match self {
            DType::I8 | DType::U8 => 1,
            DType::F16 | DType::BF16 | DType::I16 | DType::U16 => 2,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F64 | DType::I64 | DType::U64 => 8,
        }
    }

    /// The name used in files and messages (the safetensors spelling).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F32 => "F32",
            DType::F64 => "F64",
            DType::I8 => "I8",
            DType::U8 => "U8",
            DType::I16 => "I16",
            DType::U16 => "U16",
            DType::I32 => "I32",
            DType::U32 => "U32",
            DType::I64 => "I64",
            DType::U64 => "U64",
        }
    }

    /// Parses a name as written by [`DType::name`] (case-insensitive).
    pub fn from_name(name: &str) -> Option<DType> {
        DType::ALL
            .into_iter()
            .find(|d| d.name().eq_ignore_ascii_case(name))
    }

    /// Whether the dtype is a floating-point type.
    pub const fn is_float(self) -> bool {
        matches!(self, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

mod sealed {
    /// Only the element types of this crate: their size is their dtype's size, which slices
    /// over buffer memory rely on.
    pub trait Sealed {}
}

/// A Rust type that can be the element of a buffer.
///
/// Implemented for the primitive numeric types and for [`half::f16`] and [`half::bf16`]; the
/// `Pod` bound is what makes reinterpreting buffer bytes as elements sound. The trait is sealed:
/// host access sizes slices by `T`, so `T` must be exactly as large as its dtype.
pub trait Element: sealed::Sealed + bytemuck::Pod + Send + Sync + 'static {
    /// The dtype of this type.
    const DTYPE: DType;
}

macro_rules! impl_element {
    ($($t:ty => $d:ident),* $(,)?) => {
        $(
            impl sealed::Sealed for $t {}
            impl Element for $t { const DTYPE: DType = DType::$d; }
            const _: () = assert!(std::mem::size_of::<$t>() == DType::$d.size());
        )*
    };
}

impl_element! {
    half::f16 => F16, half::bf16 => BF16, f32 => F32, f64 => F64,
    i8 => I8, u8 => U8, i16 => I16, u16 => U16, i32 => I32, u32 => U32, i64 => I64, u64 => U64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_rust_types() {
        fn size_of<T: Element>() -> (DType, usize) {
            (T::DTYPE, std::mem::size_of::<T>())
        }
        for (d, s) in [
            size_of::<half::f16>(),
            size_of::<half::bf16>(),
            size_of::<f32>(),
            size_of::<f64>(),
            size_of::<i8>(),
            size_of::<u8>(),
            size_of::<i16>(),
            size_of::<u16>(),
            size_of::<i32>(),
            size_of::<u32>(),
            size_of::<i64>(),
            size_of::<u64>(),
        ] {
            assert_eq!(d.size(), s, "{d}");
        }
    }

    #[test]
    fn names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_name(d.name()), Some(d));
            assert_eq!(DType::from_name(&d.name().to_lowercase()), Some(d));
        }
        assert_eq!(DType::from_name("F8"), None);
    }
}
