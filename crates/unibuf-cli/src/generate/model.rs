//! A Llama-architecture decoder on unibuf: the GGUF file's blocks read natively by the
//! kernels (nothing dequantised at load), a KV cache in growable buffers, prefill in chunks
//! through the GEMM path, and a decode step recorded once as a [`LaunchBatch`] (one CUDA graph
//! per token).
//!
//! ```text
//! decode step (batch 1), one submission:
//!   x      = embed(token)                                   Q8_0 rows read natively
//!   per layer:
//!     n    = rms_norm(x) * attn_norm                        one launch for the three products,
//!     q, cache[pos] = rope(Wq n), (rope(Wk n), Wv n)        RoPE and the KV append
//!     a    = attention(q, cache[0..=pos])                   split over the sequence when long
//!     x'   = x + Wo a                                       residual fused into the product
//!     h    = silu(Wg n) * (Wu n), n = rms_norm(x') * ffn_norm
//!     x    = x' + Wd h
//!   logits = Wemb rms_norm(x) * output_norm                 tied embedding as the LM head
//!   token  = argmax(logits)                                 greedy; sampling is a second launch
//!
//! prefill (chunks of tokens), per layer:
//!   dequantise each matrix once per chunk into a scratch buffer, then matmul_bt (cuBLAS on
//!   CUDA, the gemm crate on the CPU) for the chunk's rows; RoPE + cache append, causal
//!   attention over the cache, and the fused residual + norm between the products.
//! ```
//!
//! Positions live in a device buffer, not in the recorded launches, so that one recording
//! serves every position up to the cache length it was recorded for. The cache grows in steps
//! of [`CACHE_STEP`] tokens (memory mapped in place, the address unchanged), and the step is
//! recorded again after each growth, so a launch never reads past the view it was checked
//! against.

use super::config::LlamaConfig;
use crate::{Context, Failure};
use std::path::Path;
use unibuf::ops::{self, EmbeddingTable, GgmlMatrix, RopeStyle, Sampling};
use unibuf::weights::{LoadReport, LoadedWeights, Selection, WeightsFile};
use unibuf::{Buffer, DType, Device, GrowableBuffer, LaunchBatch, Queue, StorageMode};

/// Tokens the KV cache grows by at a time.
pub const CACHE_STEP: usize = 256;

/// One transformer block's weights (views of the loaded file) and its KV cache.
struct Layer {
    attn_norm: Buffer,
    q: GgmlMatrix,
    k: GgmlMatrix,
    v: GgmlMatrix,
    o: GgmlMatrix,
    ffn_norm: Buffer,
    gate: GgmlMatrix,
    up: GgmlMatrix,
    down: GgmlMatrix,
    /// `[rows, kv_heads, head_dim]` once reshaped; row `p` holds position `p`.
    k_cache: GrowableBuffer,
    v_cache: GrowableBuffer,
}

/// The decode step's buffers, allocated once: a recorded step reads and writes these.
struct StepBuffers {
    /// U32 `[1]`, Shared: the step's input token; a greedy step writes its output here too,
    /// which is the next step's input.
    token: Buffer,
    /// U32 `[1]`, device memory: the position of the step's token, uploaded before each step.
    position: Buffer,
    /// The residual stream, ping-ponged (a launch may not write what it reads).
    x: [Buffer; 2],
    /// `[1, heads, head_dim]`: the rotated query.
    q_rot: Buffer,
    /// `[1, heads, head_dim]`: the attention output.
    attn: Buffer,
    /// `[1, ffn]`: the SwiGLU activation.
    act: Buffer,
    /// `[1, vocab]` f32.
    logits: Buffer,
}

/// One launch of the decode step, on the queue it is given.
type Launch<'a> = dyn Fn(&Queue) -> unibuf::Result<unibuf::Fence> + 'a;

/// A recorded decode step and what it was recorded for.
struct RecordedStep {
    batch: LaunchBatch,
    /// The cache rows its attention launches were checked against.
    cache_rows: usize,
    /// Whether the argmax is part of the batch.
    greedy: bool,
}

