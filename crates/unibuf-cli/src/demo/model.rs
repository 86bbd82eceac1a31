//! The MoE decoder on the device: dense weights loaded from the file, experts streamed through
//! the expert cache, every layer built from the ops of `unibuf::ops`.
//!
//! ```text
//! x = embedding[token]                       device copy of a row view (zero-copy file on
//!                                            unified memory)
//! per layer l:
//!   xn     = rms_norm(x) * norm[l]
//!   logits = router[l] xn                    q4 matvec into Shared memory, read by the host
//!   pre    = router[l+1] xn                  pre-gating: a guess at the next layer's experts,
//!                                            whose reads start now (ExpertCache::prefetch)
//!   for the top-k experts e, p = softmax over the top-k logits:
//!     x += p_e * w2_e (silu(w1_e xn) * (w3_e xn))      q4 matvecs, SwiGLU, a weighted add
//! h      = rms_norm(x) * final_norm          into row t of the hidden states
//! logits = lm_head h                         into row t of the logits
//! token  = sample(logits)                    on the device; 4 bytes read by the host
//! ```
//!
//! The host reads back only what it must: the router's few logits per layer (it has to know
//! which experts to fetch, which is inherent to streaming MoE) and the sampled token. Both land
//! in Shared memory, which the host reads in place: on a discrete GPU the kernels write them
//! straight into mapped host memory, so no copy is made.

use super::config::Config;
use super::kernels::Kernels;
use super::weights_file::{dense_names, expert_prefix};
use crate::{Context, Failure};
use std::time::{Duration, Instant};
use unibuf::ops::{self, Q4Matrix};
use unibuf::weights::{
    ExpertCache, ExpertHandle, ExpertLayout, LoadReport, LoadedWeights, Selection, WeightsFile,
};
use unibuf::{Buffer, DType, Device, StorageMode};

/// The RMS norm epsilon.
pub const EPS: f32 = 1e-5;

/// What the host decided at one layer of one step.
#[derive(Clone, Debug)]
pub struct LayerStep {
    /// The router's logits as the device computed them.
    pub router: Vec<f32>,
    /// The experts run, best first.
    pub chosen: Vec<usize>,
    /// The experts pre-gating predicted for this layer (none for layer 0).
    pub predicted: Vec<usize>,
}

/// One decoding step.
#[derive(Clone, Debug)]
pub struct Step {
    pub input: usize,
    pub layers: Vec<LayerStep>,
    /// The sampled token.
    pub output: usize,
    pub time: Duration,
}

/// The dense weights (views of the loaded file) and the expert cache.
pub struct Model {
    cfg: Config,
    dev: Device,
    kernels: Kernels,
    embedding: Buffer,
    norms: Vec<Buffer>,
    routers: Vec<Q4Matrix>,
    final_norm: Buffer,
    lm_head: Q4Matrix,
    cache: ExpertCache,
    /// `[tokens, hidden]`: each step's final hidden state.
    pub hidden: Buffer,
    /// `[tokens, vocab]`: each step's logits.
    pub logits: Buffer,
    /// The residual stream, ping-ponged: a kernel may not write a buffer it also reads.
    x: [Buffer; 2],
    xn: Buffer,
    /// Shared `[1, experts]`: this layer's router logits and the next layer's pre-gating.
    router_out: Buffer,
    pregate_out: Buffer,
    gate: Buffer,
    up: Buffer,
    act: Buffer,
    down: Buffer,
    /// Shared U32 `[1]`: the sampled token.
    token: Buffer,
    /// Keeps the dense views' storage alive (views of the mapped file on unified memory).
    _dense: LoadedWeights,
}

