//! GGUF block matrices and the ops over them: the matrix-vector products of a Llama decoder
//! step read in the file's own block format (Q8_0, Q4_0, Q4_1), the fused forms (input norm,
//! residual add, SwiGLU, QKV with RoPE and the KV append), the dequantisation for a prefill
//! GEMM, and embedding rows from a block table.
//!
//! A `ub_ggml_matrix` is a `unibuf::ops::GgmlMatrix`: a view of the blocks (a `UB_DTYPE_U8`
//! buffer `[rows, bytes per row]`, as a GGUF load gives it) with its format and geometry,
//! checked once when it is made. It keeps its bytes alive. The ops follow `ub_op_*`'s pattern
//! ([`crate::ops`]): a fresh form and an `_into` form, checked before anything is queued, and
//! recorded instead of submitted on a launch batch's recording queue.
//!
//! | format | block of 32 weights | weight `j` |
//! |---|---|---|
//! | Q8_0 | `f16 d`, `i8 q[32]` (34 bytes) | `d * q[j]` |
//! | Q4_0 | `f16 d`, `u8 qs[16]` (18 bytes) | `d * (nibble(j) - 8)` |
//! | Q4_1 | `f16 d`, `f16 m`, `u8 qs[16]` (20 bytes) | `d * nibble(j) + m` |
//!
//! `nibble(j)` is the low nibble of `qs[j]` for `j < 16` and the high nibble of `qs[j - 16]`
//! otherwise; the f16 values are little-endian.

use crate::buffer::{buffer, new_buffer_handle, ub_buffer};
use crate::call::{array_in, call, str_in, Out};
use crate::error::{ub_status, CResult, Failure};
use crate::fence::ub_fence;
use crate::handle::{from_ptr, to_ptr, Kind, Registry};
use crate::ops::{fresh, into, rope_style, ub_rope_style};
use crate::queue::ub_queue;
use crate::types::{dtype_in, ub_dtype};
use crate::weights::{ub_weights, weights};
use std::ffi::c_char;
use std::sync::Arc;
use unibuf::ops::{self, EmbeddingTable, GgmlMatrix};
use unibuf::weights::gguf::GgmlType;

/// A GGUF block format, as the file's type code: one of the `UB_GGML_TYPE_*` values.
pub type ub_ggml_type = u32;
/// Q4_0: blocks of 32 weights, an f16 scale and 16 bytes of 4-bit codes offset by 8.
pub const UB_GGML_TYPE_Q4_0: ub_ggml_type = 2;
/// Q4_1: blocks of 32 weights, an f16 scale, an f16 minimum and 16 bytes of 4-bit codes.
pub const UB_GGML_TYPE_Q4_1: ub_ggml_type = 3;
/// Q8_0: blocks of 32 weights, an f16 scale and 32 signed bytes.
pub const UB_GGML_TYPE_Q8_0: ub_ggml_type = 8;

/// The most matrices `ub_op_ggml_matvec_norm` stacks in one launch (Q, K and V).
pub const UB_GGML_MAX_STACKED: usize = 3;
/// The most rows of `x` (tokens) one product takes.
pub const UB_GGML_MAX_BATCH: usize = 8;

// The header's limits are the library's.
const _: () = assert!(UB_GGML_MAX_STACKED == ops::GGML_MAX_STACKED);
const _: () = assert!(UB_GGML_MAX_BATCH == ops::GGML_MAX_BATCH);

/// The format of a C value: any GGUF type code is a format (those without kernels are refused
/// by the matrix with `UB_STATUS_UNSUPPORTED`); other values are invalid.
fn ggml_type_in(v: ub_ggml_type) -> CResult<GgmlType> {
    GgmlType::from_code(v).ok_or_else(|| {
        Failure::invalid(
            "ggml_type",
            format!(
                "{v} is not a GGUF type code (UB_GGML_TYPE_Q4_0 = 2, UB_GGML_TYPE_Q4_1 = 3, \
                 UB_GGML_TYPE_Q8_0 = 8)"
            ),
        )
    })
}

/// A `rows x cols` matrix in a GGUF block format (Q8_0, Q4_0 or Q4_1), over a buffer of its
/// blocks. Opaque; release with `ub_ggml_matrix_release` (the blocks' buffer stays valid).
pub struct ub_ggml_matrix {
    _opaque: [u8; 0],
}