/// The model on a device.
pub struct Llama {
    /// Its configuration.
    pub cfg: LlamaConfig,
    dev: Device,
    queue: Queue,
    embedding: EmbeddingTable,
    lm_head: GgmlMatrix,
    output_norm: Buffer,
    layers: Vec<Layer>,
    step: StepBuffers,
    recorded: Option<RecordedStep>,
    /// Positions the cache holds (0..len).
    len: usize,
    /// The KV cache's dtype.
    pub kv_dtype: DType,
    /// Whether a decode step is one recorded batch (else each launch is a submission).
    pub graph: bool,
    /// Keeps the weights' storage alive.
    _weights: LoadedWeights,
}

/// A GGUF block matrix of the loaded file.
fn matrix(file: &WeightsFile, w: &LoadedWeights, name: &str) -> Result<GgmlMatrix, Failure> {
    let info = file
        .tensor(name)
        .ok_or_else(|| Failure::new(format!("the file has no tensor '{name}'")))?;
    let buf = w
        .get(name)
        .ok_or_else(|| Failure::new(format!("tensor '{name}' was not loaded")))?;
    GgmlMatrix::from_tensor(info, buf.clone()).context(&format!("tensor '{name}'"))
}

/// An f32 vector tensor of `len` elements.
fn vector(w: &LoadedWeights, name: &str, len: usize) -> Result<Buffer, Failure> {
    let b = w
        .get(name)
        .ok_or_else(|| Failure::new(format!("the file has no tensor '{name}'")))?;
    if b.dtype() != DType::F32 || b.shape() != [len] {
        return Err(Failure::new(format!(
            "tensor '{name}' is {} {:?}: the model needs f32 [{len}]",
            b.dtype(),
            b.shape()
        )));
    }
    Ok(b.clone())
}

/// Checks a matrix's geometry against the configuration.
fn expect_geometry(name: &str, m: &GgmlMatrix, rows: usize, cols: usize) -> Result<(), Failure> {
    if m.rows() != rows || m.cols() != cols {
        return Err(Failure::new(format!(
            "tensor '{name}' is {} x {}: the configuration calls for {rows} x {cols}",
            m.rows(),
            m.cols()
        )));
    }
    Ok(())
}

impl Llama {
    /// Loads the model of the GGUF file at `path` onto `dev`, with a KV cache of `kv_dtype`.
    pub fn load(
        dev: &Device,
        path: &Path,
        kv_dtype: DType,
    ) -> Result<(Llama, LoadReport), Failure> {
        let file = WeightsFile::open(path).context(&format!("opening {}", path.display()))?;
        let header = file
            .gguf()
            .ok_or_else(|| Failure::new(format!("{} is not a GGUF file", path.display())))?;
        let cfg = LlamaConfig::from_gguf(header)?;
        let queue = dev.queue();
        let weights = file
            .load(dev, &queue, &Selection::All)
            .context("loading the weights")?;
        let report = weights.report().clone();
        let (h, kv) = (cfg.hidden, cfg.kv_width());
        let embed = matrix(&file, &weights, "token_embd.weight")?;
        expect_geometry("token_embd.weight", &embed, cfg.vocab, h)?;
        // Tied embeddings unless the file has its own output matrix.
        let lm_head = match file.tensor("output.weight") {
            Some(_) => matrix(&file, &weights, "output.weight")?,
            None => embed.clone(),
        };
        expect_geometry("output.weight", &lm_head, cfg.vocab, h)?;
        let capacity = cfg.context * kv;
        let mut layers = Vec::with_capacity(cfg.layers);
        for l in 0..cfg.layers {
            let name = |t: &str| format!("blk.{l}.{t}.weight");
            let m = |t: &str, rows: usize, cols: usize| -> Result<GgmlMatrix, Failure> {
                let m = matrix(&file, &weights, &name(t))?;
                expect_geometry(&name(t), &m, rows, cols)?;
                Ok(m)
            };
            let cache = |what: &str| {
                dev.alloc_growable(
                    &format!("kv cache {what} {l}"),
                    kv_dtype,
                    CACHE_STEP.min(cfg.context) * kv,
                    capacity,
                    StorageMode::Private,
                )
                .context("allocating the KV cache")
            };
            layers.push(Layer {
                attn_norm: vector(&weights, &name("attn_norm"), h)?,
                q: m("attn_q", h, h)?,
                k: m("attn_k", kv, h)?,
                v: m("attn_v", kv, h)?,
                o: m("attn_output", h, h)?,
                ffn_norm: vector(&weights, &name("ffn_norm"), h)?,
                gate: m("ffn_gate", cfg.ffn, h)?,
                up: m("ffn_up", cfg.ffn, h)?,
                down: m("ffn_down", h, cfg.ffn)?,
                k_cache: cache("k")?,
                v_cache: cache("v")?,
            });
        }
        let alloc = |label: &str, dtype: DType, shape: &[usize], mode: StorageMode| {
            dev.alloc_labelled(label, dtype, shape, mode)
                .context("allocating the decode buffers")
        };
        let f32_buf =
            |label: &str, shape: &[usize]| alloc(label, DType::F32, shape, StorageMode::Auto);
        let step = StepBuffers {
            token: alloc("token", DType::U32, &[1], StorageMode::Shared)?,
            position: alloc("position", DType::U32, &[1], StorageMode::Auto)?,
            x: [
                f32_buf("residual a", &[1, h])?,
                f32_buf("residual b", &[1, h])?,
            ],
            q_rot: f32_buf("q rotated", &[1, cfg.heads, cfg.head_dim])?,
            attn: f32_buf("attention", &[1, cfg.heads, cfg.head_dim])?,
            act: f32_buf("swiglu", &[1, cfg.ffn])?,
            logits: f32_buf("logits", &[1, cfg.vocab])?,
        };
        let output_norm = vector(&weights, "output_norm.weight", h)?;
        let model = Llama {
            embedding: EmbeddingTable::blocks(&embed),
            lm_head,
            output_norm,
            layers,
            step,
            recorded: None,
            len: 0,
            kv_dtype,
            graph: true,
            dev: dev.clone(),
            queue,
            cfg,
            _weights: weights,
        };
        Ok((model, report))
    }

