//! A decode step of a one-layer transformer on random weights, with the fused ops, recorded
//! once as a `LaunchBatch` (one CUDA graph on CUDA) and replayed token by token.
//!
//! ```text
//! cargo run -p unibuf --example decode_step
//! UNIBUF_BACKEND=cuda cargo run --release -p unibuf --features cuda --example decode_step
//! ```
//!
//! The step: embedding row, RMSNorm, the q/k/v products (4-bit weights), RoPE with the KV
//! append, attention over the cache, the output product, the residual add fused with the final
//! norm, the LM head and the argmax on the device. Its inputs are device buffers (the token,
//! which the argmax overwrites with the next one, and the position), so one recording serves
//! every position until the KV cache (growable buffers: memory mapped as they grow) grows.
//! The example checks the batched run against the same ops submitted one by one.

use unibuf::ops::{self, EmbeddingTable, Q4Matrix, RopeStyle::Neox, Sampling};
use unibuf::{Buffer, DType, Device, Fence, GrowableBuffer, LaunchBatch, Queue, StorageMode};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const HIDDEN: usize = 256; // also heads x head_dim
const HEADS: usize = 4;
const KV_HEADS: usize = 2; // grouped-query attention: two query heads per kv head
const HEAD_DIM: usize = 64;
const VOCAB: usize = 512;
const KV: usize = KV_HEADS * HEAD_DIM; // cache values per position
const CACHE_STEP: usize = 16; // positions added each time the cache grows
const MAX_POSITIONS: usize = 256;
const TOKENS: usize = 40;
const EPS: f32 = 1e-5;

struct Model {
    embed: EmbeddingTable,
    norm: Buffer,
    qkv: [Q4Matrix; 3],
    o: Q4Matrix,
    out_norm: Buffer,
    lm_head: Q4Matrix,
}

/// One sequence: its KV cache, the step's inputs (token and position, U32 `[1]`) and its
/// activations: `[1, HIDDEN]` embedding, normed, attention, projection, residual sum, normed.
struct State {
    token: Buffer,
    pos: Buffer,
    kv: [GrowableBuffer; 2],
    x: [Buffer; 6],
    qkv: [Buffer; 3],
    q_rot: Buffer,
    logits: Buffer,
}

fn main() -> Result<()> {
    let dev = Device::new()?;
    let model = Model::random(&dev)?;
    dev.warm_all()?; // compile every kernel now rather than in the first step
    let q = dev.queue(); // unlabelled: the batch's label names its submissions
    let one_by_one = dev.queue().labelled("one by one");
    let (mut batched, mut reference) = (State::new(&dev)?, State::new(&dev)?);
    let mut recorded: Option<LaunchBatch> = None;
    let (mut tokens, mut expected) = (vec![], vec![]);
    for p in 0..TOKENS {
        // The cache must hold position p. Growing changes the views the batch recorded.
        if batched.reserve(p)? {
            recorded = None;
        }
        reference.reserve(p)?;
        let batch = match &mut recorded {
            Some(batch) => batch,
            None => {
                let mut batch = LaunchBatch::new(&dev, "decode step");
                step(&model, &batched, &mut |launch| batch.push_with(launch))?;
                recorded.insert(batch)
            }
        };
        q.upload_async(&batched.pos, &[p as u32])?;
        q.launch_batch(batch)?; // one submission
        tokens.push(batched.token.read::<u32>()?[0]); // waits for the step, reads in place

        one_by_one.upload(&reference.pos, &[p as u32])?;
        step(&model, &reference, &mut |launch| {
            launch(&one_by_one).map(drop)
        })?;
        expected.push(reference.token.read::<u32>()?[0]);
    }
    println!("generated {tokens:?}");
    let logits = q.download::<f32>(&batched.logits)?;
    let argmax = (0..VOCAB).fold(0, |best, i| if logits[i] > logits[best] { i } else { best });
    ensure(tokens[TOKENS - 1] as usize == argmax, "the argmax")?;
    ensure(
        tokens == expected,
        "the batch's tokens are the ops' one by one",
    )?;
    ensure(
        logits == q.download::<f32>(&reference.logits)?,
        "and so are its logits",
    )?;
    let stats = dev.submission_stats();
    let steps = stats.get("decode step").ok_or("no decode step")?;
    ensure(steps.count == TOKENS as u64, "one submission per token")?;
    let cache = &batched.kv[0];
    ensure(
        cache.len() == TOKENS.next_multiple_of(CACHE_STEP) * KV,
        "cache size",
    )?;
    let launches = recorded.as_ref().map_or(0, LaunchBatch::len);
    println!(
        "{TOKENS} steps of {launches} launches; KV cache of {} positions, its address kept \
         while growing: {}",
        cache.len() / KV,
        cache.address_stable()
    );
    print!("{stats}");
    println!("ok");
    Ok(())
}