static MATRICES: Registry<GgmlMatrix> = Registry::new(Kind::GgmlMatrix);

/// The matrix named by `m`; `what` names the argument in errors.
fn matrix(what: &str, m: *mut ub_ggml_matrix) -> CResult<Arc<GgmlMatrix>> {
    MATRICES.get(what, from_ptr(m))
}

/// Live matrices (for the handle counts).
pub(crate) fn live_matrices() -> usize {
    MATRICES.live()
}

/// Registers `m` into the checked out-pointer `out`.
///
/// # Safety
/// As [`Out::write`].
unsafe fn write_matrix(out: Out<*mut ub_ggml_matrix>, m: GgmlMatrix) -> CResult<()> {
    let h = MATRICES.insert(m)?;
    // SAFETY: forwarded contract.
    unsafe { out.write(to_ptr(h)) };
    Ok(())
}

/// A matrix of `rows` x `cols` weights in `ggml_type` over `bytes`: a `UB_DTYPE_U8` buffer of
/// shape `[rows, cols / 32 * block bytes]` (a view at any offset), the blocks of each row one
/// after the other as a GGUF file stores them.
///
/// Errors: `UB_STATUS_INVALID_ARGUMENT` for a value that is no GGUF type code, or `rows` 0 or
/// `cols` not a non-zero multiple of 32; `UB_STATUS_UNSUPPORTED` for a format other than Q8_0,
/// Q4_0 and Q4_1; `UB_STATUS_DTYPE_MISMATCH` for bytes that are not `UB_DTYPE_U8`;
/// `UB_STATUS_SHAPE_MISMATCH` for bytes of another shape.
///
/// # Safety
/// `matrix_out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_ggml_matrix_new(
    bytes: *mut ub_buffer,
    ggml_type: ub_ggml_type,
    rows: usize,
    cols: usize,
    matrix_out: *mut *mut ub_ggml_matrix,
) -> ub_status {
    call("ub_ggml_matrix_new", || {
        // SAFETY: the caller's contract.
        let out = unsafe { Out::handle("matrix_out", matrix_out) }?;
        let t = ggml_type_in(ggml_type)?;
        let b = (*buffer("bytes", bytes)?).clone();
        let m = GgmlMatrix::new(b, t, rows, cols)?;
        // SAFETY: checked by `Out::handle`.
        unsafe { write_matrix(out, m) }
    })
}

/// The matrix of the GGUF tensor `name` of `weights`, over `tensor`, the buffer a load of
/// that file gave for it (`ub_loaded_weights_get`, `ub_weights_get_tensor`): its format and
/// shape are the file's (the rows are its outer dimensions, flattened; the cols its innermost).
///
/// Errors: `UB_STATUS_INVALID_ARGUMENT` for a name the file lacks; `UB_STATUS_UNSUPPORTED` for
/// a tensor in another format than Q8_0, Q4_0 or Q4_1 (a safetensors tensor too);
/// `UB_STATUS_SHAPE_MISMATCH` or `UB_STATUS_DTYPE_MISMATCH` for a buffer that is not that
/// tensor's bytes.
///
/// # Safety
/// `name` is a NUL-terminated string; `matrix_out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_ggml_matrix_from_tensor(
    weights: *mut ub_weights,
    name: *const c_char,
    tensor: *mut ub_buffer,
    matrix_out: *mut *mut ub_ggml_matrix,
) -> ub_status {
    call("ub_ggml_matrix_from_tensor", || {
        // SAFETY: the caller's contract.
        let out = unsafe { Out::handle("matrix_out", matrix_out) }?;
        // SAFETY: the caller's contract.
        let name = unsafe { str_in("name", name) }?;
        let w = self::weights(weights)?;
        let info = w.file.tensor(name).ok_or_else(|| {
            Failure::invalid(
                "name",
                format!(
                    "{} has no tensor '{name}' ({} tensors)",
                    w.file.path().display(),
                    w.file.tensors().len()
                ),
            )
        })?;
        let m = GgmlMatrix::from_tensor(info, (*buffer("tensor", tensor)?).clone())?;
        // SAFETY: checked by `Out::handle`.
        unsafe { write_matrix(out, m) }
    })
}

