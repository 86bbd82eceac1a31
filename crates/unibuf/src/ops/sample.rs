//! On-device sampling of the next token: temperature, top-k and top-p (nucleus) over each row
//! of logits, with a counter-based random draw so that every backend picks the same token for
//! the same inputs, and no logits ever travel to the host.
//!
//! The algorithm, identical on every backend, is documented on [`Sampling`].

use super::row_common::float_kernels;
use super::{expect_dtype, expect_float, expect_shape, index_u32, kernel, output};
use crate::backend::cpu::CpuKernelArgs;
use crate::backend::LaunchDims;
use crate::buffer::Buffer;
use crate::dtype::{DType, Element};
use crate::epoch::Fence;
use crate::error::{Error, Result};
use crate::kernel::{KernelSource, Param, ScalarType};
use crate::queue::Queue;
use half::{bf16, f16};

/// The most candidates a sampling step keeps (`top_k` at most this; `top_k == 0` means this).
pub const SAMPLE_MAX_K: u32 = 1024;

/// Threads per block of the CUDA kernel and per threadgroup of the Metal kernel: at least
/// [`SAMPLE_MAX_K`], one candidate per thread after selection.
const THREADS: u32 = 1024;
const MAX_BLOCKS: u32 = 65_535;

const NAMES: [&str; 3] = [
    "unibuf_sample_f32",
    "unibuf_sample_f16",
    "unibuf_sample_bf16",
];

const fn params(logits: DType) -> [Param; 9] {
    [
        Param::input("logits", logits),
        Param::output("tokens", DType::U32),
        Param::scalar("rows", ScalarType::U32),
        Param::scalar("vocab", ScalarType::U32),
        Param::scalar("top_k", ScalarType::U32),
        Param::scalar("temperature", ScalarType::F32),
        Param::scalar("top_p", ScalarType::F32),
        Param::scalar("seed", ScalarType::U64),
        Param::scalar("step", ScalarType::U64),
    ]
}

const PARAMS_F32: [Param; 9] = params(DType::F32);
const PARAMS_F16: [Param; 9] = params(DType::F16);
const PARAMS_BF16: [Param; 9] = params(DType::BF16);

const CUDA: &str = concat!(
    include_str!("cuda/common.cuh"),
    include_str!("cuda/sample.cu")
);
const MSL: &str = include_str!("msl/sample.metal");

pub(crate) const KERNELS: &[KernelSource] = &float_kernels(
    NAMES,
    [&PARAMS_F32, &PARAMS_F16, &PARAMS_BF16],
    CUDA,
    MSL,
    [sample_cpu::<f32>, sample_cpu::<f16>, sample_cpu::<bf16>],
);

/// How to pick the next token from a row of logits.
///
/// The algorithm, identical on every backend (one block / threadgroup per row on a GPU):
///
/// 1. Logits are widened to f32; NaN counts as -inf. Candidates are ordered by logit descending,
///    **equal logits by lower token id first** (and -0.0 just below +0.0).
/// 2. Temperature 0, or `k == 1`: the first in that order (argmax, lowest id among equal maxima).
/// 3. Otherwise the first `k` in that order are the candidates, where `k` is `top_k`, or
///    [`SAMPLE_MAX_K`] when `top_k` is 0, and at most the vocabulary.
/// 4. `p_i = exp((v_i - v_0) / temperature)` in f32 (`v_0` the largest logit; if it is not
///    finite, candidate 0 is picked), `cum_i` the running sums. The kept prefix is the shortest
///    one with `cum_{n-1} >= top_p * cum_{k-1}`.
/// 5. `u = Sampling::uniform(step, row)`; the pick is the first `i < n` with
///    `cum_i > u * cum_{n-1}` (the last kept candidate if rounding leaves none).
///
/// Sums are in f32, in sequence on the CPU and as a tree on a GPU, so a draw that lands within
/// about 1e-6 of a boundary between two candidates may pick a neighbour on another backend.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// Divides the logits before the softmax; 0 picks the argmax. Finite, not negative.
    pub temperature: f32,
    /// Keep the `top_k` largest logits; 0 keeps [`SAMPLE_MAX_K`] (the kernel's maximum).
    pub top_k: u32,
    /// Keep the shortest prefix of the candidates whose probability reaches `top_p`; in (0, 1],
    /// 1 keeps them all.
    pub top_p: f32,
    /// Seeds the counter-based draws: `(seed, step, row)` fixes the draw.
    pub seed: u64,
}

