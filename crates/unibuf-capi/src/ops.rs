//! The fused inference ops: one thin entry point per form of each op of `unibuf::ops`.
//!
//! Each op has two forms, as in Rust: `ub_op_X(queue, ..., &out)` takes a fresh output buffer
//! from the allocator (Shared on unified memory, Private on a discrete GPU) and returns its
//! handle; `ub_op_X_into(queue, ..., out, &fence)` writes a buffer the caller owns and returns
//! the submission's fence (`fence_out` optional: may be NULL). Both return once the work is
//! queued, not done: wait for the fence, or read the output with a transfer (which waits).
//! Arithmetic is in f32 whatever the storage dtype (f32, f16, bf16). Every shape, dtype and
//! scalar is checked before anything is queued: a wrong dtype is `UB_STATUS_DTYPE_MISMATCH`
//! (or `UB_STATUS_INVALID_ARGUMENT` for a non-float input), a wrong shape
//! `UB_STATUS_SHAPE_MISMATCH`, a bad scalar `UB_STATUS_INVALID_ARGUMENT`.
//!
//! Given the recording queue of a launch batch (`ub_launch_batch_queue`), an op is checked the
//! same way and its launches are appended to the batch instead of submitted (see
//! [`crate::batch`]); the GGUF block-matrix ops are in [`crate::ggml`].

use crate::buffer::{buffer, new_buffer_handle, ub_buffer};
use crate::call::{call, Out};
use crate::error::{CResult, Failure};
use crate::fence::{ub_fence, write_fence};
use crate::queue::{op_target, ub_queue, OpTarget};
use crate::types::{dtype_in, ub_dtype};
use unibuf::ops::{self, EmbeddingTable, RopeStyle, Sampling};
use unibuf::{Buffer, Fence, Queue};

use crate::error::ub_status;

/// Runs `op` on the queue `queue` names: submitted on a device queue, recorded into the batch
/// of a recording queue.
fn run<T>(queue: *mut ub_queue, op: impl FnOnce(&Queue) -> CResult<T>) -> CResult<T> {
    match op_target(queue)? {
        OpTarget::Submit(q) => op(&q),
        OpTarget::Record(batch) => batch.record(op),
    }
}

/// Runs an op that makes its output, and registers it in `*out`.
///
/// # Safety
/// `out` is valid for a write.
pub(crate) unsafe fn fresh(
    out: *mut *mut ub_buffer,
    queue: *mut ub_queue,
    op: impl FnOnce(&Queue) -> CResult<Buffer>,
) -> CResult<()> {
    // SAFETY: forwarded contract.
    let out = unsafe { Out::handle("out", out) }?;
    let b = run(queue, op)?;
    // SAFETY: checked by `Out::handle`.
    unsafe { out.write(new_buffer_handle(b)?) };
    Ok(())
}

/// Runs an op into the caller's output, and writes its fence to `*fence_out` if not NULL.
///
/// # Safety
/// `fence_out` is NULL or valid for a write.
pub(crate) unsafe fn into(
    fence_out: *mut ub_fence,
    queue: *mut ub_queue,
    op: impl FnOnce(&Queue) -> CResult<Fence>,
) -> CResult<()> {
    let fence = Out::optional("fence_out", fence_out)?;
    let f = run(queue, op)?;
    // SAFETY: checked by `Out::optional`; valid by the caller's contract.
    unsafe { write_fence(fence, f) };
    Ok(())
}

/// Refuses a recording queue for `op`, which runs as external work (the backend's BLAS) that a
/// launch batch cannot record.
fn not_recorded(op: &str, queue: *mut ub_queue) -> CResult<()> {
    match op_target(queue)? {
        OpTarget::Submit(_) => Ok(()),
        OpTarget::Record(batch) => Err(Failure::new(
            ub_status::UB_STATUS_UNSUPPORTED,
            format!(
                "{op} runs on the backend's BLAS as external work, which the launch batch '{}' \
                 cannot record: submit it on a queue of the device",
                batch.label()
            ),
        )),
    }
}