/// The step's launches, handed one by one to `run`, which records or submits each.
type Launch<'a> = &'a dyn Fn(&Queue) -> unibuf::Result<Fence>;
fn step(m: &Model, s: &State, run: &mut dyn FnMut(Launch) -> unibuf::Result<()>) -> Result<()> {
    let rows = s.kv[0].len() / KV;
    let [kc, vc] = [0, 1].map(|i| s.kv[i].buffer().reshape(&[rows, KV_HEADS, HEAD_DIM]));
    let (kc, vc) = (kc?, vc?);
    let heads = |b: &Buffer, n| b.reshape(&[1, n, HEAD_DIM]);
    let (qh, kh, vh) = (
        heads(&s.qkv[0], HEADS)?,
        heads(&s.qkv[1], KV_HEADS)?,
        heads(&s.qkv[2], KV_HEADS)?,
    );
    let [embedded, normed, attended, projected, sum, final_normed] = &s.x;
    let attn = heads(attended, HEADS)?;
    let scale = 1.0 / (HEAD_DIM as f32).sqrt();
    run(&|q| ops::embed_rows_into(q, &m.embed, &s.token, embedded))?;
    run(&|q| ops::rms_norm_into(q, embedded, &m.norm, EPS, normed))?;
    for (w, y) in m.qkv.iter().zip(&s.qkv) {
        run(&|q| ops::q4_matvec_into(q, w, normed, y))?;
    }
    let rope = |q: &Queue| {
        ops::rope_kv_append_into(q, &qh, &kh, &vh, &s.pos, 1e4, Neox, &s.q_rot, &kc, &vc)
    };
    run(&rope)?;
    run(&|q| ops::attention_into(q, &s.q_rot, &kc, &vc, &s.pos, scale, &attn))?;
    run(&|q| ops::q4_matvec_into(q, &m.o, attended, projected))?;
    // The residual add and the final norm in one launch.
    let (w, eps) = (&m.out_norm, EPS);
    run(&|q| ops::rms_norm_residual_into(q, projected, embedded, w, eps, final_normed, sum))?;
    run(&|q| ops::q4_matvec_into(q, &m.lm_head, final_normed, &s.logits))?;
    // Greedy: the step of a random draw is a recorded scalar, so a sampled pick
    // (temperature, top-k, top-p) is an `ops::sample_into` after the batch.
    run(&|q| ops::sample_into(q, &s.logits, &Sampling::greedy(), 0, &s.token))?;
    Ok(())
}

impl Model {
    fn random(dev: &Device) -> Result<Model> {
        // Pseudo-random values in [-1, 1), different for each tensor (a multiplicative hash).
        let values = |n: usize, salt: u64| -> Vec<f32> {
            let hash = |i: u64| (i + (salt << 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
            (0..n as u64)
                .map(|i| hash(i) as f32 / (1 << 23) as f32 - 1.0)
                .collect()
        };
        let q4 = |rows: usize, cols: usize, salt| {
            Q4Matrix::quantize(dev, "weights", &values(rows * cols, salt), rows, cols, 32)
        };
        let embed = dev.from_slice("embed", &values(VOCAB * HIDDEN, 0), &[VOCAB, HIDDEN])?;
        let ones = vec![1.0f32; HIDDEN];
        Ok(Model {
            embed: EmbeddingTable::rows(embed)?,
            norm: dev.from_slice("norm", &ones, &[HIDDEN])?,
            qkv: [
                q4(HIDDEN, HIDDEN, 1)?,
                q4(KV, HIDDEN, 2)?,
                q4(KV, HIDDEN, 3)?,
            ],
            o: q4(HIDDEN, HIDDEN, 4)?,
            out_norm: dev.from_slice("out_norm", &ones, &[HIDDEN])?,
            lm_head: q4(VOCAB, HIDDEN, 5)?,
        })
    }
}

impl State {
    fn new(dev: &Device) -> Result<State> {
        let f32s = |cols: usize| dev.alloc(DType::F32, &[1, cols], StorageMode::Auto);
        let h = || f32s(HIDDEN);
        let (len, capacity) = (CACHE_STEP * KV, MAX_POSITIONS * KV); // reserved, mapped later
        let cache = || dev.alloc_growable("kv", DType::F32, len, capacity, StorageMode::Private);
        let token = dev.alloc_labelled("token", DType::U32, &[1], StorageMode::Shared)?;
        dev.queue().upload(&token, &[1u32])?; // the first input token
        Ok(State {
            token,
            pos: dev.alloc(DType::U32, &[1], StorageMode::Auto)?,
            kv: [cache()?, cache()?],
            x: [h()?, h()?, h()?, h()?, h()?, h()?],
            qkv: [h()?, f32s(KV)?, f32s(KV)?],
            q_rot: dev.alloc(DType::F32, &[1, HEADS, HEAD_DIM], StorageMode::Auto)?,
            logits: f32s(VOCAB)?,
        })
    }

    /// Grows the caches by CACHE_STEP positions if they do not reach `pos`; true if they grew.
    fn reserve(&mut self, pos: usize) -> Result<bool> {
        if (pos + 1) * KV <= self.kv[0].len() {
            return Ok(false);
        }
        for cache in &mut self.kv {
            cache.grow((pos + 1).next_multiple_of(CACHE_STEP) * KV)?;
        }
        Ok(true)
    }
}

/// Fails the example with `what` unless `ok`.
fn ensure(ok: bool, what: &str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(format!("wrong result: {what}").into())
    }
}
