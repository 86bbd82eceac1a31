//! The hyperparameters of a Llama-architecture GGUF file, read from its metadata
//! (`llama.*` keys) and checked against what the decoder supports.

use crate::Failure;
use unibuf::weights::gguf::GgufHeader;

/// A Llama model's shape, as its GGUF metadata gives it.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// Transformer blocks (`llama.block_count`).
    pub layers: usize,
    /// The residual stream's width (`llama.embedding_length`).
    pub hidden: usize,
    /// The SwiGLU inner width (`llama.feed_forward_length`).
    pub ffn: usize,
    /// Query heads (`llama.attention.head_count`).
    pub heads: usize,
    /// Key/value heads (`llama.attention.head_count_kv`; grouped-query attention when fewer).
    pub kv_heads: usize,
    /// `hidden / heads`.
    pub head_dim: usize,
    /// RoPE base frequency (`llama.rope.freq_base`, 10000 when absent).
    pub rope_theta: f32,
    /// RMSNorm epsilon (`llama.attention.layer_norm_rms_epsilon`).
    pub eps: f32,
    /// Tokens of the embedding table.
    pub vocab: usize,
    /// The context the model was trained for (`llama.context_length`): the KV cache's limit.
    pub context: usize,
}

impl LlamaConfig {
    /// Reads and checks the configuration. Errors name the key and its value.
    pub fn from_gguf(h: &GgufHeader) -> Result<LlamaConfig, Failure> {
        let arch = h.architecture()?;
        if arch != "llama" {
            return Err(Failure::new(format!(
                "general.architecture is '{arch}': unibuf generate runs the llama architecture"
            )));
        }
        let uint = |key: &str| -> Result<usize, Failure> {
            let v = h.get_uint(key)?;
            usize::try_from(v)
                .ok()
                .filter(|&v| v > 0)
                .ok_or_else(|| Failure::new(format!("{key} is {v}: need a positive size")))
        };
        let layers = uint("llama.block_count")?;
        let hidden = uint("llama.embedding_length")?;
        let ffn = uint("llama.feed_forward_length")?;
        let heads = uint("llama.attention.head_count")?;
        let kv_heads = uint("llama.attention.head_count_kv")?;
        let context = uint("llama.context_length")?;
        let eps = h.get_f32("llama.attention.layer_norm_rms_epsilon")?;
        let rope_theta = match h.get("llama.rope.freq_base") {
            Some(_) => h.get_f32("llama.rope.freq_base")?,
            None => 10_000.0,
        };
        let vocab = h
            .tensor("token_embd.weight")
            .map(|t| t.shape()[0])
            .ok_or_else(|| Failure::new("the file has no tensor 'token_embd.weight'"))?;
        if !hidden.is_multiple_of(heads) || !heads.is_multiple_of(kv_heads) {
            return Err(Failure::new(format!(
                "{hidden} hidden, {heads} heads, {kv_heads} kv heads: need heads to divide \
                 the hidden size and kv heads to divide the heads"
            )));
        }
        let head_dim = hidden / heads;
        if let Some(v) = h.get("llama.rope.dimension_count") {
            let rot = v.as_uint().unwrap_or(0);
            if rot != head_dim as u64 {
                return Err(Failure::new(format!(
                    "llama.rope.dimension_count is {rot} for head_dim {head_dim}: partial \
                     rotary embedding is not supported"
                )));
            }
        }
        if !(eps.is_finite() && eps > 0.0 && rope_theta.is_finite() && rope_theta > 0.0) {
            return Err(Failure::new(format!(
                "rms epsilon {eps}, rope base {rope_theta}: need both finite and positive"
            )));
        }
        Ok(LlamaConfig {
            layers,
            hidden,
            ffn,
            heads,
            kv_heads,
            head_dim,
            rope_theta,
            eps,
            vocab,
            context,
        })
    }

    /// Width of a layer's keys (and values): `kv_heads * head_dim`.
    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}