/// `a @ b` (`[m, k] @ [k, n]`, or a 1-D `a` of `[k]`; f32, f16 or bf16 of one dtype, f32
/// accumulation) through the backend's BLAS (gemm on the CPU, cuBLAS, MPS) into a fresh
/// `[m, n]` buffer. The BLAS call is external work, which a launch batch cannot record: on a
/// recording queue this (and `ub_op_matmul_bt`, and their `_into` forms) is
/// `UB_STATUS_UNSUPPORTED`.
///
/// # Safety
/// `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_op_matmul(
    queue: *mut ub_queue,
    a: *mut ub_buffer,
    b: *mut ub_buffer,
    out: *mut *mut ub_buffer,
) -> ub_status {
    call("ub_op_matmul", || {
        not_recorded("matmul", queue)?;
        // SAFETY: forwarded contract.
        unsafe {
            fresh(out, queue, |q| {
                Ok(ops::matmul(q, &*buffer("a", a)?, &*buffer("b", b)?)?)
            })
        }
    })
}

/// `ub_op_matmul` into `out` (the dtype of `a`, `[m, n]`; not overlapping the inputs).
///
/// # Safety
/// `fence_out` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_op_matmul_into(
    queue: *mut ub_queue,
    a: *mut ub_buffer,
    b: *mut ub_buffer,
    out: *mut ub_buffer,
    fence_out: *mut ub_fence,
) -> ub_status {
    call("ub_op_matmul_into", || {
        not_recorded("matmul", queue)?;
        // SAFETY: forwarded contract.
        unsafe {
            into(fence_out, queue, |q| {
                Ok(ops::matmul_into(
                    q,
                    &*buffer("a", a)?,
                    &*buffer("b", b)?,
                    &*buffer("out", out)?,
                )?)
            })
        }
    })
}

/// `a @ b^T` with `b` stored `[n, k]` (a linear layer's weight, as PyTorch keeps it) into a
/// fresh `[m, n]` buffer. Otherwise as `ub_op_matmul`.
///
/// # Safety
/// `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_op_matmul_bt(
    queue: *mut ub_queue,
    a: *mut ub_buffer,
    b: *mut ub_buffer,
    out: *mut *mut ub_buffer,
) -> ub_status {
    call("ub_op_matmul_bt", || {
        not_recorded("matmul_bt", queue)?;
        // SAFETY: forwarded contract.
        unsafe {
            fresh(out, queue, |q| {
                Ok(ops::matmul_bt(q, &*buffer("a", a)?, &*buffer("b", b)?)?)
            })
        }
    })
}

/// `ub_op_matmul_bt` into `out`.
///
/// # Safety
/// `fence_out` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_op_matmul_bt_into(
    queue: *mut ub_queue,
    a: *mut ub_buffer,
    b: *mut ub_buffer,
    out: *mut ub_buffer,
    fence_out: *mut ub_fence,
) -> ub_status {
    call("ub_op_matmul_bt_into", || {
        not_recorded("matmul_bt", queue)?;
        // SAFETY: forwarded contract.
        unsafe {
            into(fence_out, queue, |q| {
                Ok(ops::matmul_bt_into(
                    q,
                    &*buffer("a", a)?,
                    &*buffer("b", b)?,
                    &*buffer("out", out)?,
                )?)
            })
        }
    })
}

/// RMSNorm of each row of `x` (its last dimension) times `weight` (`[hidden]`):
/// `x / sqrt(mean(x^2) + eps) * weight`, into a fresh buffer of x's dtype and shape.
///
/// # Safety
/// `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_op_rms_norm(
    queue: *mut ub_queue,
    x: *mut ub_buffer,
    weight: *mut ub_buffer,
    eps: f32,
    out: *mut *mut ub_buffer,
) -> ub_status {
    call("ub_op_rms_norm", || {
        // SAFETY: forwarded contract.
        unsafe {
            fresh(out, queue, |q| {
                Ok(ops::rms_norm(
                    q,
                    &*buffer("x", x)?,
                    &*buffer("weight", weight)?,
                    eps,
                )?)
            })
        }
    })
}

