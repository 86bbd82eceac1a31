//! A Llama-architecture GGUF model decoding on unibuf, in one file: the loop an engine runs.
//!
//! ```text
//! cargo run --release --example llama_gguf -- MODEL.gguf [TOKEN_IDS] [NEW_TOKENS]
//! cargo run --release --example llama_gguf -- SmolLM2-135M-Instruct.Q4_1.gguf 504,3575,282,4649,314 24
//! UNIBUF_BACKEND=cuda cargo run --release --features cuda --example llama_gguf -- ...
//! ```
//!
//! It loads the file's tensors as they are (Q4_1 / Q8_0 blocks, read natively by the kernels),
//! keeps a KV cache in growable buffers, prefills the prompt in one chunk through the GEMM path
//! (each matrix dequantised into scratch, then `matmul_bt`), and records the decode step once as
//! a `LaunchBatch` — one CUDA graph per token — re-recording it only when the cache grows. The
//! token ids go in and come out as numbers and as the vocabulary's byte-level pieces; the
//! `unibuf generate` command adds the tokenizer, the chat template, sampling and reports.

use std::error::Error;
use unibuf::ops::{self, EmbeddingTable, GgmlMatrix, RopeStyle, Sampling};
use unibuf::weights::{LoadedWeights, Selection, WeightsFile};
use unibuf::{Buffer, DType, Device, GrowableBuffer, LaunchBatch, StorageMode};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// Cache rows added at a time.
const CACHE_STEP: usize = 256;

struct Dims {
    layers: usize,
    hidden: usize,
    ffn: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    theta: f32,
    eps: f32,
    context: usize,
}

struct Block {
    attn_norm: Buffer,
    qkv: [GgmlMatrix; 3],
    o: GgmlMatrix,
    ffn_norm: Buffer,
    gate: GgmlMatrix,
    up: GgmlMatrix,
    down: GgmlMatrix,
    k_cache: GrowableBuffer,
    v_cache: GrowableBuffer,
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or("usage: llama_gguf MODEL.gguf [TOKEN_IDS] [NEW_TOKENS]")?;
    let prompt: Vec<u32> = match args.next() {
        Some(ids) => ids
            .split(',')
            .map(str::parse)
            .collect::<std::result::Result<_, _>>()?,
        None => vec![504, 3575, 282, 4649, 314], // "The capital of France is" in SmolLM2's vocabulary
    };
    let new_tokens: usize = args.next().map_or(Ok(24), |n| n.parse())?;

    // The device from $UNIBUF_BACKEND (else the best found), the file's tensors on it.
    let dev = Device::new()?;
    let q = dev.queue();
    let file = WeightsFile::open(&path)?;
    let gguf = file.gguf().ok_or("not a GGUF file")?;
    let uint = |k: &str| gguf.get_uint(k).map(|v| v as usize);
    let (hidden, heads) = (
        uint("llama.embedding_length")?,
        uint("llama.attention.head_count")?,
    );
    let d = Dims {
        layers: uint("llama.block_count")?,
        hidden,
        ffn: uint("llama.feed_forward_length")?,
        heads,
        kv_heads: uint("llama.attention.head_count_kv")?,
        head_dim: hidden / heads,
        theta: gguf.get_f32("llama.rope.freq_base")?,
        eps: gguf.get_f32("llama.attention.layer_norm_rms_epsilon")?,
        context: uint("llama.context_length")?,
    };
    let vocab: Vec<String> = gguf.get_strings("tokenizer.ggml.tokens")?.to_vec();
    let weights: LoadedWeights = file.load(&dev, &q, &Selection::All)?;
    let tensor = |name: &str| {
        weights
            .get(name)
            .cloned()
            .ok_or(format!("no tensor {name}"))
    };
    let matrix = |name: &str| -> Result<GgmlMatrix> {
        let info = file.tensor(name).ok_or(format!("no tensor {name}"))?;
        Ok(GgmlMatrix::from_tensor(info, tensor(name)?)?)
    };
    let kv_width = d.kv_heads * d.head_dim;
    let mut blocks = Vec::new();
    for l in 0..d.layers {
        let m = |t: &str| matrix(&format!("blk.{l}.{t}.weight"));
        let cache = || {
            dev.alloc_growable(
                "kv",
                DType::F16,
                CACHE_STEP * kv_width,
                d.context * kv_width,
                StorageMode::Private,
            )
        };
        blocks.push(Block {
            attn_norm: tensor(&format!("blk.{l}.attn_norm.weight"))?,
            qkv: [m("attn_q")?, m("attn_k")?, m("attn_v")?],
            o: m("attn_output")?,
            ffn_norm: tensor(&format!("blk.{l}.ffn_norm.weight"))?,
            gate: m("ffn_gate")?,
            up: m("ffn_up")?,
            down: m("ffn_down")?,
            k_cache: cache()?,
            v_cache: cache()?,
        });
    }
    let embed = matrix("token_embd.weight")?; // tied: also the LM head
    let table = EmbeddingTable::blocks(&embed);
    let out_norm = tensor("output_norm.weight")?;
    dev.warm_all()?; // compile every kernel now, not inside the timed loop

