//! The independent f64 host reference: the same model recomputed from the file's bytes (parsed
//! with the `safetensors` crate, not unibuf's loader), with none of the device code.
//!
//! It is teacher-forced: each step starts from the token the device fed in and runs the
//! experts the device chose, so that one legitimately different choice (two router logits
//! closer than the arithmetic's error) cannot make the rest of the run diverge. Whether the
//! device's choices were right is checked separately, against the reference's own router
//! logits (see `check.rs`). The mixing weights are the reference's own: a softmax of its f64
//! router logits over the chosen experts.
//!
//! The q4 weights are dequantised exactly: `(code - 8) * scale` with an f16 scale is exact in
//! f32 and f64 alike, so the device and the reference use the very same weights and differ only
//! by the device's f32 arithmetic.

use super::config::Config;
use super::model::{Step, EPS};
use super::weights_file::expert_prefix;
use crate::Failure;
use half::f16;
use safetensors::{Dtype, SafeTensors};

/// A q4 matrix over the file's bytes.
struct Q4Ref<'a> {
    packed: &'a [u8],
    /// The f16 scales, widened (exactly).
    scales: Vec<f64>,
    rows: usize,
    cols: usize,
    group: usize,
}

impl Q4Ref<'_> {
    /// `W x` in f64. Each group's scale is factored out of its sum, which is exact algebra;
    /// the f64 rounding that changes is far below what the check can see.
    fn matvec(&self, x: &[f64]) -> Vec<f64> {
        let (half_cols, groups) = (self.cols / 2, self.cols / self.group);
        (0..self.rows)
            .map(|r| {
                let row = &self.packed[r * half_cols..(r + 1) * half_cols];
                let scales = &self.scales[r * groups..(r + 1) * groups];
                row.chunks_exact(self.group / 2)
                    .zip(x.chunks_exact(self.group))
                    .zip(scales)
                    .map(|((bytes, xs), &s)| {
                        let mut acc = [0.0f64; 2];
                        for (&b, pair) in bytes.iter().zip(xs.chunks_exact(2)) {
                            acc[0] += (f64::from(b & 15) - 8.0) * pair[0];
                            acc[1] += (f64::from(b >> 4) - 8.0) * pair[1];
                        }
                        (acc[0] + acc[1]) * s
                    })
                    .sum()
            })
            .collect()
    }
}

/// The model's weights as the reference reads them.
pub struct HostModel<'a> {
    cfg: Config,
    embedding: Vec<f64>,
    norms: Vec<Vec<f64>>,
    routers: Vec<Q4Ref<'a>>,
    /// `[layer][expert]`: w1, w3, w2.
    experts: Vec<Vec<[Q4Ref<'a>; 3]>>,
    final_norm: Vec<f64>,
    lm_head: Q4Ref<'a>,
}

/// The tensor `name` of `dtype` and `shape`, as bytes.
fn bytes<'a>(
    st: &SafeTensors<'a>,
    name: &str,
    dtype: Dtype,
    shape: &[usize],
) -> Result<&'a [u8], Failure> {
    let t = st
        .tensor(name)
        .map_err(|e| Failure::new(format!("reference: tensor '{name}': {e}")))?;
    if t.dtype() != dtype || t.shape() != shape {
        return Err(Failure::new(format!(
            "reference: tensor '{name}' is {:?} {:?}, expected {dtype:?} {shape:?}",
            t.dtype(),
            t.shape()
        )));
    }
    Ok(t.data())
}

fn f32s(st: &SafeTensors<'_>, name: &str, shape: &[usize]) -> Result<Vec<f64>, Failure> {
    Ok(bytes(st, name, Dtype::F32, shape)?
        .chunks_exact(4)
        .map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
        .collect())
}

fn q4<'a>(
    st: &SafeTensors<'a>,
    name: &str,
    rows: usize,
    cols: usize,
    group: usize,
) -> Result<Q4Ref<'a>, Failure> {
    let packed = bytes(st, &format!("{name}.packed"), Dtype::U8, &[rows, cols / 2])?;
    let scales = bytes(
        st,
        &format!("{name}.scales"),
        Dtype::F16,
        &[rows, cols / group],
    )?
    .chunks_exact(2)
    .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f64())
    .collect();
    Ok(Q4Ref {
        packed,
        scales,
        rows,
        cols,
        group,
    })
}