/// Releases a matrix handle (its bytes' buffer, and work queued with it, stay valid). NULL is
/// a no-op; releasing twice is `UB_STATUS_INVALID_HANDLE`.
#[no_mangle]
pub extern "C" fn ub_ggml_matrix_release(matrix: *mut ub_ggml_matrix) -> ub_status {
    call("ub_ggml_matrix_release", || {
        MATRICES.release(from_ptr(matrix))
    })
}

/// What a matrix is. Filled by `ub_ggml_matrix_get_info`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ub_ggml_matrix_info {
    /// The block format (`UB_GGML_TYPE_*`).
    pub ggml_type: ub_ggml_type,
    /// Rows (outputs of a product).
    pub rows: usize,
    /// Weights per row (inputs of a product), a multiple of 32.
    pub cols: usize,
    /// Bytes per row: `cols / 32` blocks.
    pub row_bytes: usize,
}

/// Describes `matrix` into `*info_out`.
///
/// # Safety
/// `info_out` is valid for a write of `ub_ggml_matrix_info`.
#[no_mangle]
pub unsafe extern "C" fn ub_ggml_matrix_get_info(
    matrix: *mut ub_ggml_matrix,
    info_out: *mut ub_ggml_matrix_info,
) -> ub_status {
    call("ub_ggml_matrix_get_info", || {
        let out = Out::new("info_out", info_out)?;
        let m = self::matrix("matrix", matrix)?;
        let info = ub_ggml_matrix_info {
            ggml_type: m.ggml_type().code(),
            rows: m.rows(),
            cols: m.cols(),
            row_bytes: m.bytes().shape().get(1).copied().unwrap_or(0),
        };
        // SAFETY: checked; valid by the caller's contract.
        unsafe { out.write(info) };
        Ok(())
    })
}

/// The matrix's blocks as a new buffer handle (`UB_DTYPE_U8` `[rows, row_bytes]`, a view of
/// the same memory; release it with `ub_buffer_release`).
///
/// # Safety
/// `buf_out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_ggml_matrix_bytes(
    matrix: *mut ub_ggml_matrix,
    buf_out: *mut *mut ub_buffer,
) -> ub_status {
    call("ub_ggml_matrix_bytes", || {
        // SAFETY: the caller's contract.
        let out = unsafe { Out::handle("buf_out", buf_out) }?;
        let b = self::matrix("matrix", matrix)?.bytes().clone();
        // SAFETY: checked by `Out::handle`.
        unsafe { out.write(new_buffer_handle(b)?) };
        Ok(())
    })
}

/// `y = matrix x` for `x` (f32, f16 or bf16) of `[cols]` or `[batch, cols]` (batch up to
/// `UB_GGML_MAX_BATCH`), into a fresh f32 `[rows]` / `[batch, rows]` buffer. Each output is an
/// f32 sum of the products, the blocks decoded as they are read (nothing is dequantised ahead).
///
/// Errors: `UB_STATUS_INVALID_ARGUMENT` for a non-float `x`; `UB_STATUS_SHAPE_MISMATCH` for an
/// `x` whose last dimension is not the matrix's cols, or a batch above 8;
/// `UB_STATUS_WRONG_DEVICE` for buffers of different devices.
///
/// # Safety
/// `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_op_ggml_matvec(
    queue: *mut ub_queue,
    matrix: *mut ub_ggml_matrix,
    x: *mut ub_buffer,
    out: *mut *mut ub_buffer,
) -> ub_status {
    call("ub_op_ggml_matvec", || {
        // SAFETY: forwarded contract.
        unsafe {
            fresh(out, queue, |q| {
                Ok(ops::ggml_matvec(
                    q,
                    &*self::matrix("matrix", matrix)?,
                    &*buffer("x", x)?,
                )?)
            })
        }
    })
}

/// `ub_op_ggml_matvec` into `y` (f32 of the shape it returns).
///
/// # Safety
/// `fence_out` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_op_ggml_matvec_into(
    queue: *mut ub_queue,
    matrix: *mut ub_ggml_matrix,
    x: *mut ub_buffer,
    y: *mut ub_buffer,
    fence_out: *mut ub_fence,
) -> ub_status {
    call("ub_op_ggml_matvec_into", || {
        // SAFETY: forwarded contract.
        unsafe {
            into(fence_out, queue, |q| {
                Ok(ops::ggml_matvec_into(
                    q,
                    &*self::matrix("matrix", matrix)?,
                    &*buffer("x", x)?,
                    &*buffer("y", y)?,
                )?)
            })
        }
    })
}