/// The dense tensor `name`, checked against the shape the configuration calls for.
fn dense(w: &LoadedWeights, name: &str, dtype: DType, shape: &[usize]) -> Result<Buffer, Failure> {
    let b = w
        .get(name)
        .ok_or_else(|| Failure::new(format!("the weights file has no tensor '{name}'")))?;
    if b.dtype() != dtype || b.shape() != shape {
        return Err(Failure::new(format!(
            "tensor '{name}' is {} {:?} in the weights file; the model needs {dtype} {shape:?}",
            b.dtype(),
            b.shape()
        )));
    }
    Ok(b.clone())
}

/// The q4 matrix `name` (`name.packed`, `name.scales`) of `rows x cols`.
fn q4(
    get: impl Fn(&str) -> Option<Buffer>,
    name: &str,
    rows: usize,
    cols: usize,
    group: usize,
) -> Result<Q4Matrix, Failure> {
    let part = |p: &str| {
        get(p).ok_or_else(|| Failure::new(format!("the weights file has no tensor '{name}.{p}'")))
    };
    Q4Matrix::from_parts(part("packed")?, part("scales")?, rows, cols, group)
        .context(&format!("tensor '{name}'"))
}

/// An expert's three matrices.
fn expert(h: &ExpertHandle, cfg: &Config) -> Result<[Q4Matrix; 3], Failure> {
    let prefix = expert_prefix(h.layer(), h.expert());
    let m = |w: &str, rows, cols| {
        q4(
            |p| h.get(&format!("{w}.{p}")).cloned(),
            &format!("{prefix}{w}"),
            rows,
            cols,
            cfg.group,
        )
    };
    Ok([
        m("w1", cfg.ffn, cfg.hidden)?,
        m("w3", cfg.ffn, cfg.hidden)?,
        m("w2", cfg.hidden, cfg.ffn)?,
    ])
}

/// The `k` largest logits' indices, largest first, ties to the lower index. NaN is refused.
pub fn top_k(logits: &[f32], k: usize) -> Result<Vec<usize>, String> {
    if let Some(i) = logits.iter().position(|v| !v.is_finite()) {
        return Err(format!("logit {i} is {}", logits[i]));
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    order.truncate(k);
    Ok(order)
}

/// Softmax of the chosen experts' logits: their mixing weights (Mixtral's routing).
pub fn mix_weights(logits: &[f32], chosen: &[usize]) -> Vec<f32> {
    let max = chosen
        .iter()
        .map(|&e| f64::from(logits[e]))
        .fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = chosen
        .iter()
        .map(|&e| (f64::from(logits[e]) - max).exp())
        .collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|&v| (v / sum) as f32).collect()
}