/// `ub_op_rms_norm` into `out` (x's dtype and shape).
///
/// # Safety
/// `fence_out` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_op_rms_norm_into(
    queue: *mut ub_queue,
    x: *mut ub_buffer,
    weight: *mut ub_buffer,
    eps: f32,
    out: *mut ub_buffer,
    fence_out: *mut ub_fence,
) -> ub_status {
    call("ub_op_rms_norm_into", || {
        // SAFETY: forwarded contract.
        unsafe {
            into(fence_out, queue, |q| {
                Ok(ops::rms_norm_into(
                    q,
                    &*buffer("x", x)?,
                    &*buffer("weight", weight)?,
                    eps,
                    &*buffer("out", out)?,
                )?)
            })
        }
    })
}

/// The residual add fused with the norm after it: `sum_out = x + residual` (rounded to the
/// dtype) and `normed_out = rms_norm(sum_out, weight, eps)`, both of x's dtype and shape.
///
/// # Safety
/// `fence_out` is NULL or valid for a write.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn ub_op_rms_norm_residual_into(
    queue: *mut ub_queue,
    x: *mut ub_buffer,
    residual: *mut ub_buffer,
    weight: *mut ub_buffer,
    eps: f32,
    normed_out: *mut ub_buffer,
    sum_out: *mut ub_buffer,
    fence_out: *mut ub_fence,
) -> ub_status {
    call("ub_op_rms_norm_residual_into", || {
        // SAFETY: forwarded contract.
        unsafe {
            into(fence_out, queue, |q| {
                Ok(ops::rms_norm_residual_into(
                    q,
                    &*buffer("x", x)?,
                    &*buffer("residual", residual)?,
                    &*buffer("weight", weight)?,
                    eps,
                    &*buffer("normed_out", normed_out)?,
                    &*buffer("sum_out", sum_out)?,
                )?)
            })
        }
    })
}

/// Softmax of each row (the last dimension), computed stably in f32, into a fresh buffer.
///
/// # Safety
/// `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_op_softmax(
    queue: *mut ub_queue,
    x: *mut ub_buffer,
    out: *mut *mut ub_buffer,
) -> ub_status {
    call("ub_op_softmax", || {
        // SAFETY: forwarded contract.
        unsafe { fresh(out, queue, |q| Ok(ops::softmax(q, &*buffer("x", x)?)?)) }
    })
}

/// `ub_op_softmax` into `out` (x's dtype and shape).
///
/// # Safety
/// `fence_out` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_op_softmax_into(
    queue: *mut ub_queue,
    x: *mut ub_buffer,
    out: *mut ub_buffer,
    fence_out: *mut ub_fence,
) -> ub_status {
    call("ub_op_softmax_into", || {
        // SAFETY: forwarded contract.
        unsafe {
            into(fence_out, queue, |q| {
                Ok(ops::softmax_into(
                    q,
                    &*buffer("x", x)?,
                    &*buffer("out", out)?,
                )?)
            })
        }
    })
}

/// SwiGLU: `silu(gate) * up` elementwise (same dtype and shape), into a fresh buffer.
///
/// # Safety
/// `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_op_swiglu(
    queue: *mut ub_queue,
    gate: *mut ub_buffer,
    up: *mut ub_buffer,
    out: *mut *mut ub_buffer,
) -> ub_status {
    call("ub_op_swiglu", || {
        // SAFETY: forwarded contract.
        unsafe {
            fresh(out, queue, |q| {
                Ok(ops::swiglu(
                    q,
                    &*buffer("gate", gate)?,
                    &*buffer("up", up)?,
                )?)
            })
        }
    })
}

/// `ub_op_swiglu` into `out`.
///
/// # Safety
/// `fence_out` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_op_swiglu_into(
    queue: *mut ub_queue,
    gate: *mut ub_buffer,
    up: *mut ub_buffer,
    out: *mut ub_buffer,
    fence_out: *mut ub_fence,
) -> ub_status {
    call("ub_op_swiglu_into", || {
        // SAFETY: forwarded contract.
        unsafe {
            into(fence_out, queue, |q| {
                Ok(ops::swiglu_into(
                    q,
                    &*buffer("gate", gate)?,
                    &*buffer("up", up)?,
                    &*buffer("out", out)?,
                )?)
            })
        }
    })
}