    // Prefill: the whole prompt as one chunk through the GEMM path.
    let n = prompt.len();
    let positions: Vec<u32> = (0..n as u32).collect();
    let pos = dev.from_slice("positions", &positions, &[n])?;
    let ids = dev.from_slice("prompt", &prompt, &[n])?;
    let scratch = dev.alloc(
        DType::F32,
        &[d.hidden * d.ffn.max(d.hidden)],
        StorageMode::Auto,
    )?;
    let linear = |x: &Buffer, m: &GgmlMatrix| -> Result<Buffer> {
        let w = scratch
            .slice(0..m.rows() * m.cols())?
            .reshape(&[m.rows(), m.cols()])?;
        ops::ggml_dequantize_into(&q, m, &w)?;
        Ok(ops::matmul_bt(&q, x, &w)?)
    };
    let mut x = ops::embed_rows(&q, &table, &ids, DType::F32)?;
    let mut normed = ops::rms_norm(&q, &x, &blocks[0].attn_norm, d.eps)?;
    let scale = 1.0 / (d.head_dim as f32).sqrt();
    for (l, b) in blocks.iter().enumerate() {
        let (kc, vc) = caches(b, &d)?;
        let shape = |h: usize| [n, h, d.head_dim];
        let qp = linear(&normed, &b.qkv[0])?.reshape(&shape(d.heads))?;
        let kp = linear(&normed, &b.qkv[1])?.reshape(&shape(d.kv_heads))?;
        let vp = linear(&normed, &b.qkv[2])?.reshape(&shape(d.kv_heads))?;
        let qr = dev.alloc(DType::F32, &shape(d.heads), StorageMode::Auto)?;
        // GGUF stores Llama's q and k rows permuted for the interleaved rotary layout.
        ops::rope_kv_append_into(
            &q,
            &qp,
            &kp,
            &vp,
            &pos,
            d.theta,
            RopeStyle::Interleaved,
            &qr,
            &kc,
            &vc,
        )?;
        let a = ops::attention(&q, &qr, &kc, &vc, &pos, scale)?.reshape(&[n, d.hidden])?;
        let (n2, x2) = ops::rms_norm_residual(&q, &linear(&a, &b.o)?, &x, &b.ffn_norm, d.eps)?;
        let act = ops::swiglu(&q, &linear(&n2, &b.gate)?, &linear(&n2, &b.up)?)?;
        let next = blocks.get(l + 1).map_or(&out_norm, |b| &b.attn_norm);
        (normed, x) = ops::rms_norm_residual(&q, &linear(&act, &b.down)?, &x2, next, d.eps)?;
    }
    let logits = ops::ggml_matvec(&q, &embed, &normed.rows(n - 1..n)?)?;
    let token = dev.alloc_labelled("token", DType::U32, &[1], StorageMode::Shared)?;
    ops::sample_into(&q, &logits, &Sampling::greedy(), 0, &token)?;

    // Decode: one recorded step per token. Its inputs are device buffers (the token, which
    // the step's argmax overwrites with the next one, and the position), so one recording
    // serves every position its cache views cover; it is recorded again when the cache grows.
    let s = Step::new(&dev, &d, embed.rows())?;
    let mut generated = vec![token.read::<u32>()?[0]];
    let mut recorded: Option<(usize, LaunchBatch)> = None;
    let started = std::time::Instant::now();
    for p in n..n + new_tokens.saturating_sub(1) {
        if (p + 1) * kv_width > blocks[0].k_cache.len() {
            let rows = (p + 1).next_multiple_of(CACHE_STEP).min(d.context);
            for b in &mut blocks {
                b.k_cache.grow(rows * kv_width)?;
                b.v_cache.grow(rows * kv_width)?;
            }
        }
        let rows = blocks[0].k_cache.len() / kv_width;
        if recorded.as_ref().is_none_or(|(r, _)| *r != rows) {
            drop(recorded.take()); // the old graph goes first
            recorded = Some((
                rows,
                s.record(&dev, &d, &blocks, &table, &embed, &out_norm, &token)?,
            ));
        }
        q.upload_async(&s.position, &[p as u32])?;
        if let Some((_, batch)) = &recorded {
            q.launch_batch(batch)?;
        }
        generated.push(token.read::<u32>()?[0]); // waits for the step
    }
    let per_s = (generated.len() - 1) as f64 / started.elapsed().as_secs_f64();
    let text: String = generated
        .iter()
        .map(|&t| piece(&vocab[t as usize]))
        .collect();
    println!(
        "prompt {prompt:?}\ngenerated {generated:?}\ntext {text:?}\ndecode {per_s:.1} tokens/s"
    );
    Ok(())
}