impl Model {
    /// Loads the dense tensors (zero copy on unified memory, staged into device memory on a
    /// discrete GPU) and opens the expert cache over the rest. Returns the load's report.
    pub fn load(
        dev: &Device,
        file: &WeightsFile,
        cfg: Config,
        kernels: Kernels,
    ) -> Result<(Model, LoadReport), Failure> {
        let (h, v) = (cfg.hidden, cfg.vocab);
        let loaded = file
            .load(
                dev,
                &dev.queue().labelled("load dense weights"),
                &Selection::names(dense_names(cfg.layers)),
            )
            .context("loading the dense weights")?;
        let report = loaded.report().clone();
        let get = |name: &str| loaded.get(name).cloned();
        let embedding = dense(&loaded, "embedding", DType::F32, &[v, h])?;
        let final_norm = dense(&loaded, "final_norm", DType::F32, &[h])?;
        let lm_head = q4(|p| get(&format!("lm_head.{p}")), "lm_head", v, h, cfg.group)?;
        let mut norms = Vec::with_capacity(cfg.layers);
        let mut routers = Vec::with_capacity(cfg.layers);
        for l in 0..cfg.layers {
            norms.push(dense(
                &loaded,
                &format!("layers.{l}.norm"),
                DType::F32,
                &[h],
            )?);
            let name = format!("layers.{l}.router");
            routers.push(q4(
                |p| get(&format!("{name}.{p}")),
                &name,
                cfg.experts,
                h,
                cfg.group,
            )?);
        }
        let layout = ExpertLayout::by_prefix(file, cfg.layers, cfg.experts, expert_prefix)
            .context("finding the experts in the weights file")?;
        let cache =
            ExpertCache::new(dev, file, layout, cfg.budget).context("opening the expert cache")?;

        let buf = |label: &str, dtype: DType, shape: &[usize], mode: StorageMode| {
            dev.alloc_labelled(label, dtype, shape, mode)
                .context(&format!("allocating '{label}'"))
        };
        let f32s = |label: &str, shape: &[usize]| buf(label, DType::F32, shape, StorageMode::Auto);
        let model = Model {
            hidden: f32s("hidden states", &[cfg.tokens, h])?,
            logits: f32s("logits", &[cfg.tokens, v])?,
            x: [f32s("x.0", &[1, h])?, f32s("x.1", &[1, h])?],
            xn: f32s("xn", &[1, h])?,
            router_out: buf(
                "router logits",
                DType::F32,
                &[1, cfg.experts],
                StorageMode::Shared,
            )?,
            pregate_out: buf(
                "pre-gating logits",
                DType::F32,
                &[1, cfg.experts],
                StorageMode::Shared,
            )?,
            gate: f32s("gate", &[1, cfg.ffn])?,
            up: f32s("up", &[1, cfg.ffn])?,
            act: f32s("act", &[1, cfg.ffn])?,
            down: f32s("down", &[1, h])?,
            token: buf("token", DType::U32, &[1], StorageMode::Shared)?,
            cfg,
            dev: dev.clone(),
            kernels,
            embedding,
            norms,
            routers,
            final_norm,
            lm_head,
            cache,
            _dense: loaded,
        };
        Ok((model, report))
    }

    pub fn cache(&self) -> &ExpertCache {
        &self.cache
    }

    /// The storage mode of the dense weights (External when the file is used in place).
    pub fn dense_mode(&self) -> StorageMode {
        self.embedding.mode()
    }