impl<'a> HostModel<'a> {
    /// Reads the weights out of `file`, the whole weights file's bytes.
    pub fn parse(file: &'a [u8], cfg: Config) -> Result<HostModel<'a>, Failure> {
        let st = SafeTensors::deserialize(file)
            .map_err(|e| Failure::new(format!("reference: parsing the weights file: {e}")))?;
        let (h, f, g) = (cfg.hidden, cfg.ffn, cfg.group);
        let mut norms = Vec::with_capacity(cfg.layers);
        let mut routers = Vec::with_capacity(cfg.layers);
        let mut experts = Vec::with_capacity(cfg.layers);
        for l in 0..cfg.layers {
            norms.push(f32s(&st, &format!("layers.{l}.norm"), &[h])?);
            routers.push(q4(&st, &format!("layers.{l}.router"), cfg.experts, h, g)?);
            let mut row = Vec::with_capacity(cfg.experts);
            for e in 0..cfg.experts {
                let p = expert_prefix(l, e);
                row.push([
                    q4(&st, &format!("{p}w1"), f, h, g)?,
                    q4(&st, &format!("{p}w3"), f, h, g)?,
                    q4(&st, &format!("{p}w2"), h, f, g)?,
                ]);
            }
            experts.push(row);
        }
        Ok(HostModel {
            embedding: f32s(&st, "embedding", &[cfg.vocab, h])?,
            final_norm: f32s(&st, "final_norm", &[h])?,
            lm_head: q4(&st, "lm_head", cfg.vocab, h, g)?,
            norms,
            routers,
            experts,
            cfg,
        })
    }
}

fn rms_norm(x: &[f64], weight: &[f64]) -> Vec<f64> {
    let mean_square = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let scale = 1.0 / (mean_square + f64::from(EPS)).sqrt();
    x.iter().zip(weight).map(|(v, w)| v * scale * w).collect()
}

fn silu(g: f64) -> f64 {
    g / (1.0 + (-g).exp())
}

/// One step of the reference.
#[derive(Clone, Debug, PartialEq)]
pub struct RefStep {
    /// Per layer, the router's logits.
    pub router: Vec<Vec<f64>>,
    /// The final hidden state (after the final norm).
    pub hidden: Vec<f64>,
    pub logits: Vec<f64>,
}

/// Recomputes `step` from its input token, running the experts the device chose.
pub fn reference_step(m: &HostModel<'_>, step: &Step) -> RefStep {
    let h = m.cfg.hidden;
    let mut x = m.embedding[step.input * h..(step.input + 1) * h].to_vec();
    let mut router = Vec::with_capacity(m.cfg.layers);
    for (l, layer) in step.layers.iter().enumerate() {
        let xn = rms_norm(&x, &m.norms[l]);
        let logits = m.routers[l].matvec(&xn);
        let max = layer
            .chosen
            .iter()
            .map(|&e| logits[e])
            .fold(f64::NEG_INFINITY, f64::max);
        let exps: Vec<f64> = layer
            .chosen
            .iter()
            .map(|&e| (logits[e] - max).exp())
            .collect();
        let sum: f64 = exps.iter().sum();
        for (&e, p) in layer.chosen.iter().zip(exps.iter().map(|v| v / sum)) {
            let [w1, w3, w2] = &m.experts[l][e];
            let gate = w1.matvec(&xn);
            let up = w3.matvec(&xn);
            let act: Vec<f64> = gate.iter().zip(&up).map(|(&g, u)| silu(g) * u).collect();
            for (x, d) in x.iter_mut().zip(w2.matvec(&act)) {
                *x += p * d;
            }
        }
        router.push(logits);
    }
    let hidden = rms_norm(&x, &m.final_norm);
    let logits = m.lm_head.matvec(&hidden);
    RefStep {
        router,
        hidden,
        logits,
    }
}

/// Every step's reference. Steps are independent (the model has no attention, and the inputs
/// are the device's), so they are spread over the host's cores; if a thread cannot be started,
/// its steps run on this one.
pub fn reference_steps(m: &HostModel<'_>, steps: &[Step]) -> Result<Vec<RefStep>, Failure> {
    let compute =
        |part: &[Step]| -> Vec<RefStep> { part.iter().map(|s| reference_step(m, s)).collect() };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_thread = steps.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let parts: Vec<_> = steps
            .chunks(per_thread)
            .map(|part| {
                std::thread::Builder::new()
                    .name("unibuf-reference".to_owned())
                    .spawn_scoped(scope, move || compute(part))
                    .map_err(|_| part)
            })
            .collect();
        let mut all = Vec::with_capacity(steps.len());
        for part in parts {
            match part {
                Ok(thread) => all.extend(
                    thread
                        .join()
                        .map_err(|_| Failure::new("a reference thread panicked"))?,
                ),
                Err(part) => all.extend(compute(part)),
            }
        }
        Ok(all)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_matvec_dequantises_exactly() {
        // One row of 32 columns: codes 9 (w = 1 * s) in the low nibbles, 6 (w = -2 * s) in the
        // high ones; scale 0.5.
        let packed = vec![9u8 | (6 << 4); 16];
        let m = Q4Ref {
            packed: &packed,
            scales: vec![0.5],
            rows: 1,
            cols: 32,
            group: 32,
        };
        let x: Vec<f64> = (0..32).map(|i| i as f64).collect();
        let even: f64 = (0..16).map(|i| (2 * i) as f64).sum();
        let odd: f64 = (0..16).map(|i| (2 * i + 1) as f64).sum();
        assert_eq!(m.matvec(&x), [0.5 * even - 1.0 * odd]);
    }

    #[test]
    fn rms_norm_scales_to_unit_rms() {
        let y = rms_norm(&[3.0, -4.0], &[1.0, 2.0]);
        let r = (12.5f64 + f64::from(EPS)).sqrt();
        assert!((y[0] - 3.0 / r).abs() < 1e-15 && (y[1] + 8.0 / r).abs() < 1e-15);
    }
}