    /// The queue the model's work runs on.
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// Forgets the sequence: the next prefill starts at position 0 (the cache's memory is
    /// kept and overwritten).
    pub fn reset(&mut self) {
        self.len = 0;
    }

    /// The logits of the last position run, `[1, vocab]` f32.
    pub fn logits(&self) -> &Buffer {
        &self.step.logits
    }

    /// Rows the caches hold now.
    fn cache_rows(&self) -> usize {
        self.layers[0].k_cache.len() / self.cfg.kv_width()
    }

    /// Grows every layer's cache to hold positions `0..needed`.
    fn reserve(&mut self, needed: usize) -> Result<(), Failure> {
        if needed > self.cfg.context {
            return Err(Failure::new(format!(
                "{needed} positions exceed the model's context of {}",
                self.cfg.context
            )));
        }
        if needed <= self.cache_rows() {
            return Ok(());
        }
        let rows = needed.div_ceil(CACHE_STEP) * CACHE_STEP;
        let elements = rows.min(self.cfg.context) * self.cfg.kv_width();
        for layer in &mut self.layers {
            layer
                .k_cache
                .grow(elements)
                .context("growing the KV cache")?;
            layer
                .v_cache
                .grow(elements)
                .context("growing the KV cache")?;
        }
        Ok(())
    }

    /// The caches of `layer` as `[rows, kv_heads, head_dim]`.
    fn caches(&self, layer: &Layer) -> Result<(Buffer, Buffer), Failure> {
        let shape = [self.cache_rows(), self.cfg.kv_heads, self.cfg.head_dim];
        let k = layer.k_cache.buffer().reshape(&shape)?;
        let v = layer.v_cache.buffer().reshape(&shape)?;
        Ok((k, v))
    }

    /// Runs `tokens` at positions `len..len + tokens.len()` in chunks of `chunk` rows through
    /// the GEMM path, leaving the last position's logits in [`Llama::logits`].
    pub fn prefill(&mut self, tokens: &[u32], chunk: usize) -> Result<(), Failure> {
        if tokens.is_empty() {
            return Err(Failure::new("the prompt has no tokens"));
        }
        self.reserve(self.len + tokens.len())?;
        for part in tokens.chunks(chunk.max(1)) {
            self.prefill_chunk(part)?;
        }
        Ok(())
    }