/// The `n_matrices` matrices at `matrices`, looked up. A count above `UB_GGML_MAX_STACKED` is
/// refused before the array is read.
///
/// # Safety
/// `matrices` points to `n_matrices` handles (NULL allowed for 0), when `n_matrices` is at most
/// `UB_GGML_MAX_STACKED`.
unsafe fn matrices_in(
    matrices: *const *mut ub_ggml_matrix,
    n_matrices: usize,
) -> CResult<Vec<Arc<GgmlMatrix>>> {
    if n_matrices > UB_GGML_MAX_STACKED {
        return Err(Failure::invalid(
            "n_matrices",
            format!(
                "{n_matrices} matrices given: at most {UB_GGML_MAX_STACKED} are stacked in one \
                 launch"
            ),
        ));
    }
    // SAFETY: forwarded contract.
    let list = unsafe { array_in("matrices", matrices, n_matrices) }?;
    list.iter()
        .enumerate()
        .map(|(i, &m)| self::matrix(&format!("matrices[{i}]"), m))
        .collect()
}

/// The matrices at `matrices` (`n_matrices`, 1 to `UB_GGML_MAX_STACKED`, of equal cols; their
/// formats may differ) applied to the RMS-normalised `x` in one launch, their outputs stacked:
/// `y[b] = concat_i(W_i n[b])` with `n[b] = x[b] / sqrt(mean(x[b]^2) + eps) * norm_weight` (the
/// input norm of an attention block fused into its Q, K and V products, or the final norm into
/// the LM head). `x` is f32, f16 or bf16, `[cols]` or `[batch, cols]` (batch up to
/// `UB_GGML_MAX_BATCH`); `norm_weight` is `[cols]` of x's dtype; `eps` finite, at least 0. `n`
/// stays in f32. Into a fresh f32 `[sum of rows]` / `[batch, sum of rows]` buffer, the rows of
/// matrix 0 first.
///
/// Errors: `UB_STATUS_INVALID_ARGUMENT` for no matrix or more than 3, a non-float `x` or a bad
/// `eps`; `UB_STATUS_SHAPE_MISMATCH` for matrices of different cols or a wrong shape of `x` or
/// `norm_weight`; `UB_STATUS_DTYPE_MISMATCH` for a `norm_weight` of another dtype than `x`;
/// `UB_STATUS_INVALID_HANDLE` naming `matrices[i]` for an entry that is no live matrix.
///
/// # Safety
/// `matrices` points to `n_matrices` matrix handles (NULL allowed for 0; not read when
/// `n_matrices` is above the limit); `out` is valid for a write.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn ub_op_ggml_matvec_norm(
    queue: *mut ub_queue,
    matrices: *const *mut ub_ggml_matrix,
    n_matrices: usize,
    x: *mut ub_buffer,
    norm_weight: *mut ub_buffer,
    eps: f32,
    out: *mut *mut ub_buffer,
) -> ub_status {
    call("ub_op_ggml_matvec_norm", || {
        // SAFETY: forwarded contract.
        unsafe {
            fresh(out, queue, |q| {
                // SAFETY: forwarded contract.
                let ms = matrices_in(matrices, n_matrices)?;
                let refs: Vec<&GgmlMatrix> = ms.iter().map(|m| &**m).collect();
                Ok(ops::ggml_matvec_norm(
                    q,
                    &refs,
                    &*buffer("x", x)?,
                    &*buffer("norm_weight", norm_weight)?,
                    eps,
                )?)
            })
        }
    })
}

/// `ub_op_ggml_matvec_norm` into `out` (f32 of the shape it returns, overlapping no input).
///
/// # Safety
/// As `ub_op_ggml_matvec_norm`, with `fence_out` NULL or valid for a write.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn ub_op_ggml_matvec_norm_into(
    queue: *mut ub_queue,
    matrices: *const *mut ub_ggml_matrix,
    n_matrices: usize,
    x: *mut ub_buffer,
    norm_weight: *mut ub_buffer,
    eps: f32,
    out: *mut ub_buffer,
    fence_out: *mut ub_fence,
) -> ub_status {
    call("ub_op_ggml_matvec_norm_into", || {
        // SAFETY: forwarded contract.
        unsafe {
            into(fence_out, queue, |q| {
                // SAFETY: forwarded contract.
                let ms = matrices_in(matrices, n_matrices)?;
                let refs: Vec<&GgmlMatrix> = ms.iter().map(|m| &**m).collect();
                Ok(ops::ggml_matvec_norm_into(
                    q,
                    &refs,
                    &*buffer("x", x)?,
                    &*buffer("norm_weight", norm_weight)?,
                    eps,
                    &*buffer("out", out)?,
                )?)
            })
        }
    })
}

