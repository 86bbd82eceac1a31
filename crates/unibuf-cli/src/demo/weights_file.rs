//! The demo's weights file: random weights in the layout of a 4-bit MoE checkpoint, written as
//! safetensors, one tensor at a time (each tensor's bytes are generated when the serializer asks
//! for them, so the host never holds more than one tensor of the file).
//!
//! | tensor | dtype | shape |
//! |---|---|---|
//! | `embedding` | F32 | `[vocab, hidden]` |
//! | `layers.{l}.norm`, `final_norm` | F32 | `[hidden]` |
//! | `layers.{l}.router.{packed,scales}` | U8, F16 | q4 of `[experts, hidden]` |
//! | `layers.{l}.experts.{e}.w1.{packed,scales}` (and `w3`) | U8, F16 | q4 of `[ffn, hidden]` |
//! | `layers.{l}.experts.{e}.w2.{packed,scales}` | U8, F16 | q4 of `[hidden, ffn]` |
//! | `lm_head.{packed,scales}` | U8, F16 | q4 of `[vocab, hidden]` |
//!
//! A q4 matrix `[rows, cols]` is stored as `unibuf::ops::Q4Matrix` reads it: `packed` U8
//! `[rows, cols / 2]` (two 4-bit codes per byte, the low nibble the even column) and `scales`
//! F16 `[rows, cols / group]`, weight = (code - 8) * scale. The codes are drawn directly (no
//! float weights are quantised): -7..=7 around 8, zero twice as likely as the others, so that
//! the weights have mean 0 and variance 17.5 * scale²; scales are chosen so that each matrix
//! keeps activations of order one (variance about 1 / fan-in).

use super::config::Config;
use crate::rng::SplitMix64;
use crate::Failure;
use half::f16;
use safetensors::{Dtype, View};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use unibuf::weights::WeightsFile;

/// The metadata key naming the generator and the configuration the file was made for.
pub const META_KEY: &str = "unibuf.demo";

/// Variance of `code - 8` for the codes drawn here: 2 * (1² + ... + 7²) / 16.
const CODE_VARIANCE: f32 = 17.5;

/// The name prefix of expert `e` of layer `l` (its tensors are `w1.packed`, ... after it).
pub fn expert_prefix(l: usize, e: usize) -> String {
    format!("layers.{l}.experts.{e}.")
}

/// The names of the dense tensors: everything the expert cache does not stream.
pub fn dense_names(layers: usize) -> Vec<String> {
    let mut names = vec![
        "embedding".to_owned(),
        "final_norm".to_owned(),
        "lm_head.packed".to_owned(),
        "lm_head.scales".to_owned(),
    ];
    for l in 0..layers {
        names.push(format!("layers.{l}.norm"));
        names.push(format!("layers.{l}.router.packed"));
        names.push(format!("layers.{l}.router.scales"));
    }
    names
}

/// What the file was generated for, as stored under [`META_KEY`]: a file made for other
/// dimensions or another seed is refused rather than silently used.
pub fn signature(c: &Config, seed: u64) -> String {
    format!(
        "random MoE weights v1: hidden {} ffn {} layers {} experts {} vocab {} group {} seed {seed}",
        c.hidden, c.ffn, c.layers, c.experts, c.vocab, c.group
    )
}

/// How a tensor's values are drawn.
#[derive(Clone, Copy, Debug)]
enum Fill {
    /// F32 `offset + scale * u`, `u` uniform in [-1, 1).
    Uniform { offset: f32, scale: f32 },
    /// Packed 4-bit codes.
    Codes,
    /// F16 scales, uniform in [0.5, 1.5) times `base`.
    Scales { base: f32 },
}

/// One tensor of the file, generated on demand from its own seed.
#[derive(Debug)]
struct Generated {
    dtype: Dtype,
    shape: Vec<usize>,
    fill: Fill,
    seed: u64,
}

