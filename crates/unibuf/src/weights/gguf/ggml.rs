//! ggml tensor types: their codes in a GGUF file, block lengths and block sizes.

use crate::dtype::DType;
use std::fmt;

/// Declares [`GgmlType`] and its table from one list, so that the code, the name and the block
/// geometry of a type cannot drift apart.
macro_rules! ggml_types {
    ($( $(#[$doc:meta])* $v:ident = $code:literal, $blk:literal, $bytes:literal; )*) => {
        /// A ggml tensor type as a GGUF tensor info names it (the `ggml_type` u32).
        ///
        /// The codes and block geometries are those of ggml's `ggml.h` / `ggml-common.h` (the
        /// same as gguf-py's `GGML_QUANT_SIZES`). Codes ggml has retired (4, 5, 31-33, 36-38)
        /// and Q8_1 (a compute-time type ggml never writes to files, whose size gguf-py and
        /// ggml disagree on: 40 and 36 bytes) are not recognised.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        // ggml's own spellings (Q4_K, IQ2_XXS): the names every GGUF tool prints, and the
        // names `name()` returns, are worth more than Rust's casing convention here.
        #[allow(non_camel_case_types)]
        pub enum GgmlType {
            $( $(#[$doc])* $v, )*
        }

        impl GgmlType {
            /// Every recognised type, in code order.
            pub const ALL: &'static [GgmlType] = &[$(GgmlType::$v),*];

            /// The type with file code `code`, if it is one of those recognised.
            pub const fn from_code(code: u32) -> Option<GgmlType> {
                match code {
                    $( $code => Some(GgmlType::$v), )*
                    _ => None,
                }
            }

            /// The type's code in a GGUF file.
            pub const fn code(self) -> u32 {
                match self { $( GgmlType::$v => $code, )* }
            }

            /// The name gguf-py gives the type ("F32", "Q4_1", "Q6_K", ...).
            pub const fn name(self) -> &'static str {
                match self { $( GgmlType::$v => stringify!($v), )* }
            }

            /// Elements per block: 1 for plain types, 32 or 256 for the block formats.
            pub const fn block_len(self) -> u64 {
                match self { $( GgmlType::$v => $blk, )* }
            }

            /// Bytes per block (for a plain type, bytes per element).
            pub const fn block_bytes(self) -> u64 {
                match self { $( GgmlType::$v => $bytes, )* }
            }
        }
    };
}

ggml_types! {
    /// IEEE 754 single precision.
    F32 = 0, 1, 4;
    /// IEEE 754 half precision.
    F16 = 1, 1, 2;
    /// 4-bit blocks of 32: an f16 scale and 16 bytes of nibbles.
    Q4_0 = 2, 32, 18;
    /// 4-bit blocks of 32: f16 scale and minimum, 16 bytes of nibbles.
    Q4_1 = 3, 32, 20;
    /// 5-bit blocks of 32: f16 scale, 4 bytes of high bits, 16 bytes of nibbles.
    Q5_0 = 6, 32, 22;
    /// 5-bit blocks of 32: f16 scale and minimum, high bits, nibbles.
    Q5_1 = 7, 32, 24;
    /// 8-bit blocks of 32: an f16 scale and 32 signed bytes.
    Q8_0 = 8, 32, 34;
    /// 2-bit K-quant super-blocks of 256.
    Q2_K = 10, 256, 84;
    /// 3-bit K-quant super-blocks of 256.
    Q3_K = 11, 256, 110;
    /// 4-bit K-quant super-blocks of 256.
    Q4_K = 12, 256, 144;
    /// 5-bit K-quant super-blocks of 256.
    Q5_K = 13, 256, 176;
    /// 6-bit K-quant super-blocks of 256.
    Q6_K = 14, 256, 210;
    /// 8-bit K-quant super-blocks of 256 (an f32 scale and block sums).
    Q8_K = 15, 256, 292;
    /// i-quant, 2.06 bits per weight.
    IQ2_XXS = 16, 256, 66;
    /// i-quant, 2.31 bits per weight.
    IQ2_XS = 17, 256, 74;
    /// i-quant, 3.06 bits per weight.
    IQ3_XXS = 18, 256, 98;
    /// i-quant, 1.56 bits per weight.
    IQ1_S = 19, 256, 50;
    /// Non-linear 4-bit blocks of 32.
    IQ4_NL = 20, 32, 18;
    /// i-quant, 3.44 bits per weight.
    IQ3_S = 21, 256, 110;
    /// i-quant, 2.5 bits per weight.
    IQ2_S = 22, 256, 82;
    /// Non-linear 4-bit super-blocks of 256.
    IQ4_XS = 23, 256, 136;
    /// Signed 8-bit integer.
    I8 = 24, 1, 1;
    /// Signed 16-bit integer.
    I16 = 25, 1, 2;
    /// Signed 32-bit integer.
    I32 = 26, 1, 4;
    /// Signed 64-bit integer.
    I64 = 27, 1, 8;
    /// IEEE 754 double precision.
    F64 = 28, 1, 8;
    /// i-quant, 1.75 bits per weight.
    IQ1_M = 29, 256, 56;
    /// bfloat16.
    BF16 = 30, 1, 2;
    /// Ternary super-blocks of 256, 1.69 bits per weight.
    TQ1_0 = 34, 256, 54;
    /// Ternary super-blocks of 256, 2.06 bits per weight.
    TQ2_0 = 35, 256, 66;
    /// Microscaling FP4 blocks of 32: an E8M0 scale and 16 bytes of E2M1 nibbles.
    MXFP4 = 39, 32, 17;
}

impl GgmlType {
    /// Whether the type stores blocks of several elements (every quantized format).
    pub const fn is_quantized(self) -> bool {
        self.block_len() > 1
    }

    /// Whether unibuf means to read this type natively: F32, F16 and BF16 as its own dtypes,
    /// Q8_0, Q4_0 and Q4_1 with kernels of its own. The rest (the K-quants, i-quants, ...) are
    /// recognised so that their sizes and layouts validate, not so that they can be computed
    /// with.
    pub const fn is_native(self) -> bool {
        matches!(
            self,
            GgmlType::F32
                | GgmlType::F16
                | GgmlType::BF16
                | GgmlType::Q8_0
                | GgmlType::Q4_0
                | GgmlType::Q4_1
        )
    }

    /// The unibuf dtype whose elements are this type's, for the plain (one element per block)
    /// types unibuf has; `None` for block formats.
    pub const fn dtype(self) -> Option<DType> {
        match self {
            GgmlType::F32 => Some(DType::F32),
            GgmlType::F16 => Some(DType::F16),
            GgmlType::BF16 => Some(DType::BF16),
            GgmlType::F64 => Some(DType::F64),
            GgmlType::I8 => Some(DType::I8),
            GgmlType::I16 => Some(DType::I16),
            GgmlType::I32 => Some(DType::I32),
            GgmlType::I64 => Some(DType::I64),
            _ => None,
        }
    }

    /// Bytes of `elements` elements of this type: `None` if `elements` is not a whole number
    /// of blocks or the size overflows a u64.
    pub const fn byte_len(self, elements: u64) -> Option<u64> {
        if !elements.is_multiple_of(self.block_len()) {
            return None;
        }
        (elements / self.block_len()).checked_mul(self.block_bytes())
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_unique() {
        let mut codes = std::collections::HashSet::new();
        for &t in GgmlType::ALL {
            assert!(codes.insert(t.code()), "{t} reuses code {}", t.code());
            assert_eq!(GgmlType::from_code(t.code()), Some(t));
        }
        for retired in [4, 5, 9, 31, 32, 33, 36, 37, 38, 1000, u32::MAX] {
            assert_eq!(GgmlType::from_code(retired), None);
        }
    }

    #[test]
    fn block_geometry_matches_ggml() {
        // (type, elements per block, bytes per block) from ggml-common.h's static_asserts.
        let want = [
            (GgmlType::F32, 1, 4),
            (GgmlType::F16, 1, 2),
            (GgmlType::BF16, 1, 2),
            (GgmlType::Q8_0, 32, 34),
            (GgmlType::Q4_0, 32, 18),
            (GgmlType::Q4_1, 32, 20),
            (GgmlType::Q4_K, 256, 144),
            (GgmlType::Q6_K, 256, 210),
        ];
        for (t, blk, bytes) in want {
            assert_eq!((t.block_len(), t.block_bytes()), (blk, bytes), "{t}");
        }
        assert_eq!(
            GgmlType::Q4_1.byte_len(576 * 1536),
            Some(576 * 1536 / 32 * 20)
        );
        assert_eq!(GgmlType::Q4_1.byte_len(33), None);
        assert_eq!(GgmlType::F32.byte_len(u64::MAX), None);
        assert_eq!(GgmlType::F32.dtype(), Some(DType::F32));
        assert_eq!(GgmlType::Q8_0.dtype(), None);
        assert!(GgmlType::Q4_1.is_native() && !GgmlType::Q6_K.is_native());
        assert!(GgmlType::Q6_K.is_quantized() && !GgmlType::BF16.is_quantized());
    }
}