impl Default for Sampling {
    /// Temperature 1, no top-k limit (beyond [`SAMPLE_MAX_K`]), top-p 1, seed 0.
    fn default() -> Self {
        Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// SplitMix64's finaliser after a golden-ratio increment (the same in the CUDA and MSL code).
const fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Sampling {
    /// Greedy decoding: always the argmax.
    pub const fn greedy() -> Sampling {
        Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }

    /// The uniform draw in [0, 1) (24 random bits) that step `step` uses for row `row`: a hash
    /// of `(seed, step, row)`, computed identically by every backend.
    ///
    /// ```
    /// let s = unibuf::ops::Sampling { seed: 7, ..Default::default() };
    /// let u = s.uniform(3, 0);
    /// assert!((0.0..1.0).contains(&u));
    /// assert_eq!(u, s.uniform(3, 0));
    /// assert_ne!(u, s.uniform(4, 0));
    /// ```
    pub fn uniform(&self, step: u64, row: u64) -> f32 {
        let h = mix(mix(mix(self.seed) ^ step) ^ row);
        (h >> 40) as f32 * (1.0 / 16_777_216.0)
    }

    /// The number of candidates for a vocabulary of `vocab` tokens.
    pub fn candidates(&self, vocab: usize) -> usize {
        let k = if self.top_k == 0 {
            SAMPLE_MAX_K
        } else {
            self.top_k
        };
        (k as usize).min(vocab)
    }

    /// Checks the parameters.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::invalid(
                "sampling temperature",
                format!(
                    "{} must be finite and not negative (0 = greedy)",
                    self.temperature
                ),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::invalid(
                "sampling top_p",
                format!("{} is outside (0, 1]", self.top_p),
            ));
        }
        if self.top_k > SAMPLE_MAX_K {
            return Err(Error::invalid(
                "sampling top_k",
                format!(
                    "{} is more than the kernel's maximum of {SAMPLE_MAX_K} candidates",
                    self.top_k
                ),
            ));
        }
        Ok(())
    }
}

/// (rows, vocab) of `logits`: `[vocab]` or `[rows, vocab]`.
fn geometry(logits: &Buffer) -> Result<(usize, usize)> {
    expect_float("sample logits", logits)?;
    match *logits.shape() {
        [v] if v > 0 => Ok((1, v)),
        [r, v] if r > 0 && v > 0 => Ok((r, v)),
        _ => Err(Error::ShapeMismatch {
            what: "sample logits",
            expected: "[vocab] or [rows, vocab], not empty".to_owned(),
            got: format!("{:?}", logits.shape()),
        }),
    }
}

/// Samples one token per row of `logits` (f32, f16 or bf16, `[vocab]` or `[rows, vocab]`) on
/// the device, into a new U32 buffer of `[rows]` (`[1]` for 1-D logits). `step` (e.g. the
/// position) and the row select the random draw together with `s.seed`.
///
/// ```
/// use unibuf::{ops, Device};
/// let dev = Device::open("cpu")?;
/// let q = dev.queue();
/// let logits = dev.from_slice("logits", &[0.5f32, 3.0, -1.0, 2.0, 3.0, 0.0], &[2, 3])?;
/// let greedy = ops::sample(&q, &logits, &ops::Sampling::greedy(), 0)?;
/// assert_eq!(q.download::<u32>(&greedy)?, [1, 1]); // ties go to the lower id
/// let s = ops::Sampling { temperature: 0.8, top_k: 2, top_p: 0.9, seed: 42 };
/// let tokens = q.download::<u32>(&ops::sample(&q, &logits, &s, 17)?)?;
/// assert!(tokens.iter().all(|&t| t < 3));
/// # Ok::<(), unibuf::Error>(())
/// ```
pub fn sample(q: &Queue, logits: &Buffer, s: &Sampling, step: u64) -> Result<Buffer> {
    let (rows, _) = geometry(logits)?;
    s.validate()?;
    let out = output(q, "sample", DType::U32, &[rows])?;
    sample_into(q, logits, s, step, &out)?;
    Ok(out)
}

/// [`sample`] into `out`, U32 `[rows]`. Returns the submission's fence.
pub fn sample_into(
    q: &Queue,
    logits: &Buffer,
    s: &Sampling,
    step: u64,
    out: &Buffer,
) -> Result<Fence> {
    let (rows, vocab) = geometry(logits)?;
    s.validate()?;
    expect_dtype("sample tokens", out, DType::U32)?;
    expect_shape("sample tokens", out, &[rows])?;
    let rows_u32 = index_u32("sample rows", rows)?;
    let vocab_u32 = index_u32("sample vocab", vocab)?;
    // The kernels step 32-bit counters through the row in strides of up to 16K elements.
    if vocab > i32::MAX as usize {
        return Err(Error::invalid(
            "sample vocab",
            format!("{vocab} tokens per row: at most {} are supported", i32::MAX),
        ));
    }
    let name = match logits.dtype() {
        DType::F32 => NAMES[0],
        DType::F16 => NAMES[1],
        _ => NAMES[2],
    };
    let k = kernel(q, name)?;
    q.launch(
        &k,
        LaunchDims::linear(rows_u32.min(MAX_BLOCKS), THREADS),
        &[
            logits.into(),
            out.into(),
            rows_u32.into(),
            vocab_u32.into(),
            s.top_k.into(),
            s.temperature.into(),
            s.top_p.into(),
            s.seed.into(),
            step.into(),
        ],
    )
}

