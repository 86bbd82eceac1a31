//! SplitMix64 (Steele, Lea and Flood, 2014): a tiny, well-mixed, seedable generator.
//! Hand-written because the demo and the benchmarks need reproducible noise, not
//! cryptography, and the tool has no `rand` dependency.

#[derive(Clone, Debug)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1). The top 24 bits make every value exactly representable in f32.
    pub fn symmetric(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u32 << 23) as f32 - 1.0
    }

    /// Uniform in `0..n` (`n >= 1`); the modulo bias is irrelevant for picking a demo token.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_is_reproducible_and_symmetric() {
        let mut a = SplitMix64(7);
        let mut b = SplitMix64(7);
        let xs: Vec<f32> = (0..10_000).map(|_| a.symmetric()).collect();
        assert!(xs
            .iter()
            .all(|&x| x == b.symmetric() && (-1.0..1.0).contains(&x)));
        let mean = xs.iter().map(|&x| f64::from(x)).sum::<f64>() / xs.len() as f64;
        assert!(mean.abs() < 0.05, "mean {mean}");
        assert!(xs.iter().any(|&x| x < -0.9) && xs.iter().any(|&x| x > 0.9));
        assert!((0..100).all(|_| a.below(3) < 3));
    }
}