/// Which elements of a head rotate together in RoPE: one of the `UB_ROPE_*` values.
pub type ub_rope_style = u32;
/// Rotate-half: pair `i` is `(i, i + head_dim / 2)` (GPT-NeoX, Llama).
pub const UB_ROPE_NEOX: ub_rope_style = 0;
/// Interleaved: pair `i` is `(2i, 2i + 1)` (GPT-J).
pub const UB_ROPE_INTERLEAVED: ub_rope_style = 1;

pub(crate) fn rope_style(v: ub_rope_style) -> CResult<RopeStyle> {
    match v {
        UB_ROPE_NEOX => Ok(RopeStyle::Neox),
        UB_ROPE_INTERLEAVED => Ok(RopeStyle::Interleaved),
        other => Err(Failure::invalid(
            "style",
            format!("{other} is not a ub_rope_style (UB_ROPE_NEOX = 0, UB_ROPE_INTERLEAVED = 1)"),
        )),
    }
}

/// Rotary embedding of `x` (`[tokens, heads, head_dim]`, `head_dim` even) at `positions`
/// (`UB_DTYPE_U32` `[tokens]`): pair `i` turns by `pos * theta_base^(-2i / head_dim)`. Into a
/// fresh buffer of x's dtype and shape.
///
/// # Safety
/// `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_op_rope(
    queue: *mut ub_queue,
    x: *mut ub_buffer,
    positions: *mut ub_buffer,
    theta_base: f32,
    style: ub_rope_style,
    out: *mut *mut ub_buffer,
) -> ub_status {
    call("ub_op_rope", || {
        let style = rope_style(style)?;
        // SAFETY: forwarded contract.
        unsafe {
            fresh(out, queue, |q| {
                Ok(ops::rope(
                    q,
                    &*buffer("x", x)?,
                    &*buffer("positions", positions)?,
                    theta_base,
                    style,
                )?)
            })
        }
    })
}

/// `ub_op_rope` into `out` (x's dtype and shape, not overlapping the inputs).
///
/// # Safety
/// `fence_out` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_op_rope_into(
    queue: *mut ub_queue,
    x: *mut ub_buffer,
    positions: *mut ub_buffer,
    theta_base: f32,
    style: ub_rope_style,
    out: *mut ub_buffer,
    fence_out: *mut ub_fence,
) -> ub_status {
    call("ub_op_rope_into", || {
        let style = rope_style(style)?;
        // SAFETY: forwarded contract.
        unsafe {
            into(fence_out, queue, |q| {
                Ok(ops::rope_into(
                    q,
                    &*buffer("x", x)?,
                    &*buffer("positions", positions)?,
                    theta_base,
                    style,
                    &*buffer("out", out)?,
                )?)
            })
        }
    })
}

/// How `ub_op_sample` picks a token from a row of logits.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ub_sampling {
    /// Divides the logits before the softmax; 0 picks the argmax (lowest id among equal
    /// maxima). Finite, not negative.
    pub temperature: f32,
    /// Keep the `top_k` largest logits; 0 keeps the kernel's maximum (1024).
    pub top_k: u32,
    /// Keep the shortest prefix of candidates whose probability reaches `top_p`, in (0, 1].
    pub top_p: f32,
    /// Seeds the counter-based draws: `(seed, step, row)` fixes the draw.
    pub seed: u64,
}

fn sampling_in(s: *const ub_sampling) -> CResult<Sampling> {
    if s.is_null() {
        return Err(Failure::null("sampling"));
    }
    if !s.is_aligned() {
        return Err(unibuf::Error::Misaligned {
            what: "sampling",
            value: s.addr(),
            align: std::mem::align_of::<ub_sampling>(),
        }
        .into());
    }
    // SAFETY: non-NULL and aligned (checked); the entry points' contract makes it point to an
    // initialised `ub_sampling` (plain numbers: every bit pattern is valid).
    let s = unsafe { s.read() };
    let s = Sampling {
        temperature: s.temperature,
        top_k: s.top_k,
        top_p: s.top_p,
        seed: s.seed,
    };
    s.validate()?;
    Ok(s)
}