/// `y = residual + matrix x`: an output projection with the residual add after it. `x` as for
/// `ub_op_ggml_matvec`; `residual` is f32 of the output's shape (`[rows]` / `[batch, rows]`).
/// Into a fresh f32 buffer.
///
/// Errors: as `ub_op_ggml_matvec`, and `UB_STATUS_SHAPE_MISMATCH` / `UB_STATUS_DTYPE_MISMATCH`
/// for a residual of another shape or a non-f32 one.
///
/// # Safety
/// `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_op_ggml_matvec_add(
    queue: *mut ub_queue,
    matrix: *mut ub_ggml_matrix,
    x: *mut ub_buffer,
    residual: *mut ub_buffer,
    out: *mut *mut ub_buffer,
) -> ub_status {
    call("ub_op_ggml_matvec_add", || {
        // SAFETY: forwarded contract.
        unsafe {
            fresh(out, queue, |q| {
                Ok(ops::ggml_matvec_add(
                    q,
                    &*self::matrix("matrix", matrix)?,
                    &*buffer("x", x)?,
                    &*buffer("residual", residual)?,
                )?)
            })
        }
    })
}

/// `ub_op_ggml_matvec_add` into `out` (f32 of the residual's shape). `out` must not overlap
/// the residual (nor any other input): `UB_STATUS_INVALID_ARGUMENT` if it does.
///
/// # Safety
/// `fence_out` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_op_ggml_matvec_add_into(
    queue: *mut ub_queue,
    matrix: *mut ub_ggml_matrix,
    x: *mut ub_buffer,
    residual: *mut ub_buffer,
    out: *mut ub_buffer,
    fence_out: *mut ub_fence,
) -> ub_status {
    call("ub_op_ggml_matvec_add_into", || {
        // SAFETY: forwarded contract.
        unsafe {
            into(fence_out, queue, |q| {
                Ok(ops::ggml_matvec_add_into(
                    q,
                    &*self::matrix("matrix", matrix)?,
                    &*buffer("x", x)?,
                    &*buffer("residual", residual)?,
                    &*buffer("out", out)?,
                )?)
            })
        }
    })
}

/// The first half of a SwiGLU feed-forward block in one launch: `y = silu(gate n) * (up n)`,
/// `silu(g) = g / (1 + exp(-g))`, `n` the RMS-normalised `x` as in `ub_op_ggml_matvec_norm`.
/// `gate` and `up` have the same rows and cols (formats may differ); `x`, `norm_weight` and
/// `eps` as for `ub_op_ggml_matvec_norm`. Into a fresh f32 `[rows]` / `[batch, rows]` buffer.
///
/// Errors: as `ub_op_ggml_matvec_norm`, and `UB_STATUS_SHAPE_MISMATCH` for an `up` of other
/// rows or cols than `gate`.
///
/// # Safety
/// `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_op_ggml_swiglu_norm(
    queue: *mut ub_queue,
    gate: *mut ub_ggml_matrix,
    up: *mut ub_ggml_matrix,
    x: *mut ub_buffer,
    norm_weight: *mut ub_buffer,
    eps: f32,
    out: *mut *mut ub_buffer,
) -> ub_status {
    call("ub_op_ggml_swiglu_norm", || {
        // SAFETY: forwarded contract.
        unsafe {
            fresh(out, queue, |q| {
                Ok(ops::ggml_swiglu_norm(
                    q,
                    &*self::matrix("gate", gate)?,
                    &*self::matrix("up", up)?,
                    &*buffer("x", x)?,
                    &*buffer("norm_weight", norm_weight)?,
                    eps,
                )?)
            })
        }
    })
}