/// A logit dtype as the CPU kernel reads it.
trait Logit: Element + Copy {
    fn f32(self) -> f32;
}
impl Logit for f32 {
    fn f32(self) -> f32 {
        self
    }
}
impl Logit for f16 {
    fn f32(self) -> f32 {
        self.to_f32()
    }
}
impl Logit for bf16 {
    fn f32(self) -> f32 {
        self.to_f32()
    }
}

/// The order-preserving key of a logit (NaN as -inf).
fn key(v: f32) -> u32 {
    let v = if v.is_nan() { f32::NEG_INFINITY } else { v };
    let u = v.to_bits();
    if u & 0x8000_0000 != 0 {
        !u
    } else {
        u | 0x8000_0000
    }
}

fn value(k: u32) -> f32 {
    f32::from_bits(if k & 0x8000_0000 != 0 {
        k & 0x7FFF_FFFF
    } else {
        !k
    })
}

/// The CPU kernel: one pass per row, the algorithm of the module docs.
fn sample_row(row: &[f32], k: usize, s: &Sampling, u: f32) -> u32 {
    // (key, !id): larger is earlier in the order.
    let cand = |i: usize| (u64::from(key(row[i])) << 32) | u64::from(u32::MAX - i as u32);
    let id = |c: u64| u32::MAX - (c & 0xFFFF_FFFF) as u32;
    if s.temperature == 0.0 || k == 1 {
        let best = (0..row.len()).map(cand).max().unwrap_or(0);
        return id(best);
    }
    let mut c: Vec<u64> = (0..row.len()).map(cand).collect();
    if k < c.len() {
        c.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
        c.truncate(k);
    }
    c.sort_unstable_by(|a, b| b.cmp(a));
    let v0 = value((c[0] >> 32) as u32);
    if !v0.is_finite() {
        return id(c[0]);
    }
    let mut cum = Vec::with_capacity(k);
    let mut acc = 0.0f32;
    for &x in &c {
        acc += ((value((x >> 32) as u32) - v0) / s.temperature).exp();
        cum.push(acc);
    }
    let threshold = s.top_p * acc;
    let n = cum.iter().position(|&v| v >= threshold).unwrap_or(k - 1) + 1;
    let kept = cum[n - 1];
    let pick = cum[..n].iter().position(|&v| v > u * kept).unwrap_or(n - 1);
    id(c[pick])
}

fn sample_cpu<L: Logit>(args: &mut CpuKernelArgs<'_>) -> std::result::Result<(), String> {
    const NAME: &str = "unibuf_sample";
    let rows = args.u32(2)? as usize;
    let vocab = args.u32(3)? as usize;
    let s = Sampling {
        top_k: args.u32(4)?,
        temperature: args.f32(5)?,
        top_p: args.f32(6)?,
        seed: args.u64(7)?,
    };
    let step = args.u64(8)?;
    let logits = args.input::<L>(0)?;
    let out = args.output::<u32>(1)?;
    if vocab == 0 {
        return Err(format!("{NAME}: the vocabulary is empty"));
    }
    if logits.len() != rows * vocab || out.len() != rows {
        return Err(format!(
            "{NAME}: {} logits and {} outputs for {rows} rows of {vocab}",
            logits.len(),
            out.len()
        ));
    }
    s.validate().map_err(|e| format!("{NAME}: {e}"))?;
    let k = s.candidates(vocab);
    let mut row = vec![0.0f32; vocab];
    for (r, (o, l)) in out.iter_mut().zip(logits.chunks_exact(vocab)).enumerate() {
        for (d, v) in row.iter_mut().zip(l) {
            *d = v.f32();
        }
        *o = sample_row(&row, k, &s, s.uniform(step, r as u64));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_order_like_floats_and_round_trip() {
        let vals = [
            f32::NEG_INFINITY,
            -3.5,
            -1e-30,
            -0.0,
            0.0,
            1e-30,
            2.0,
            f32::INFINITY,
        ];
        for w in vals.windows(2) {
            assert!(key(w[0]) < key(w[1]), "{w:?}");
        }
        for v in vals {
            assert_eq!(value(key(v)).to_bits(), v.to_bits());
        }
        assert_eq!(key(f32::NAN), key(f32::NEG_INFINITY));
    }

    #[test]
    fn uniform_is_in_range_and_varies() {
        let s = Sampling::default();
        let draws: Vec<f32> = (0..100).map(|i| s.uniform(i, 0)).collect();
        assert!(draws.iter().all(|u| (0.0..1.0).contains(u)));
        assert!(draws.windows(2).any(|w| w[0] != w[1]));
    }
}