/// Samples one token per row of `logits` (`[vocab]` or `[rows, vocab]`, f32, f16 or bf16) on
/// the device into a fresh `UB_DTYPE_U32` `[rows]` buffer; `step` (e.g. the position) selects
/// the draw together with the seed and the row.
///
/// # Safety
/// `sampling` points to an initialised `ub_sampling`; `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_op_sample(
    queue: *mut ub_queue,
    logits: *mut ub_buffer,
    sampling: *const ub_sampling,
    step: u64,
    out: *mut *mut ub_buffer,
) -> ub_status {
    call("ub_op_sample", || {
        let s = sampling_in(sampling)?;
        // SAFETY: forwarded contract.
        unsafe {
            fresh(out, queue, |q| {
                Ok(ops::sample(q, &*buffer("logits", logits)?, &s, step)?)
            })
        }
    })
}

/// `ub_op_sample` into `out` (`UB_DTYPE_U32` `[rows]`).
///
/// # Safety
/// `sampling` points to an initialised `ub_sampling`; `fence_out` is NULL or valid for a
/// write.
#[no_mangle]
pub unsafe extern "C" fn ub_op_sample_into(
    queue: *mut ub_queue,
    logits: *mut ub_buffer,
    sampling: *const ub_sampling,
    step: u64,
    out: *mut ub_buffer,
    fence_out: *mut ub_fence,
) -> ub_status {
    call("ub_op_sample_into", || {
        let s = sampling_in(sampling)?;
        // SAFETY: forwarded contract.
        unsafe {
            into(fence_out, queue, |q| {
                Ok(ops::sample_into(
                    q,
                    &*buffer("logits", logits)?,
                    &s,
                    step,
                    &*buffer("out", out)?,
                )?)
            })
        }
    })
}

/// The argmax of each row of `logits` (greedy decoding: the lowest id among equal maxima)
/// into a fresh `UB_DTYPE_U32` `[rows]` buffer: `ub_op_sample` at temperature 0.
///
/// # Safety
/// `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_op_argmax(
    queue: *mut ub_queue,
    logits: *mut ub_buffer,
    out: *mut *mut ub_buffer,
) -> ub_status {
    call("ub_op_argmax", || {
        // SAFETY: forwarded contract.
        unsafe {
            fresh(out, queue, |q| {
                Ok(ops::sample(
                    q,
                    &*buffer("logits", logits)?,
                    &Sampling::greedy(),
                    0,
                )?)
            })
        }
    })
}

/// The rows `ids` (`UB_DTYPE_U32` `[n]`) of the embedding table `table` (`[vocab, cols]` of
/// f32, f16 or bf16) as a fresh `[n, cols]` buffer of `dtype` (f32, f16 or bf16). An id past
/// the vocabulary gives a row of NaN (the ids are device data the kernel cannot refuse).
///
/// # Safety
/// `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_op_embed_rows(
    queue: *mut ub_queue,
    table: *mut ub_buffer,
    ids: *mut ub_buffer,
    dtype: ub_dtype,
    out: *mut *mut ub_buffer,
) -> ub_status {
    call("ub_op_embed_rows", || {
        let dtype = dtype_in("dtype", dtype)?;
        // SAFETY: forwarded contract.
        unsafe {
            fresh(out, queue, |q| {
                let t = EmbeddingTable::rows((*buffer("table", table)?).clone())?;
                Ok(ops::embed_rows(q, &t, &*buffer("ids", ids)?, dtype)?)
            })
        }
    })
}

/// `ub_op_embed_rows` into `out` (`[n, cols]` of f32, f16 or bf16).
///
/// # Safety
/// `fence_out` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_op_embed_rows_into(
    queue: *mut ub_queue,
    table: *mut ub_buffer,
    ids: *mut ub_buffer,
    out: *mut ub_buffer,
    fence_out: *mut ub_fence,
) -> ub_status {
    call("ub_op_embed_rows_into", || {
        // SAFETY: forwarded contract.
        unsafe {
            into(fence_out, queue, |q| {
                let t = EmbeddingTable::rows((*buffer("table", table)?).clone())?;
                Ok(ops::embed_rows_into(
                    q,
                    &t,
                    &*buffer("ids", ids)?,
                    &*buffer("out", out)?,
                )?)
            })
        }
    })
}

