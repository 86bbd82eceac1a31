//! The backend's own kernels: fills wider than one byte, and the byte fills and copies that a
//! blit encoder may not do.
//!
//! On macOS, `fillBuffer:range:value:` fills bytes with one value and needs the range's start and
//! length to be multiples of 4; `copyFromBuffer:sourceOffset:toBuffer:destinationOffset:size:`
//! needs both offsets and the size to be multiples of 4. Apple documents both limits for macOS
//! (not iOS), so they are kept here whatever the GPU: a fill whose pattern repeats one byte over
//! a 4-aligned range is a blit; any other fill is `unibuf_fill_u8/16/32/64`; a copy that is not
//! 4-aligned is `unibuf_copy_u8`. All are grid-stride loops, so the grid can stay small.

use crate::backend::{FillPattern, LaunchArg, LaunchDims, RawRange};
use crate::kernel::{KernelSource, Param, ScalarArg, ScalarType};
use crate::DType;

/// Threads per threadgroup of the built-in kernels: a multiple of every Apple GPU's SIMD width
/// (32) and within every pipeline's limit.
const THREADS: u32 = 256;

/// At most this many threadgroups: enough to fill any Apple GPU; the loops cover the rest.
const MAX_GROUPS: u64 = 4096;

const MSL: &str = r#"
#include <metal_stdlib>
using namespace metal;

template <typename T>
static void fill_impl(device T* dst, T value, ulong n, uint i, uint grid) {
    for (ulong k = i; k < n; k += grid) {
        dst[k] = value;
    }
}

// Narrow patterns arrive as a uint (the width of unibuf's smallest scalar) and are cast.
kernel void unibuf_fill_u8(device uchar* dst [[buffer(0)]], constant uint& value [[buffer(1)]],
                           constant ulong& n [[buffer(2)]], uint i [[thread_position_in_grid]],
                           uint grid [[threads_per_grid]]) {
    fill_impl(dst, uchar(value), n, i, grid);
}

kernel void unibuf_fill_u16(device ushort* dst [[buffer(0)]], constant uint& value [[buffer(1)]],
                            constant ulong& n [[buffer(2)]], uint i [[thread_position_in_grid]],
                            uint grid [[threads_per_grid]]) {
    fill_impl(dst, ushort(value), n, i, grid);
}

kernel void unibuf_fill_u32(device uint* dst [[buffer(0)]], constant uint& value [[buffer(1)]],
                            constant ulong& n [[buffer(2)]], uint i [[thread_position_in_grid]],
                            uint grid [[threads_per_grid]]) {
    fill_impl(dst, value, n, i, grid);
}

kernel void unibuf_fill_u64(device ulong* dst [[buffer(0)]], constant ulong& value [[buffer(1)]],
                            constant ulong& n [[buffer(2)]], uint i [[thread_position_in_grid]],
                            uint grid [[threads_per_grid]]) {
    fill_impl(dst, value, n, i, grid);
}

kernel void unibuf_copy_u8(const device uchar* src [[buffer(0)]], device uchar* dst [[buffer(1)]],
                           constant ulong& n [[buffer(2)]], uint i [[thread_position_in_grid]],
                           uint grid [[threads_per_grid]]) {
    for (ulong k = i; k < n; k += grid) {
        dst[k] = src[k];
    }
}
"#;

/// The signature of the fills narrower than 8 bytes: the pattern comes as a `uint`.
const FILL_NARROW: &[Param] = &[
    Param::output("dst", DType::U8),
    Param::scalar("value", ScalarType::U32),
    Param::scalar("n", ScalarType::U64),
];

const fn fill_kernel(name: &'static str, params: &'static [Param]) -> KernelSource {
    KernelSource {
        name,
        params,
        cuda: None,
        msl: Some(MSL),
        cpu: None,
    }
}

/// The fill kernels by pattern width 1, 2, 4, 8. Launched by the backend itself, never through
/// the registry, so `params` only documents the binding.
pub(super) const FILLS: [KernelSource; 4] = [
    fill_kernel("unibuf_fill_u8", FILL_NARROW),
    fill_kernel("unibuf_fill_u16", FILL_NARROW),
    fill_kernel("unibuf_fill_u32", FILL_NARROW),
    fill_kernel(
        "unibuf_fill_u64",
        &[
            Param::output("dst", DType::U64),
            Param::scalar("value", ScalarType::U64),
            Param::scalar("n", ScalarType::U64),
        ],
    ),
];

/// The byte copy.
pub(super) const COPY: KernelSource = KernelSource {
    name: "unibuf_copy_u8",
    params: &[
        Param::input("src", DType::U8),
        Param::output("dst", DType::U8),
        Param::scalar("n", ScalarType::U64),
    ],
    cuda: None,
    msl: Some(MSL),
    cpu: None,
};