/// FNV-1a of a tensor's name: each tensor gets its own random stream, independent of the
/// order the serializer asks for them in.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A nibble of random bits as a code: as is, except 0, which becomes 8 (weight zero).
const fn code(n: u8) -> u8 {
    if n == 0 {
        8
    } else {
        n
    }
}

/// Byte `b` of random bits as two codes.
const fn code_pair(b: u8) -> u8 {
    code(b & 15) | (code(b >> 4) << 4)
}

const CODE_TABLE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = code_pair(i as u8);
        i += 1;
    }
    t
};

impl Generated {
    fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    fn bytes(&self) -> Vec<u8> {
        let n = self.elements();
        let mut rng = SplitMix64(self.seed);
        match self.fill {
            Fill::Uniform { offset, scale } => (0..n)
                .flat_map(|_| (offset + scale * rng.symmetric()).to_le_bytes())
                .collect(),
            Fill::Codes => {
                let mut out = Vec::with_capacity(n.next_multiple_of(8));
                while out.len() < n {
                    out.extend(
                        rng.next_u64()
                            .to_le_bytes()
                            .map(|b| CODE_TABLE[usize::from(b)]),
                    );
                }
                out.truncate(n);
                out
            }
            Fill::Scales { base } => (0..n)
                .flat_map(|_| f16::from_f32(base * (1.0 + 0.5 * rng.symmetric())).to_le_bytes())
                .collect(),
        }
    }
}

impl View for Generated {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.bytes())
    }
    fn data_len(&self) -> usize {
        self.elements() * self.dtype.bitsize() / 8
    }
}

/// Every tensor of the model, by name.
fn tensors(c: &Config, seed: u64) -> Vec<(String, Generated)> {
    let mut out = Vec::new();
    let mut push = |name: String, dtype: Dtype, shape: Vec<usize>, fill: Fill| {
        let seed = seed ^ name_hash(&name);
        out.push((
            name,
            Generated {
                dtype,
                shape,
                fill,
                seed,
            },
        ));
    };
    let q4 = |push: &mut dyn FnMut(String, Dtype, Vec<usize>, Fill),
              name: &str,
              rows: usize,
              cols: usize| {
        let base = 1.0 / (CODE_VARIANCE * cols as f32).sqrt();
        push(
            format!("{name}.packed"),
            Dtype::U8,
            vec![rows, cols / 2],
            Fill::Codes,
        );
        push(
            format!("{name}.scales"),
            Dtype::F16,
            vec![rows, cols / c.group],
            Fill::Scales { base },
        );
    };
    let norm = Fill::Uniform {
        offset: 1.0,
        scale: 0.1,
    };
    push(
        "embedding".to_owned(),
        Dtype::F32,
        vec![c.vocab, c.hidden],
        Fill::Uniform {
            offset: 0.0,
            scale: 1.0,
        },
    );
    push("final_norm".to_owned(), Dtype::F32, vec![c.hidden], norm);
    q4(&mut push, "lm_head", c.vocab, c.hidden);
    for l in 0..c.layers {
        push(format!("layers.{l}.norm"), Dtype::F32, vec![c.hidden], norm);
        q4(
            &mut push,
            &format!("layers.{l}.router"),
            c.experts,
            c.hidden,
        );
        for e in 0..c.experts {
            let p = expert_prefix(l, e);
            q4(&mut push, &format!("{p}w1"), c.ffn, c.hidden);
            q4(&mut push, &format!("{p}w3"), c.ffn, c.hidden);
            q4(&mut push, &format!("{p}w2"), c.hidden, c.ffn);
        }
    }
    out
}

/// The weights file of a run: a temporary one, removed when this drops, or the `--weights`
/// path, kept.
#[derive(Debug)]
pub struct WeightsPath {
    path: PathBuf,
    temporary: bool,
}