/// `ub_op_ggml_swiglu_norm` into `out` (f32 of the shape it returns, overlapping no input).
///
/// # Safety
/// `fence_out` is NULL or valid for a write.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn ub_op_ggml_swiglu_norm_into(
    queue: *mut ub_queue,
    gate: *mut ub_ggml_matrix,
    up: *mut ub_ggml_matrix,
    x: *mut ub_buffer,
    norm_weight: *mut ub_buffer,
    eps: f32,
    out: *mut ub_buffer,
    fence_out: *mut ub_fence,
) -> ub_status {
    call("ub_op_ggml_swiglu_norm_into", || {
        // SAFETY: forwarded contract.
        unsafe {
            into(fence_out, queue, |q| {
                Ok(ops::ggml_swiglu_norm_into(
                    q,
                    &*self::matrix("gate", gate)?,
                    &*self::matrix("up", up)?,
                    &*buffer("x", x)?,
                    &*buffer("norm_weight", norm_weight)?,
                    eps,
                    &*buffer("out", out)?,
                )?)
            })
        }
    })
}

/// The first launch of a Llama attention block: the input norm, the Q, K and V products, RoPE
/// on Q and K, and the append of K and V to the KV caches. For each row `t` of `x` (a token at
/// `p = positions[t]`), with `n` the RMS-normalised row as in `ub_op_ggml_matvec_norm`:
/// `q_out[t] = rope(wq n, p)`, `k_cache[p] = rope(wk n, p)`, `v_cache[p] = wv n`.
///
/// `wq` is `heads * head_dim` x `cols`, `wk` and `wv` `kv_heads * head_dim` x `cols`. `x` is
/// f32, f16 or bf16, `[tokens, cols]` (1 to `UB_GGML_MAX_BATCH` tokens) or `[cols]`;
/// `norm_weight` `[cols]` of its dtype; `positions` `UB_DTYPE_U32` `[tokens]` (device data: a
/// recorded step serves every position); `q_out` f32 `[tokens, heads, head_dim]`; the caches
/// `[capacity, kv_heads, head_dim]` of one float dtype, which fix `head_dim` (even, at most
/// 256) and `kv_heads`; `heads` a multiple of `kv_heads`; `theta_base` finite and positive;
/// `style` pairs rows `(2i, 2i + 1)` of a head (`UB_ROPE_INTERLEAVED`, a GGUF Llama's Q and K)
/// or `(i, i + head_dim / 2)` (`UB_ROPE_NEOX`). A position at or past `capacity` leaves the
/// caches untouched for that token. Nothing written may overlap another argument.
///
/// Errors: `UB_STATUS_INVALID_ARGUMENT` for a bad scalar, style, head_dim, an empty cache or
/// heads not a multiple of kv_heads; `UB_STATUS_SHAPE_MISMATCH` for matrices or buffers whose
/// shapes disagree as above; `UB_STATUS_DTYPE_MISMATCH` for a wrong dtype of `norm_weight`,
/// `v_cache`, `positions` or `q_out`; `UB_STATUS_WRONG_DEVICE` for a buffer of another device.
///
/// # Safety
/// `fence_out` is NULL or valid for a write.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn ub_op_ggml_qkv_rope_append_into(
    queue: *mut ub_queue,
    wq: *mut ub_ggml_matrix,
    wk: *mut ub_ggml_matrix,
    wv: *mut ub_ggml_matrix,
    x: *mut ub_buffer,
    norm_weight: *mut ub_buffer,
    eps: f32,
    positions: *mut ub_buffer,
    theta_base: f32,
    style: ub_rope_style,
    q_out: *mut ub_buffer,
    k_cache: *mut ub_buffer,
    v_cache: *mut ub_buffer,
    fence_out: *mut ub_fence,
) -> ub_status {
    call("ub_op_ggml_qkv_rope_append_into", || {
        let style = rope_style(style)?;
        // SAFETY: forwarded contract.
        unsafe {
            into(fence_out, queue, |q| {
                Ok(ops::ggml_qkv_rope_append_into(
                    q,
                    &*self::matrix("wq", wq)?,
                    &*self::matrix("wk", wk)?,
                    &*self::matrix("wv", wv)?,
                    &*buffer("x", x)?,
                    &*buffer("norm_weight", norm_weight)?,
                    eps,
                    &*buffer("positions", positions)?,
                    theta_base,
                    style,
                    &*buffer("q_out", q_out)?,
                    &*buffer("k_cache", k_cache)?,
                    &*buffer("v_cache", v_cache)?,
                )?)
            })
        }
    })
}