/// Which of `FILLS` fills with a pattern of `width` bytes.
pub(super) fn fill_index(width: usize) -> usize {
    match width {
        1 => 0,
        2 => 1,
        4 => 2,
        _ => 3,
    }
}

/// Whether a fill can be a blit: one repeated byte over a 4-aligned range.
pub(super) fn blit_fill_byte(pattern: &FillPattern, offset: usize, bytes: usize) -> Option<u8> {
    let b = pattern.bytes();
    (b.iter().all(|x| *x == b[0]) && offset.is_multiple_of(4) && bytes.is_multiple_of(4))
        .then_some(b[0])
}

/// Whether a copy can be a blit (macOS's 4-byte rule).
pub(super) fn blit_copy_ok(src_offset: usize, dst_offset: usize, bytes: usize) -> bool {
    src_offset.is_multiple_of(4) && dst_offset.is_multiple_of(4) && bytes.is_multiple_of(4)
}

/// Grid-stride geometry for `n` elements.
pub(super) fn dims(n: u64) -> LaunchDims {
    LaunchDims::linear(
        n.div_ceil(u64::from(THREADS)).clamp(1, MAX_GROUPS) as u32,
        THREADS,
    )
}

/// Arguments of a fill kernel over `dst` (width-aligned) with `pattern`: the pattern as the
/// element value it is in native byte order (widened to a `uint` below 4 bytes), and the count.
pub(super) fn fill_args(dst: RawRange, pattern: &FillPattern) -> [LaunchArg; 3] {
    let p = pattern.bytes();
    let value = match *p {
        [a] => ScalarArg::U32(u32::from(a)),
        [a, b] => ScalarArg::U32(u32::from(u16::from_ne_bytes([a, b]))),
        [a, b, c, d] => ScalarArg::U32(u32::from_ne_bytes([a, b, c, d])),
        [a, b, c, d, e, f, g, h] => ScalarArg::U64(u64::from_ne_bytes([a, b, c, d, e, f, g, h])),
        _ => ScalarArg::U32(0), // FillPattern has widths 1, 2, 4 and 8 only
    };
    let dtype = [DType::U8, DType::U16, DType::U32, DType::U64][fill_index(pattern.width())];
    [
        LaunchArg::Buffer {
            range: dst,
            dtype,
            writable: true,
        },
        LaunchArg::Scalar(value),
        LaunchArg::Scalar(ScalarArg::U64((dst.bytes / pattern.width()) as u64)),
    ]
}

/// Arguments of the byte copy.
pub(super) fn copy_args(src: RawRange, dst: RawRange) -> [LaunchArg; 3] {
    [
        LaunchArg::Buffer {
            range: src,
            dtype: DType::U8,
            writable: false,
        },
        LaunchArg::Buffer {
            range: dst,
            dtype: DType::U8,
            writable: true,
        },
        LaunchArg::Scalar(ScalarArg::U64(src.bytes as u64)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blits_only_where_macos_allows_them() {
        assert_eq!(blit_fill_byte(&FillPattern::u8(7), 4, 8), Some(7));
        assert_eq!(blit_fill_byte(&FillPattern::u8(7), 2, 8), None);
        assert_eq!(blit_fill_byte(&FillPattern::u8(7), 4, 6), None);
        assert_eq!(blit_fill_byte(&FillPattern::u32(0), 0, 64), Some(0));
        assert_eq!(blit_fill_byte(&FillPattern::u32(0x0101_0102), 0, 64), None);
        assert!(blit_copy_ok(4, 8, 12));
        assert!(!blit_copy_ok(4, 8, 13));
        assert!(!blit_copy_ok(1, 8, 12));
    }

    #[test]
    fn fill_args_count_elements_of_the_pattern_width() {
        let dst = RawRange {
            addr: 0,
            handle: 1,
            offset: 16,
            bytes: 64,
        };
        let [_, value, n] = fill_args(dst, &FillPattern::u16(0xBEEF));
        assert!(matches!(value, LaunchArg::Scalar(ScalarArg::U32(0xBEEF))));
        assert!(matches!(n, LaunchArg::Scalar(ScalarArg::U64(32))));
        let [_, value, n] = fill_args(dst, &FillPattern::u64(u64::MAX - 1));
        assert!(matches!(value, LaunchArg::Scalar(ScalarArg::U64(v)) if v == u64::MAX - 1));
        assert!(matches!(n, LaunchArg::Scalar(ScalarArg::U64(8))));
    }
}