/// Grouped-query attention of `query` (`[tokens, heads, head_dim]`) over the KV caches
/// `k_cache` and `v_cache` (`[capacity, kv_heads, head_dim]`), causal by `positions`
/// (`UB_DTYPE_U32` `[tokens]`: token `t` attends to cache rows `0..=positions[t]`), scores
/// scaled by `scale` (usually `1/sqrt(head_dim)`). Into a fresh buffer of query's dtype and
/// shape.
///
/// # Safety
/// `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_op_attention(
    queue: *mut ub_queue,
    query: *mut ub_buffer,
    k_cache: *mut ub_buffer,
    v_cache: *mut ub_buffer,
    positions: *mut ub_buffer,
    scale: f32,
    out: *mut *mut ub_buffer,
) -> ub_status {
    call("ub_op_attention", || {
        // SAFETY: forwarded contract.
        unsafe {
            fresh(out, queue, |q| {
                Ok(ops::attention(
                    q,
                    &*buffer("query", query)?,
                    &*buffer("k_cache", k_cache)?,
                    &*buffer("v_cache", v_cache)?,
                    &*buffer("positions", positions)?,
                    scale,
                )?)
            })
        }
    })
}

/// `ub_op_attention` into `out` (query's dtype and shape, overlapping no input).
///
/// # Safety
/// `fence_out` is NULL or valid for a write.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn ub_op_attention_into(
    queue: *mut ub_queue,
    query: *mut ub_buffer,
    k_cache: *mut ub_buffer,
    v_cache: *mut ub_buffer,
    positions: *mut ub_buffer,
    scale: f32,
    out: *mut ub_buffer,
    fence_out: *mut ub_fence,
) -> ub_status {
    call("ub_op_attention_into", || {
        // SAFETY: forwarded contract.
        unsafe {
            into(fence_out, queue, |q| {
                Ok(ops::attention_into(
                    q,
                    &*buffer("query", query)?,
                    &*buffer("k_cache", k_cache)?,
                    &*buffer("v_cache", v_cache)?,
                    &*buffer("positions", positions)?,
                    scale,
                    &*buffer("out", out)?,
                )?)
            })
        }
    })
}

/// RoPE fused with the KV-cache append: `query_out[t] = rope(query[t], positions[t])`,
/// `k_cache[positions[t]] = rope(key[t], positions[t])`, `v_cache[positions[t]] = value[t]`
/// (`query` `[tokens, heads, head_dim]`, `key` and `value` `[tokens, kv_heads, head_dim]`, the
/// caches `[capacity, kv_heads, head_dim]`; `head_dim` even and at most 256).
///
/// # Safety
/// `fence_out` is NULL or valid for a write.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn ub_op_rope_kv_append_into(
    queue: *mut ub_queue,
    query: *mut ub_buffer,
    key: *mut ub_buffer,
    value: *mut ub_buffer,
    positions: *mut ub_buffer,
    theta_base: f32,
    style: ub_rope_style,
    query_out: *mut ub_buffer,
    k_cache: *mut ub_buffer,
    v_cache: *mut ub_buffer,
    fence_out: *mut ub_fence,
) -> ub_status {
    call("ub_op_rope_kv_append_into", || {
        let style = rope_style(style)?;
        // SAFETY: forwarded contract.
        unsafe {
            into(fence_out, queue, |q| {
                Ok(ops::rope_kv_append_into(
                    q,
                    &*buffer("query", query)?,
                    &*buffer("key", key)?,
                    &*buffer("value", value)?,
                    &*buffer("positions", positions)?,
                    theta_base,
                    style,
                    &*buffer("query_out", query_out)?,
                    &*buffer("k_cache", k_cache)?,
                    &*buffer("v_cache", v_cache)?,
                )?)
            })
        }
    })
}