impl WeightsPath {
    /// `--weights PATH`, or a fresh temporary file.
    pub fn new(flag: Option<&Path>) -> WeightsPath {
        match flag {
            Some(p) => WeightsPath {
                path: p.to_path_buf(),
                temporary: false,
            },
            None => WeightsPath {
                path: std::env::temp_dir()
                    .join(format!("unibuf-demo-{}.safetensors", std::process::id())),
                temporary: true,
            },
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn temporary(&self) -> bool {
        self.temporary
    }
}

impl Drop for WeightsPath {
    fn drop(&mut self) {
        if self.temporary {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// How the weights file came to be.
#[derive(Debug)]
pub struct Prepared {
    pub file: WeightsFile,
    /// None when an existing file was reused.
    pub generated: Option<Duration>,
}

/// Generates the weights file at `at` for `c` and `seed`, or, when `at` is a kept path that
/// already holds a file generated for the same configuration, reuses it.
pub fn prepare(at: &WeightsPath, c: &Config, seed: u64) -> Result<Prepared, Failure> {
    let path = at.path();
    let want = signature(c, seed);
    if !at.temporary() && path.exists() {
        let file = WeightsFile::open(path)
            .map_err(|e| Failure::new(format!("--weights {}: {e}", path.display())))?;
        return match file.metadata().get(META_KEY) {
            Some(got) if *got == want => Ok(Prepared {
                file,
                generated: None,
            }),
            Some(got) => Err(Failure::new(format!(
                "--weights {} was generated for other flags ({got}); this run needs {want}: \
                 pass the flags it was made with, or another path",
                path.display()
            ))),
            None => Err(Failure::new(format!(
                "--weights {} exists and is not a file the demo generated (no '{META_KEY}' metadata); \
                 refusing to overwrite it",
                path.display()
            ))),
        };
    }
    let started = Instant::now();
    let meta = HashMap::from([(META_KEY.to_owned(), want)]);
    if let Err(e) = safetensors::serialize_to_file(tensors(c, seed), Some(meta), path) {
        // A partial file would only be refused later: remove it now.
        let _ = std::fs::remove_file(path);
        return Err(Failure::new(format!(
            "writing the weights file {}: {e}",
            path.display()
        )));
    }
    let generated = started.elapsed();
    let file = WeightsFile::open(path).map_err(|e| {
        Failure::new(format!(
            "opening the generated weights file {}: {e}",
            path.display()
        ))
    })?;
    Ok(Prepared {
        file,
        generated: Some(generated),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_symmetric_around_zero() {
        let g = Generated {
            dtype: Dtype::U8,
            shape: vec![1 << 16],
            fill: Fill::Codes,
            seed: 1,
        };
        let bytes = g.bytes();
        assert_eq!(bytes.len(), 1 << 16);
        let codes: Vec<i32> = bytes
            .iter()
            .flat_map(|b| [i32::from(b & 15) - 8, i32::from(b >> 4) - 8])
            .collect();
        assert!(codes.iter().all(|c| (-7..=7).contains(c)));
        let mean = codes.iter().sum::<i32>() as f64 / codes.len() as f64;
        let var = codes.iter().map(|&c| f64::from(c * c)).sum::<f64>() / codes.len() as f64;
        assert!(mean.abs() < 0.05, "mean {mean}");
        assert!(
            (var - f64::from(CODE_VARIANCE)).abs() < 0.3,
            "variance {var}"
        );
    }

    #[test]
    fn every_tensor_has_the_bytes_its_header_announces() {
        let c = Config {
            hidden: 64,
            ffn: 96,
            layers: 2,
            experts: 3,
            active: 2,
            budget: 2,
            vocab: 10,
            tokens: 1,
            group: 32,
            sampling: unibuf::ops::Sampling::greedy(),
        };
        let all = tensors(&c, 5);
        let total: usize = all.iter().map(|(_, g)| g.data_len()).sum();
        assert_eq!(total as u128, c.file_bytes());
        for (name, g) in &all {
            assert_eq!(g.bytes().len(), g.data_len(), "{name}");
        }
        let dense = dense_names(c.layers);
        assert_eq!(all.len(), dense.len() + 2 * 3 * c.layers * c.experts);
        assert!(dense.iter().all(|n| all.iter().any(|(m, _)| m == n)));
    }
}