    /// Decodes `cfg.tokens` tokens from `first`, each step waiting for its sampled token, as a
    /// decode loop must before the next step can start.
    pub fn decode(&self, first: usize) -> Result<Vec<Step>, Failure> {
        let cfg = &self.cfg;
        let q = self.dev.queue();
        // One label per role, so that the submission table splits the q4 matvecs by what
        // they compute; all are the same queue, so the work stays in stream order.
        let embed = q.labelled("embed (row copy)");
        let norm = q.labelled("rms_norm");
        let router = q.labelled("router (q4 matvec)");
        let pregate = q.labelled("pre-gating router (q4 matvec)");
        let up = q.labelled("expert w1, w3 (q4 matvec)");
        let swiglu = q.labelled("expert swiglu");
        let down = q.labelled("expert w2 (q4 matvec)");
        let mix = q.labelled("expert mix (scaled add)");
        let lm_head = q.labelled("lm head (q4 matvec)");
        let sample = q.labelled("sample");

        let mut steps = Vec::with_capacity(cfg.tokens);
        let mut token = first;
        let mut predicted: Vec<usize> = Vec::new();
        for t in 0..cfg.tokens {
            let started = Instant::now();
            let what = |s: &str| format!("step {t}: {s}");
            let [mut x, mut next] = [&self.x[0], &self.x[1]];
            embed
                .copy_async(&self.embedding.rows(token..token + 1)?, x)
                .context(&what("copying the token's embedding"))?;
            let mut layers = Vec::with_capacity(cfg.layers);
            for l in 0..cfg.layers {
                let predicted_here = if l == 0 {
                    Vec::new()
                } else {
                    std::mem::take(&mut predicted)
                };
                ops::rms_norm_into(&norm, x, &self.norms[l], EPS, &self.xn)?;
                ops::q4_matvec_into(&router, &self.routers[l], &self.xn, &self.router_out)?;
                // Pre-gating: the next layer's router applied to this layer's normed input.
                // The residual stream changes little from one layer to the next, so its top
                // experts are a good guess at what the next layer will pick, known a whole
                // layer early: their reads start now and overlap this layer's compute.
                let next_router = self.routers.get(l + 1);
                if let Some(r) = next_router {
                    ops::q4_matvec_into(&pregate, r, &self.xn, &self.pregate_out)?;
                }
                let logits = self
                    .router_out
                    .read::<f32>()
                    .context(&what("reading the router logits"))?
                    .to_vec();
                let chosen = top_k(&logits, cfg.active)
                    .map_err(|e| Failure::new(what(&format!("layer {l}'s router: {e}"))))?;
                if next_router.is_some() {
                    let pre = self
                        .pregate_out
                        .read::<f32>()
                        .context(&what("reading the pre-gating logits"))?
                        .to_vec();
                    let guess = top_k(&pre, cfg.active).map_err(|e| {
                        Failure::new(what(&format!("pre-gating layer {}: {e}", l + 1)))
                    })?;
                    self.cache
                        .prefetch(l + 1, &guess)
                        .context(&what("prefetching experts"))?;
                    predicted = guess;
                }
                let weights = mix_weights(&logits, &chosen);
                for (&e, &p) in chosen.iter().zip(&weights) {
                    let h = self
                        .cache
                        .get(l, e)
                        .context(&what(&format!("fetching expert {e} of layer {l}")))?;
                    let [w1, w3, w2] = expert(&h, cfg)?;
                    ops::q4_matvec_into(&up, &w1, &self.xn, &self.gate)?;
                    ops::q4_matvec_into(&up, &w3, &self.xn, &self.up)?;
                    ops::swiglu_into(&swiglu, &self.gate, &self.up, &self.act)?;
                    ops::q4_matvec_into(&down, &w2, &self.act, &self.down)?;
                    self.kernels.scaled_add(&mix, x, &self.down, p, next)?;
                    std::mem::swap(&mut x, &mut next);
                }
                layers.push(LayerStep {
                    router: logits,
                    chosen,
                    predicted: predicted_here,
                });
            }
            let h = self.hidden.rows(t..t + 1)?;
            let logits = self.logits.rows(t..t + 1)?;
            ops::rms_norm_into(&norm, x, &self.final_norm, EPS, &h)?;
            ops::q4_matvec_into(&lm_head, &self.lm_head, &h, &logits)?;
            ops::sample_into(&sample, &logits, &cfg.sampling, t as u64, &self.token)?;
            let output = self
                .token
                .read::<u32>()
                .context(&what("reading the sampled token"))?[0] as usize;
            if output >= cfg.vocab {
                return Err(Failure::new(what(&format!(
                    "the sampler returned token {output}, outside the vocabulary of {}",
                    cfg.vocab
                ))));
            }
            steps.push(Step {
                input: token,
                layers,
                output,
                time: started.elapsed(),
            });
            token = output;
        }
        Ok(steps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_by_logit_then_index_and_refuses_nan() {
        assert_eq!(top_k(&[0.5, 2.0, -1.0, 2.0], 2).unwrap(), [1, 3]);
        assert_eq!(top_k(&[0.5, 2.0, -1.0, 2.0], 3).unwrap(), [1, 3, 0]);
        assert!(top_k(&[0.5, f32::NAN], 1).unwrap_err().contains("logit 1"));
    }

    #[test]
    fn mix_weights_are_a_softmax_over_the_chosen() {
        let w = mix_weights(&[0.0, 1.0, 5.0, 1.0], &[1, 3]);
        assert_eq!(w, [0.5, 0.5]);
        let w = mix_weights(&[0.0, 2.0_f32.ln(), 9.0], &[1, 0]);
        assert!((w[0] - 2.0 / 3.0).abs() < 1e-7 && (w[1] - 1.0 / 3.0).abs() < 1e-7);
    }
}
