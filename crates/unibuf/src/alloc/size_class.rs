//! Size classes: how a request is rounded before it meets the cache.
//!
//! Rounding lets freed blocks serve later requests of nearly the same size. The waste is
//! bounded: at most 256 bytes for small requests, under 12.5% (eight classes per power of two)
//! up to 32 MiB, and under one 2 MiB page beyond, where blocks are large enough that a relative
//! bound would waste whole pages.

/// The smallest class, and the granularity of small requests.
pub const MIN_CLASS: usize = 256;
/// Above this, classes are multiples of [`LARGE_GRANULE`].
pub const LARGE_THRESHOLD: usize = 32 << 20;
/// The granularity of large classes (a huge page).
pub const LARGE_GRANULE: usize = 2 << 20;

/// The class `bytes` is rounded up to, or `None` if rounding overflows.
pub fn size_class(bytes: usize) -> Option<usize> {
    if bytes <= MIN_CLASS {
        return Some(MIN_CLASS);
    }
    let step = if bytes > LARGE_THRESHOLD {
        LARGE_GRANULE
    } else {
        let high_bit = usize::BITS - 1 - bytes.leading_zeros();
        ((1usize << high_bit) / 8).max(MIN_CLASS)
    };
    // `step` is a power of two: round with a mask (`checked_next_multiple_of` divides, and
    // this runs on every allocation).
    debug_assert!(step.is_power_of_two());
    Some(bytes.checked_add(step - 1)? & !(step - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_cover_the_request_with_bounded_waste() {
        let mut x: usize = 1;
        while x < (1 << 34) {
            for b in [x, x + 1, x * 3 / 2 + 7] {
                let c = size_class(b).unwrap();
                assert!(c >= b, "{b} -> {c}");
                let waste = c - b;
                assert!(
                    waste < MIN_CLASS || (waste as f64) < b as f64 * 0.125 || waste < LARGE_GRANULE,
                    "{b} -> {c}"
                );
                assert_eq!(size_class(c), Some(c), "classes are fixed points");
            }
            x *= 2;
        }
        assert_eq!(size_class(usize::MAX), None);
    }
}