/// Layer `b`'s caches as `[rows, kv_heads, head_dim]`.
fn caches(b: &Block, d: &Dims) -> Result<(Buffer, Buffer)> {
    let rows = b.k_cache.len() / (d.kv_heads * d.head_dim);
    let shape = [rows, d.kv_heads, d.head_dim];
    Ok((
        b.k_cache.buffer().reshape(&shape)?,
        b.v_cache.buffer().reshape(&shape)?,
    ))
}

/// The decode step's own buffers (batch 1).
struct Step {
    position: Buffer,
    x: [Buffer; 2],
    q_rot: Buffer,
    attn: Buffer,
    act: Buffer,
    logits: Buffer,
}

impl Step {
    fn new(dev: &Device, d: &Dims, vocab: usize) -> Result<Step> {
        let f32s = |shape: &[usize]| dev.alloc(DType::F32, shape, StorageMode::Auto);
        Ok(Step {
            position: dev.alloc(DType::U32, &[1], StorageMode::Auto)?,
            x: [f32s(&[1, d.hidden])?, f32s(&[1, d.hidden])?],
            q_rot: f32s(&[1, d.heads, d.head_dim])?,
            attn: f32s(&[1, d.heads, d.head_dim])?,
            act: f32s(&[1, d.ffn])?,
            logits: f32s(&[1, vocab])?,
        })
    }

    /// Records one token's forward pass and its argmax into `token`: five launches per layer,
    /// each with its input norm, RoPE and KV append, or residual add fused in.
    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        dev: &Device,
        d: &Dims,
        blocks: &[Block],
        table: &EmbeddingTable,
        lm_head: &GgmlMatrix,
        out_norm: &Buffer,
        token: &Buffer,
    ) -> Result<LaunchBatch> {
        let (h, hd) = (d.hidden, d.head_dim);
        let attn = self.attn.reshape(&[1, h])?;
        let scale = 1.0 / (hd as f32).sqrt();
        let (x, s) = (&self.x, self);
        let mut step = LaunchBatch::new(dev, "decode step");
        step.push_with(|q| ops::embed_rows_into(q, table, token, &x[0]))?;
        for b in blocks {
            let (kc, vc) = caches(b, d)?;
            let [wq, wk, wv] = &b.qkv;
            step.push_with(|q| {
                let (theta, style) = (d.theta, RopeStyle::Interleaved);
                ops::ggml_qkv_rope_append_into(
                    q,
                    wq,
                    wk,
                    wv,
                    &x[0],
                    &b.attn_norm,
                    d.eps,
                    &s.position,
                    theta,
                    style,
                    &s.q_rot,
                    &kc,
                    &vc,
                )
            })?;
            step.push_with(|q| {
                ops::attention_into(q, &s.q_rot, &kc, &vc, &s.position, scale, &s.attn)
            })?;
            step.push_with(|q| ops::ggml_matvec_add_into(q, &b.o, &attn, &x[0], &x[1]))?;
            step.push_with(|q| {
                ops::ggml_swiglu_norm_into(q, &b.gate, &b.up, &x[1], &b.ffn_norm, d.eps, &s.act)
            })?;
            step.push_with(|q| ops::ggml_matvec_add_into(q, &b.down, &s.act, &x[1], &x[0]))?;
        }
        step.push_with(|q| {
            ops::ggml_matvec_norm_into(q, &[lm_head], &x[0], out_norm, d.eps, &s.logits)
        })?;
        step.push_with(|q| ops::sample_into(q, &s.logits, &Sampling::greedy(), 0, token))?;
        Ok(step)
    }
}

/// A vocabulary entry as text: GPT-2's byte-level alphabet maps bytes that are not printable
/// to U+0100.. (`Ġ` is a space, `Ċ` a newline); this undoes that for display.
fn piece(token: &str) -> String {
    let bytes: Vec<u8> = token
        .chars()
        .map(|c| match c as u32 {
            0x100..=0x120 => (c as u32 - 0x100) as u8, // 0x00..=0x20
            0x121..=0x142 => (c as u32 - 0x121 + 0x7f) as u8, // 0x7f..=0xa0
            0x143 => 0xad,
            b => b as u8,
        })
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}