/// The weights of `matrix` as a fresh dense row-major `[rows, cols]` buffer of `dtype` (f32,
/// f16 or bf16; each weight is exact in f32 and rounded once to `dtype`), for a GEMM over a
/// prefill chunk. The matrix stays in its block format.
///
/// Errors: `UB_STATUS_INVALID_ARGUMENT` for a dtype other than f32, f16 or bf16.
///
/// # Safety
/// `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_op_ggml_dequantize(
    queue: *mut ub_queue,
    matrix: *mut ub_ggml_matrix,
    dtype: ub_dtype,
    out: *mut *mut ub_buffer,
) -> ub_status {
    call("ub_op_ggml_dequantize", || {
        let dtype = dtype_in("dtype", dtype)?;
        // SAFETY: forwarded contract.
        unsafe {
            fresh(out, queue, |q| {
                Ok(ops::ggml_dequantize(
                    q,
                    &*self::matrix("matrix", matrix)?,
                    dtype,
                )?)
            })
        }
    })
}

/// `ub_op_ggml_dequantize` into `out` (f32, f16 or bf16 `[rows, cols]`).
///
/// # Safety
/// `fence_out` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_op_ggml_dequantize_into(
    queue: *mut ub_queue,
    matrix: *mut ub_ggml_matrix,
    out: *mut ub_buffer,
    fence_out: *mut ub_fence,
) -> ub_status {
    call("ub_op_ggml_dequantize_into", || {
        // SAFETY: forwarded contract.
        unsafe {
            into(fence_out, queue, |q| {
                Ok(ops::ggml_dequantize_into(
                    q,
                    &*self::matrix("matrix", matrix)?,
                    &*buffer("out", out)?,
                )?)
            })
        }
    })
}

/// The rows `ids` (`UB_DTYPE_U32` `[n]`) of the block-format embedding table `table` (its rows
/// are the vocabulary), dequantised as they are read, as a fresh `[n, cols]` buffer of `dtype`
/// (f32, f16 or bf16). An id past the vocabulary gives a row of NaN (the ids are device data
/// the kernel cannot refuse). For a table of f32, f16 or bf16 values, see `ub_op_embed_rows`.
///
/// # Safety
/// `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_op_ggml_embed_rows(
    queue: *mut ub_queue,
    table: *mut ub_ggml_matrix,
    ids: *mut ub_buffer,
    dtype: ub_dtype,
    out: *mut *mut ub_buffer,
) -> ub_status {
    call("ub_op_ggml_embed_rows", || {
        let dtype = dtype_in("dtype", dtype)?;
        // SAFETY: forwarded contract.
        unsafe {
            fresh(out, queue, |q| {
                let t = EmbeddingTable::blocks(&*self::matrix("table", table)?);
                Ok(ops::embed_rows(q, &t, &*buffer("ids", ids)?, dtype)?)
            })
        }
    })
}

/// `ub_op_ggml_embed_rows` into `out` (`[n, cols]` of f32, f16 or bf16).
///
/// # Safety
/// `fence_out` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_op_ggml_embed_rows_into(
    queue: *mut ub_queue,
    table: *mut ub_ggml_matrix,
    ids: *mut ub_buffer,
    out: *mut ub_buffer,
    fence_out: *mut ub_fence,
) -> ub_status {
    call("ub_op_ggml_embed_rows_into", || {
        // SAFETY: forwarded contract.
        unsafe {
            into(fence_out, queue, |q| {
                let t = EmbeddingTable::blocks(&*self::matrix("table", table)?);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ggml_types_are_the_file_codes() {
        for (c, t) in [
            (UB_GGML_TYPE_Q4_0, GgmlType::Q4_0),
            (UB_GGML_TYPE_Q4_1, GgmlType::Q4_1),
            (UB_GGML_TYPE_Q8_0, GgmlType::Q8_0),
        ] {
            assert_eq!(ggml_type_in(c).unwrap(), t);
            assert_eq!(t.code(), c);
        }
        let e = ggml_type_in(1000).unwrap_err();
        assert_eq!(e.status, ub_status::UB_STATUS_INVALID_ARGUMENT);
        assert!(
            e.message.contains("1000 is not a GGUF type code"),
            "{}",
            e.message
        );
    }
}