    fn prefill_chunk(&mut self, tokens: &[u32]) -> Result<(), Failure> {
        let q = self.queue.clone();
        let cfg = self.cfg.clone();
        let n = tokens.len();
        let start = u32::try_from(self.len).map_err(|_| Failure::new("position overflow"))?;
        let positions: Vec<u32> = (start..start + n as u32).collect();
        let ids = self.dev.from_slice("prompt ids", tokens, &[n])?;
        let pos = self.dev.from_slice("prompt positions", &positions, &[n])?;
        // One scratch for the dequantised matrices, the largest of them.
        let most = cfg.ffn.max(cfg.hidden) * cfg.hidden;
        let scratch = self.dev.alloc_labelled(
            "dequantised weights",
            DType::F32,
            &[most],
            StorageMode::Auto,
        )?;
        let dense = |m: &GgmlMatrix| -> Result<Buffer, Failure> {
            let w = scratch
                .slice(0..m.rows() * m.cols())?
                .reshape(&[m.rows(), m.cols()])?;
            ops::ggml_dequantize_into(&q, m, &w)?;
            Ok(w)
        };
        let linear = |x: &Buffer, m: &GgmlMatrix| -> Result<Buffer, Failure> {
            let w = dense(m)?;
            Ok(ops::matmul_bt(&q, x, &w)?)
        };
        let x0 = ops::embed_rows(&q, &self.embedding, &ids, DType::F32)?;
        let mut normed = ops::rms_norm(&q, &x0, &self.layers[0].attn_norm, cfg.eps)?;
        let mut x = x0;
        let (hd, heads, kvh) = (cfg.head_dim, cfg.heads, cfg.kv_heads);
        for l in 0..cfg.layers {
            let layer = &self.layers[l];
            let (kc, vc) = self.caches(layer)?;
            let qp = linear(&normed, &layer.q)?.reshape(&[n, heads, hd])?;
            let kp = linear(&normed, &layer.k)?.reshape(&[n, kvh, hd])?;
            let vp = linear(&normed, &layer.v)?.reshape(&[n, kvh, hd])?;
            let q_rot = self.dev.alloc_labelled(
                "q rotated",
                DType::F32,
                &[n, heads, hd],
                StorageMode::Auto,
            )?;
            ops::rope_kv_append_into(
                &q,
                &qp,
                &kp,
                &vp,
                &pos,
                cfg.rope_theta,
                RopeStyle::Interleaved,
                &q_rot,
                &kc,
                &vc,
            )?;
            let scale = 1.0 / (hd as f32).sqrt();
            let a = ops::attention(&q, &q_rot, &kc, &vc, &pos, scale)?.reshape(&[n, heads * hd])?;
            let o = linear(&a, &layer.o)?;
            let (n2, x2) = ops::rms_norm_residual(&q, &o, &x, &layer.ffn_norm, cfg.eps)?;
            let g = linear(&n2, &layer.gate)?;
            let u = linear(&n2, &layer.up)?;
            let act = ops::swiglu(&q, &g, &u)?;
            let d = linear(&act, &layer.down)?;
            let next_norm = match self.layers.get(l + 1) {
                Some(next) => &next.attn_norm,
                None => &self.output_norm,
            };
            (normed, x) = ops::rms_norm_residual(&q, &d, &x2, next_norm, cfg.eps)?;
        }
        // The LM head on the last row only: the logits of the other rows are never used.
        let last = normed.rows(n - 1..n)?;
        ops::ggml_matvec_into(&q, &self.lm_head, &last, &self.step.logits)?;
        self.len += n;
        Ok(())
    }

    /// Issues the decode step's launches, in order, to `issue`: into a [`LaunchBatch`] (see
    /// [`Llama::record`]) or straight onto the queue, one submission each (`--no-graph`, which
    /// shows every kernel's device time in the submission table).
    fn step_launches(
        &self,
        greedy: bool,
        issue: &mut dyn FnMut(&Launch<'_>) -> Result<(), Failure>,
    ) -> Result<(), Failure> {
        let cfg = &self.cfg;
        let s = &self.step;
        let (h, hd) = (cfg.hidden, cfg.head_dim);
        let attn_rows = s.attn.reshape(&[1, h])?;
        let scale = 1.0 / (hd as f32).sqrt();
        issue(&|q| ops::embed_rows_into(q, &self.embedding, &s.token, &s.x[0]))?;
        for layer in &self.layers {
            let (kc, vc) = self.caches(layer)?;
            issue(&|q| {
                ops::ggml_qkv_rope_append_into(
                    q,
                    &layer.q,
                    &layer.k,
                    &layer.v,
                    &s.x[0],
                    &layer.attn_norm,
                    cfg.eps,
                    &s.position,
                    cfg.rope_theta,
                    RopeStyle::Interleaved,
                    &s.q_rot,
                    &kc,
                    &vc,
                )
            })?;
            issue(&|q| ops::attention_into(q, &s.q_rot, &kc, &vc, &s.position, scale, &s.attn))?;
            issue(&|q| ops::ggml_matvec_add_into(q, &layer.o, &attn_rows, &s.x[0], &s.x[1]))?;
            issue(&|q| {
                ops::ggml_swiglu_norm_into(
                    q,
                    &layer.gate,
                    &layer.up,
                    &s.x[1],
                    &layer.ffn_norm,
                    cfg.eps,
                    &s.act,
                )
            })?;
            issue(&|q| ops::ggml_matvec_add_into(q, &layer.down, &s.act, &s.x[1], &s.x[0]))?;
        }
        issue(&|q| {
            ops::ggml_matvec_norm_into(
                q,
                &[&self.lm_head],
                &s.x[0],
                &self.output_norm,
                cfg.eps,
                &s.logits,
            )
        })?;
        if greedy {
            issue(&|q| ops::sample_into(q, &s.logits, &Sampling::greedy(), 0, &s.token))?;
        }
        Ok(())
    }

    /// Records the decode step for the cache's current length.
    fn record(&self, greedy: bool) -> Result<RecordedStep, Failure> {
        let mut batch = LaunchBatch::new(&self.dev, "decode step");
        self.step_launches(greedy, &mut |launch| Ok(batch.push_with(launch)?))?;
        Ok(RecordedStep {
            batch,
            cache_rows: self.cache_rows(),
            greedy,
        })
    }

    /// Runs one decode step on `token` at the next position and returns the token chosen by
    /// `sampling` (`step` counts the sampled tokens, for the random draws). The logits are left
    /// in [`Llama::logits`].
    pub fn decode(&mut self, token: u32, sampling: &Sampling, step: u64) -> Result<u32, Failure> {
        self.reserve(self.len + 1)?;
        let greedy = sampling.temperature == 0.0 || sampling.top_k == 1;
        let position = u32::try_from(self.len).map_err(|_| Failure::new("position overflow"))?;
        {
            let mut t = self.step.token.write::<u32>()?;
            t[0] = token;
        }
        self.queue.upload_async(&self.step.position, &[position])?;
        if self.graph {
            let stale = match &self.recorded {
                Some(r) => r.cache_rows != self.cache_rows() || r.greedy != greedy,
                None => true,
            };
            if stale {
                // The old recording's graph goes before the new one is made.
                self.recorded = None;
                let fresh = self.record(greedy)?;
                self.recorded = Some(fresh);
            }
            let Some(recorded) = self.recorded.as_ref() else {
                return Err(Failure::new("the decode step was not recorded"));
            };
            self.queue.launch_batch(&recorded.batch)?;
        } else {
            let q = self.queue.clone();
            self.step_launches(greedy, &mut |launch| Ok(launch(&q).map(drop)?))?;
        }
        if !greedy {
            ops::sample_into(
                &self.queue,
                &self.step.logits,
                sampling,
                step,
                &self.step.token,
            )?;
        }
        self.len += 1;
        let next = self.step.token.read::<u32>()?[0];
        Ok(next)
    }

    /// Runs a one-token prefill and a decode step, then forgets them: what a first call
    /// initialises (the BLAS library, the allocator's first blocks, the graph's first
    /// instantiation) is then done before anything is timed.
    pub fn warm_up(&mut self) -> Result<(), Failure> {
        self.reset();
        self.prefill(&[0], 1)?;
        self.decode(0, &Sampling::greedy(), 0)?;
        self.reset();
        Ok(())
    }

    /// Picks a token from the current logits (after a prefill) with `sampling`.
    pub fn sample(&self, sampling: &Sampling, step: u64) -> Result<u32, Failure> {
        ops::sample_into(
            &self.queue,
            &self.step.logits,
            sampling,
            step,
            &self.step.token,
        )?;
        Ok(self.step.token.read::<u32>()?[0])
    }
}
