//! The fused GGUF block products a Llama decoder step needs, each one launch over matrices in
//! their own block format ([`GgmlMatrix`]: Q8_0, Q4_0, Q4_1, decoded by ggml_matvec's own
//! block decoding on every backend), plus the dequantisation of such a matrix to a dense array
//! for the GEMM of a prefill chunk:
//!
//! | op | computes |
//! |---|---|
//! | [`ggml_matvec_norm`] | `y[b] = concat_i(W_i n[b])`, `n[b] = rms_norm(x[b]) * norm_weight`, 1 to 3 matrices |
//! | [`ggml_matvec_add`] | `y = residual + W x` |
//! | [`ggml_swiglu_norm`] | `y = silu(G n) * (U n)`, `n` as above |
//! | [`ggml_dequantize`] | `W` as a dense `[rows, cols]` f32 / f16 / bf16 array |
//! | [`ggml_qkv_rope_append_into`] | `rope(Wq n)`, and `rope(Wk n)`, `Wv n` into the KV caches |
//!
//! The semantics, the GPU design and the accuracy are documented on [`ggml_matvec_norm`] and
//! [`ggml_qkv_rope_append_into`] (the public docs; this module is private).

use super::ggml_matvec::{
    batch_of, block_bytes, dequantize_block, row_dot, GgmlMatrix, GGML_MAX_BATCH, MAX_BLOCKS,
    ROWS_PER_BLOCK, THREADS,
};
use super::rope::{rope_kv_rows, RopeStyle};
use super::row_common::{by_dtype, expect_finite_at_least, expect_len, float_kernels, HostFloat};
use super::{expect_dtype, expect_float, expect_shape, index_u32, kernel, output};
use crate::backend::cpu::{CpuKernelArgs, CpuKernelFn};
use crate::backend::LaunchDims;
use crate::buffer::Buffer;
use crate::dtype::DType;
use crate::epoch::Fence;
use crate::error::{Error, Result};
use crate::kernel::{KernelSource, Param, ScalarType};
use crate::queue::Queue;

/// The most matrices one [`ggml_matvec_norm`] stacks (Q, K and V).
pub const GGML_MAX_STACKED: usize = 3;

const NORM_NAMES: [&str; 3] = [
    "unibuf_ggml_matvec_norm_f32",
    "unibuf_ggml_matvec_norm_f16",
    "unibuf_ggml_matvec_norm_bf16",
];
const ADD_NAMES: [&str; 3] = [
    "unibuf_ggml_matvec_add_f32",
    "unibuf_ggml_matvec_add_f16",
    "unibuf_ggml_matvec_add_bf16",
];
const SWIGLU_NAMES: [&str; 3] = [
    "unibuf_ggml_swiglu_norm_f32",
    "unibuf_ggml_swiglu_norm_f16",
    "unibuf_ggml_swiglu_norm_bf16",
];
const DEQUANTIZE_NAMES: [&str; 3] = [
    "unibuf_ggml_dequantize_f32",
    "unibuf_ggml_dequantize_f16",
    "unibuf_ggml_dequantize_bf16",
];
/// The kernels of [`ggml_qkv_rope_append_into`], one per (dtype of x, dtype of the caches) at
/// index `3 * x + cache` (f32, f16, bf16 in that order).
const QKV_NAMES: [&str; 9] = [
    "unibuf_ggml_qkv_rope_append_f32_f32",
    "unibuf_ggml_qkv_rope_append_f32_f16",
    "unibuf_ggml_qkv_rope_append_f32_bf16",
    "unibuf_ggml_qkv_rope_append_f16_f32",
    "unibuf_ggml_qkv_rope_append_f16_f16",
    "unibuf_ggml_qkv_rope_append_f16_bf16",
    "unibuf_ggml_qkv_rope_append_bf16_f32",
    "unibuf_ggml_qkv_rope_append_bf16_f16",
    "unibuf_ggml_qkv_rope_append_bf16_bf16",
];

/// The sources of one op's three kernels: ggml_matvec's helpers (block decoding, the warp's row
/// product) without its own kernels, then this file's, with only the op's kernels compiled
/// (`UB_GF_<op>`), so that compiling one kernel does not compile the other ops'. The source of
/// [`ggml_qkv_rope_append_into`]'s kernel `n` (of [`QKV_NAMES`]) is `sources!("QKV n")`
/// (`UB_GF_QKV` set to `n`): one entry point each.
macro_rules! sources {
    ($op:literal) => {
        (
            concat!(
                include_str!("cuda/common.cuh"),
                "#define UB_GGML_HELPERS_ONLY\n#define UB_GF_",
                $op,
                "\n",
                include_str!("cuda/ggml_matvec.cu"),
                include_str!("cuda/ggml_fused.cu")
            ),
            concat!(
                "#define UB_GGML_HELPERS_ONLY\n#define UB_GF_",
                $op,
                "\n",
                include_str!("msl/ggml_matvec.metal"),
                include_str!("msl/ggml_fused.metal")
            ),
        )
    };
}

const NORM_SRC: (&str, &str) = sources!("NORM");
const SWIGLU_SRC: (&str, &str) = sources!("SWIGLU");
const ADD_SRC: (&str, &str) = sources!("ADD");
const DEQUANTIZE_SRC: (&str, &str) = sources!("DEQUANTIZE");
const QKV_SRC: [(&str, &str); 9] = [
    sources!("QKV 0"),
    sources!("QKV 1"),
    sources!("QKV 2"),
    sources!("QKV 3"),
    sources!("QKV 4"),
    sources!("QKV 5"),
    sources!("QKV 6"),
    sources!("QKV 7"),
    sources!("QKV 8"),
];

const fn norm_params(x: DType) -> [Param; 15] {
    [
        Param::input("w0", DType::U8),
        Param::input("w1", DType::U8),
        Param::input("w2", DType::U8),
        Param::input("x", x),
        Param::input("norm_weight", x),
        Param::output("y", DType::F32),
        Param::scalar("rows0", ScalarType::U32),
        Param::scalar("rows1", ScalarType::U32),
        Param::scalar("rows2", ScalarType::U32),
        Param::scalar("kind0", ScalarType::U32),
        Param::scalar("kind1", ScalarType::U32),
        Param::scalar("kind2", ScalarType::U32),
        Param::scalar("cols", ScalarType::U32),
        Param::scalar("batch", ScalarType::U32),
        Param::scalar("eps", ScalarType::F32),
    ]
}

const fn swiglu_params(x: DType) -> [Param; 11] {
    [
        Param::input("gate", DType::U8),
        Param::input("up", DType::U8),
        Param::input("x", x),
        Param::input("norm_weight", x),
        Param::output("y", DType::F32),
        Param::scalar("rows", ScalarType::U32),
        Param::scalar("kind_gate", ScalarType::U32),
        Param::scalar("kind_up", ScalarType::U32),
        Param::scalar("cols", ScalarType::U32),
        Param::scalar("batch", ScalarType::U32),
        Param::scalar("eps", ScalarType::F32),
    ]
}

const fn add_params(x: DType) -> [Param; 8] {
    [
        Param::input("w", DType::U8),
        Param::input("x", x),
        Param::input("residual", DType::F32),
        Param::output("y", DType::F32),
        Param::scalar("rows", ScalarType::U32),
        Param::scalar("cols", ScalarType::U32),
        Param::scalar("batch", ScalarType::U32),
        Param::scalar("kind", ScalarType::U32),
    ]
}

const fn qkv_params(x: DType, cache: DType) -> [Param; 21] {
    [
        Param::input("wq", DType::U8),
        Param::input("wk", DType::U8),
        Param::input("wv", DType::U8),
        Param::input("x", x),
        Param::input("norm_weight", x),
        Param::input("positions", DType::U32),
        Param::output("q_out", DType::F32),
        Param::output("k_cache", cache),
        Param::output("v_cache", cache),
        Param::scalar("q_rows", ScalarType::U32),
        Param::scalar("kv_rows", ScalarType::U32),
        Param::scalar("kind_q", ScalarType::U32),
        Param::scalar("kind_k", ScalarType::U32),
        Param::scalar("kind_v", ScalarType::U32),
        Param::scalar("cols", ScalarType::U32),
        Param::scalar("tokens", ScalarType::U32),
        Param::scalar("head_dim", ScalarType::U32),
        Param::scalar("capacity", ScalarType::U32),
        Param::scalar("eps", ScalarType::F32),
        Param::scalar("theta_base", ScalarType::F32),
        Param::scalar("style", ScalarType::U32),
    ]
}

const fn dequantize_params(out: DType) -> [Param; 5] {
    [
        Param::input("w", DType::U8),
        Param::output("out", out),
        Param::scalar("rows", ScalarType::U32),
        Param::scalar("cols", ScalarType::U32),
        Param::scalar("kind", ScalarType::U32),
    ]
}

const NORM_F32: [Param; 15] = norm_params(DType::F32);
const NORM_F16: [Param; 15] = norm_params(DType::F16);
const NORM_BF16: [Param; 15] = norm_params(DType::BF16);
const SWIGLU_F32: [Param; 11] = swiglu_params(DType::F32);
const SWIGLU_F16: [Param; 11] = swiglu_params(DType::F16);
const SWIGLU_BF16: [Param; 11] = swiglu_params(DType::BF16);
const ADD_F32: [Param; 8] = add_params(DType::F32);
const ADD_F16: [Param; 8] = add_params(DType::F16);
const ADD_BF16: [Param; 8] = add_params(DType::BF16);
const DEQUANTIZE_F32: [Param; 5] = dequantize_params(DType::F32);
const DEQUANTIZE_F16: [Param; 5] = dequantize_params(DType::F16);
const DEQUANTIZE_BF16: [Param; 5] = dequantize_params(DType::BF16);
const QKV_PARAMS: [[Param; 21]; 9] = [
    qkv_params(DType::F32, DType::F32),
    qkv_params(DType::F32, DType::F16),
    qkv_params(DType::F32, DType::BF16),
    qkv_params(DType::F16, DType::F32),
    qkv_params(DType::F16, DType::F16),
    qkv_params(DType::F16, DType::BF16),
    qkv_params(DType::BF16, DType::F32),
    qkv_params(DType::BF16, DType::F16),
    qkv_params(DType::BF16, DType::BF16),
];

const NORM: [KernelSource; 3] = float_kernels(
    NORM_NAMES,
    [&NORM_F32, &NORM_F16, &NORM_BF16],
    NORM_SRC.0,
    NORM_SRC.1,
    [
        matvec_norm_cpu::<f32>,
        matvec_norm_cpu::<half::f16>,
        matvec_norm_cpu::<half::bf16>,
    ],
);
const SWIGLU: [KernelSource; 3] = float_kernels(
    SWIGLU_NAMES,
    [&SWIGLU_F32, &SWIGLU_F16, &SWIGLU_BF16],
    SWIGLU_SRC.0,
    SWIGLU_SRC.1,
    [
        swiglu_norm_cpu::<f32>,
        swiglu_norm_cpu::<half::f16>,
        swiglu_norm_cpu::<half::bf16>,
    ],
);
const ADD: [KernelSource; 3] = float_kernels(
    ADD_NAMES,
    [&ADD_F32, &ADD_F16, &ADD_BF16],
    ADD_SRC.0,
    ADD_SRC.1,
    [
        matvec_add_cpu::<f32>,
        matvec_add_cpu::<half::f16>,
        matvec_add_cpu::<half::bf16>,
    ],
);
const DEQUANTIZE: [KernelSource; 3] = float_kernels(
    DEQUANTIZE_NAMES,
    [&DEQUANTIZE_F32, &DEQUANTIZE_F16, &DEQUANTIZE_BF16],
    DEQUANTIZE_SRC.0,
    DEQUANTIZE_SRC.1,
    [
        dequantize_cpu::<f32>,
        dequantize_cpu::<half::f16>,
        dequantize_cpu::<half::bf16>,
    ],
);

/// Kernel `$n` of [`QKV_NAMES`]: x stored as `$x`, the caches as `$c`.
macro_rules! qkv_kernel {
    ($n:literal, $x:ty, $c:ty) => {
        KernelSource {
            name: QKV_NAMES[$n],
            params: &QKV_PARAMS[$n],
            cuda: Some(QKV_SRC[$n].0),
            msl: Some(QKV_SRC[$n].1),
            cpu: Some(qkv_rope_append_cpu::<$x, $c> as CpuKernelFn),
        }
    };
}

const QKV: [KernelSource; 9] = [
    qkv_kernel!(0, f32, f32),
    qkv_kernel!(1, f32, half::f16),
    qkv_kernel!(2, f32, half::bf16),
    qkv_kernel!(3, half::f16, f32),
    qkv_kernel!(4, half::f16, half::f16),
    qkv_kernel!(5, half::f16, half::bf16),
    qkv_kernel!(6, half::bf16, f32),
    qkv_kernel!(7, half::bf16, half::f16),
    qkv_kernel!(8, half::bf16, half::bf16),
];

pub(crate) const KERNELS: &[KernelSource] = &[
    NORM[0],
    NORM[1],
    NORM[2],
    SWIGLU[0],
    SWIGLU[1],
    SWIGLU[2],
    ADD[0],
    ADD[1],
    ADD[2],
    DEQUANTIZE[0],
    DEQUANTIZE[1],
    DEQUANTIZE[2],
    QKV[0],
    QKV[1],
    QKV[2],
    QKV[3],
    QKV[4],
    QKV[5],
    QKV[6],
    QKV[7],
    QKV[8],
];

/// Threads per block of the dequantisation (one output element each).
const DEQUANTIZE_THREADS: u32 = 256;

/// The grid of the products: one warp per output row, 8 per block (the kernels grid-stride
/// beyond [`MAX_BLOCKS`]).
fn row_grid(rows: u32) -> LaunchDims {
    LaunchDims::linear(rows.div_ceil(ROWS_PER_BLOCK).clamp(1, MAX_BLOCKS), THREADS)
}

/// Checks `norm_weight` (`[cols]`, the dtype of `x`) and `eps` (finite, at least 0); the
/// names are the errors' `what`.
fn check_norm(
    (weight_what, eps_what): (&'static str, &'static str),
    x: &Buffer,
    norm_weight: &Buffer,
    cols: usize,
    eps: f32,
) -> Result<()> {
    expect_dtype(weight_what, norm_weight, x.dtype())?;
    expect_shape(weight_what, norm_weight, &[cols])?;
    expect_finite_at_least(eps_what, eps, 0.0)
}

/// Validates the arguments of [`ggml_matvec_norm`]; returns (batch, output shape).
fn check_matvec_norm(
    matrices: &[&GgmlMatrix],
    x: &Buffer,
    norm_weight: &Buffer,
    eps: f32,
) -> Result<(usize, Vec<usize>)> {
    const OP: &str = "ggml_matvec_norm";
    let Some(first) = matrices.first() else {
        return Err(Error::invalid(
            OP,
            format!("no matrix given: need 1 to {GGML_MAX_STACKED}"),
        ));
    };
    if matrices.len() > GGML_MAX_STACKED {
        return Err(Error::invalid(
            OP,
            format!(
                "{} matrices given: at most {GGML_MAX_STACKED} are stacked in one launch",
                matrices.len()
            ),
        ));
    }
    if let Some((i, m)) = matrices
        .iter()
        .enumerate()
        .find(|(_, m)| m.cols() != first.cols())
    {
        return Err(Error::ShapeMismatch {
            what: "ggml_matvec_norm stacked matrices",
            expected: format!("{} cols, as matrix 0", first.cols()),
            got: format!("{} cols in matrix {i}", m.cols()),
        });
    }
    let total: usize = matrices.iter().map(|m| m.rows()).sum();
    index_u32("ggml_matvec_norm rows", total)?;
    let mut shape = (0, Vec::new());
    for m in matrices {
        shape = batch_of("ggml_matvec_norm x", m, x, total)?;
    }
    check_norm(
        ("ggml_matvec_norm norm_weight", "ggml_matvec_norm eps"),
        x,
        norm_weight,
        first.cols(),
        eps,
    )?;
    Ok(shape)
}

/// The matrices `matrices` (1 to [`GGML_MAX_STACKED`], equal cols, each Q8_0, Q4_0 or Q4_1)
/// applied to the RMS-normalised `x` in one launch, their outputs stacked:
/// `y[b] = concat_i(W_i n[b])` with `n[b] = x[b] / sqrt(mean(x[b]²) + eps) * norm_weight` — the
/// input norm of an attention block fused into its Q, K and V projections, or the final norm
/// into the lm_head. `x` is f32, f16 or bf16, `[cols]` or `[batch, cols]` (batch up to
/// [`GGML_MAX_BATCH`]); `norm_weight` is `[cols]` of its dtype; `eps` finite and at least 0.
/// Returns a fresh f32 `[sum of rows]` / `[batch, sum of rows]` (the rows of matrix 0 first),
/// once queued.
///
/// **The norm** is [`rms_norm`](crate::ops::rms_norm)'s formula computed its way (the scale
/// `1 / sqrt(mean(x²) + eps)` in f32, then `x * scale * weight` in f32), except that `n` is not
/// rounded to the storage dtype: the result equals `rms_norm` carried out in f32 followed by
/// the product (for f32 `x`, the two ops in sequence, up to the order of the sums).
///
/// **On a GPU** each output row is one warp (SIMD-group), 8 to a block of 256 threads, its lanes
/// sharing the row's blocks in quarters of 8 weights so that one load of the warp covers 8
/// consecutive blocks. Every block first computes the RMS scale of each row of `x` itself
/// (cheaper than a launch) and keeps the normalised `x` in shared memory as f32 when
/// `batch * cols` is at most 8192 on CUDA (32 KiB) or 6144 on Metal (24 KiB); beyond that its
/// warps normalise `x` as they read it, with the same operations, so no size is refused for
/// want of shared memory. The stacked matrices are one grid over the sum of their rows, a warp
/// picking its matrix by its row; they may differ in format.
///
/// **Accuracy.** The block weights are exact in f32. Each output is an f32 sum of `cols`
/// products (per lane in block order, then across the lanes as a tree on a GPU; in 8 partial
/// sums per block on the CPU), within about `cols * 2⁻²⁴` of the sum of the products'
/// magnitudes, plus a few f32 roundings of each `n` (CUDA's `rsqrtf` is within 2 ulp).
///
/// Errors: `InvalidArgument` for no matrix or more than 3, a non-float `x`, or a bad `eps`;
/// `ShapeMismatch` for matrices of different cols or a wrong shape of `x` (including a batch
/// above 8) or `norm_weight`; `DTypeMismatch` for a `norm_weight` of another dtype than `x`.
///
/// ```
/// use unibuf::ops::{self, GgmlMatrix};
/// use unibuf::weights::gguf::GgmlType;
/// let dev = unibuf::Device::open("cpu")?;
/// let q = dev.queue();
/// // One Q8_0 row of 32 weights: scale 0.5 (f16 0x3800), codes 0, 1, ..., 31.
/// let mut row = vec![0x00u8, 0x38];
/// row.extend(0..32u8);
/// let w = dev.from_slice("w", &row, &[1, 34])?;
/// let m = GgmlMatrix::new(w, GgmlType::Q8_0, 1, 32)?;
/// // x = 2 everywhere: its RMS is 2, so with a norm weight of 1 the normalised x is 1.
/// let x = dev.from_slice("x", &[2.0f32; 32], &[1, 32])?;
/// let norm_weight = dev.from_slice("norm", &[1.0f32; 32], &[32])?;
/// // The same matrix stacked twice (as Q and K would be): one launch, two outputs per row.
/// let y = ops::ggml_matvec_norm(&q, &[&m, &m], &x, &norm_weight, 0.0)?;
/// assert_eq!(y.shape(), [1, 2]);
/// let want = 0.5 * (0..32).sum::<i32>() as f32;
/// assert_eq!(q.download::<f32>(&y)?, [want, want]);
/// # Ok::<(), unibuf::Error>(())
/// ```
pub fn ggml_matvec_norm(
    q: &Queue,
    matrices: &[&GgmlMatrix],
    x: &Buffer,
    norm_weight: &Buffer,
    eps: f32,
) -> Result<Buffer> {
    let (_, shape) = check_matvec_norm(matrices, x, norm_weight, eps)?;
    let out = output(q, "ggml_matvec_norm", DType::F32, &shape)?;
    ggml_matvec_norm_into(q, matrices, x, norm_weight, eps, &out)?;
    Ok(out)
}

/// [`ggml_matvec_norm`] into `out`, f32 of the shape it returns (`[batch, sum of rows]`, or
/// `[sum of rows]` for `x` of `[cols]`), overlapping no input. Returns the submission's fence.
pub fn ggml_matvec_norm_into(
    q: &Queue,
    matrices: &[&GgmlMatrix],
    x: &Buffer,
    norm_weight: &Buffer,
    eps: f32,
    out: &Buffer,
) -> Result<Fence> {
    let (batch, shape) = check_matvec_norm(matrices, x, norm_weight, eps)?;
    expect_dtype("ggml_matvec_norm out", out, DType::F32)?;
    expect_shape("ggml_matvec_norm out", out, &shape)?;
    let first = matrices[0];
    // Unused slots: no rows, the first matrix's bytes and format (only read, never indexed).
    let slot = |i: usize| matrices.get(i).copied().unwrap_or(first);
    let rows = |i: usize| matrices.get(i).map_or(0, |m| m.rows() as u32);
    let total: u32 = matrices.iter().map(|m| m.rows() as u32).sum();
    let cols = index_u32("ggml_matvec_norm cols", first.cols())?;
    let k = kernel(q, by_dtype("ggml_matvec_norm", NORM_NAMES, x.dtype())?)?;
    q.launch(
        &k,
        row_grid(total),
        &[
            slot(0).bytes().into(),
            slot(1).bytes().into(),
            slot(2).bytes().into(),
            x.into(),
            norm_weight.into(),
            out.into(),
            rows(0).into(),
            rows(1).into(),
            rows(2).into(),
            slot(0).kind().into(),
            slot(1).kind().into(),
            slot(2).kind().into(),
            cols.into(),
            (batch as u32).into(),
            eps.into(),
        ],
    )
}

/// Whether two views cover a common byte.
fn overlaps(a: &Buffer, b: &Buffer) -> bool {
    a.shares_memory_with(b)
        && a.byte_offset() < b.byte_offset() + b.byte_len()
        && b.byte_offset() < a.byte_offset() + a.byte_len()
}

/// Validates the arguments of [`ggml_matvec_add`]; returns (batch, output shape).
fn check_matvec_add(w: &GgmlMatrix, x: &Buffer, residual: &Buffer) -> Result<(usize, Vec<usize>)> {
    let (batch, shape) = batch_of("ggml_matvec_add x", w, x, w.rows())?;
    expect_dtype("ggml_matvec_add residual", residual, DType::F32)?;
    expect_shape("ggml_matvec_add residual", residual, &shape)?;
    Ok((batch, shape))
}

/// `y = residual + w x`: a block's output projection with the residual add that follows it.
/// `x` is f32, f16 or bf16, `[cols]` or `[batch, cols]` (batch up to [`GGML_MAX_BATCH`]);
/// `residual` is f32 of the output's shape, `[rows]` / `[batch, rows]`. Each output is
/// `residual + (w x)` with the product summed in f32 as [`ggml_matvec`](crate::ops::ggml_matvec)
/// sums it. Returns a fresh f32 output, once queued.
///
/// Errors: `InvalidArgument` for a non-float `x`; `ShapeMismatch` for a wrong shape of `x`
/// (including a batch above 8) or `residual`; `DTypeMismatch` for a non-f32 `residual`.
pub fn ggml_matvec_add(q: &Queue, w: &GgmlMatrix, x: &Buffer, residual: &Buffer) -> Result<Buffer> {
    let (_, shape) = check_matvec_add(w, x, residual)?;
    let out = output(q, "ggml_matvec_add", DType::F32, &shape)?;
    ggml_matvec_add_into(q, w, x, residual, &out)?;
    Ok(out)
}

/// [`ggml_matvec_add`] into `out`, f32 of the shape of `residual`. `out` must not overlap
/// `residual` (nor any other input): `InvalidArgument` if it does. Returns the submission's
/// fence.
pub fn ggml_matvec_add_into(
    q: &Queue,
    w: &GgmlMatrix,
    x: &Buffer,
    residual: &Buffer,
    out: &Buffer,
) -> Result<Fence> {
    let (batch, shape) = check_matvec_add(w, x, residual)?;
    expect_dtype("ggml_matvec_add out", out, DType::F32)?;
    expect_shape("ggml_matvec_add out", out, &shape)?;
    if overlaps(out, residual) {
        return Err(Error::invalid(
            "ggml_matvec_add out",
            format!(
                "'{}' (bytes {}..{}) overlaps the residual '{}' (bytes {}..{}): write the sum to \
                 another buffer",
                out.label(),
                out.byte_offset(),
                out.byte_offset() + out.byte_len(),
                residual.label(),
                residual.byte_offset(),
                residual.byte_offset() + residual.byte_len()
            ),
        ));
    }
    let rows = index_u32("ggml_matvec_add rows", w.rows())?;
    let cols = index_u32("ggml_matvec_add cols", w.cols())?;
    let k = kernel(q, by_dtype("ggml_matvec_add", ADD_NAMES, x.dtype())?)?;
    q.launch(
        &k,
        row_grid(rows),
        &[
            w.bytes().into(),
            x.into(),
            residual.into(),
            out.into(),
            rows.into(),
            cols.into(),
            (batch as u32).into(),
            w.kind().into(),
        ],
    )
}

/// Validates the arguments of [`ggml_swiglu_norm`]; returns (batch, output shape).
fn check_swiglu_norm(
    gate: &GgmlMatrix,
    up: &GgmlMatrix,
    x: &Buffer,
    norm_weight: &Buffer,
    eps: f32,
) -> Result<(usize, Vec<usize>)> {
    if (gate.rows(), gate.cols()) != (up.rows(), up.cols()) {
        return Err(Error::ShapeMismatch {
            what: "ggml_swiglu_norm up",
            expected: format!("{} x {}, as the gate", gate.rows(), gate.cols()),
            got: format!("{} x {}", up.rows(), up.cols()),
        });
    }
    let shape = batch_of("ggml_swiglu_norm x", gate, x, gate.rows())?;
    batch_of("ggml_swiglu_norm x", up, x, up.rows())?;
    check_norm(
        ("ggml_swiglu_norm norm_weight", "ggml_swiglu_norm eps"),
        x,
        norm_weight,
        gate.cols(),
        eps,
    )?;
    Ok(shape)
}

/// The first half of a SwiGLU feed-forward block in one launch:
/// `y = silu(gate n) * (up n)` with `silu(g) = g / (1 + exp(-g))` (as in
/// [`swiglu`](crate::ops::swiglu), in f32) and
/// `n = x / sqrt(mean(x²) + eps) * norm_weight` (as in [`ggml_matvec_norm`]). `gate` and `up`
/// have the same rows and cols (their formats may differ); `x`, `norm_weight` and `eps` as for
/// [`ggml_matvec_norm`], whose notes on the norm, the kernels and the accuracy hold here too (a
/// warp computes a gate row and the up row of the same index). Returns a fresh f32 `[rows]` /
/// `[batch, rows]`, once queued.
///
/// Errors: as [`ggml_matvec_norm`], and `ShapeMismatch` when `up` differs from `gate` in rows
/// or cols.
pub fn ggml_swiglu_norm(
    q: &Queue,
    gate: &GgmlMatrix,
    up: &GgmlMatrix,
    x: &Buffer,
    norm_weight: &Buffer,
    eps: f32,
) -> Result<Buffer> {
    let (_, shape) = check_swiglu_norm(gate, up, x, norm_weight, eps)?;
    let out = output(q, "ggml_swiglu_norm", DType::F32, &shape)?;
    ggml_swiglu_norm_into(q, gate, up, x, norm_weight, eps, &out)?;
    Ok(out)
}

/// [`ggml_swiglu_norm`] into `out`, f32 of the shape it returns, overlapping no input. Returns
/// the submission's fence.
pub fn ggml_swiglu_norm_into(
    q: &Queue,
    gate: &GgmlMatrix,
    up: &GgmlMatrix,
    x: &Buffer,
    norm_weight: &Buffer,
    eps: f32,
    out: &Buffer,
) -> Result<Fence> {
    let (batch, shape) = check_swiglu_norm(gate, up, x, norm_weight, eps)?;
    expect_dtype("ggml_swiglu_norm out", out, DType::F32)?;
    expect_shape("ggml_swiglu_norm out", out, &shape)?;
    let rows = index_u32("ggml_swiglu_norm rows", gate.rows())?;
    let cols = index_u32("ggml_swiglu_norm cols", gate.cols())?;
    let k = kernel(q, by_dtype("ggml_swiglu_norm", SWIGLU_NAMES, x.dtype())?)?;
    q.launch(
        &k,
        row_grid(rows),
        &[
            gate.bytes().into(),
            up.bytes().into(),
            x.into(),
            norm_weight.into(),
            out.into(),
            rows.into(),
            gate.kind().into(),
            up.kind().into(),
            cols.into(),
            (batch as u32).into(),
            eps.into(),
        ],
    )
}

/// The weights of `w` as a fresh dense row-major `[rows, cols]` buffer of `dtype` (f32, f16 or
/// bf16; each weight is exact in f32 and rounded once to `dtype`), for a GEMM over a prefill
/// chunk. The matrix itself stays in its block format. Returns once queued.
///
/// Errors: `InvalidArgument` for a `dtype` other than f32, f16 or bf16.
pub fn ggml_dequantize(q: &Queue, w: &GgmlMatrix, dtype: DType) -> Result<Buffer> {
    by_dtype("ggml_dequantize", DEQUANTIZE_NAMES, dtype)?;
    let out = output(q, "ggml_dequantize", dtype, &[w.rows(), w.cols()])?;
    ggml_dequantize_into(q, w, &out)?;
    Ok(out)
}

/// [`ggml_dequantize`] into `out`: f32, f16 or bf16 (`InvalidArgument` otherwise) of shape
/// `[rows, cols]` (`ShapeMismatch` otherwise). Returns the submission's fence.
pub fn ggml_dequantize_into(q: &Queue, w: &GgmlMatrix, out: &Buffer) -> Result<Fence> {
    expect_float("ggml_dequantize out", out)?;
    expect_shape("ggml_dequantize out", out, &[w.rows(), w.cols()])?;
    let rows = index_u32("ggml_dequantize rows", w.rows())?;
    let cols = index_u32("ggml_dequantize cols", w.cols())?;
    let n = (w.rows() as u64) * (w.cols() as u64);
    let blocks = n
        .div_ceil(u64::from(DEQUANTIZE_THREADS))
        .clamp(1, u64::from(MAX_BLOCKS)) as u32;
    let k = kernel(
        q,
        by_dtype("ggml_dequantize", DEQUANTIZE_NAMES, out.dtype())?,
    )?;
    q.launch(
        &k,
        LaunchDims::linear(blocks, DEQUANTIZE_THREADS),
        &[
            w.bytes().into(),
            out.into(),
            rows.into(),
            cols.into(),
            w.kind().into(),
        ],
    )
}

/// The largest head dimension [`ggml_qkv_rope_append_into`] takes: that of the attention
/// kernels its caches feed.
const QKV_MAX_HEAD_DIM: usize = 256;

/// The index of a float dtype (which the checks admitted) in the kernel tables.
fn float_index(dtype: DType) -> usize {
    match dtype {
        DType::F16 => 1,
        DType::BF16 => 2,
        _ => 0,
    }
}

/// The geometry of a [`ggml_qkv_rope_append_into`] call, checked, as kernel arguments.
struct QkvGeometry {
    tokens: u32,
    q_rows: u32,
    kv_rows: u32,
    cols: u32,
    head_dim: u32,
    capacity: u32,
    /// The pairs of rows the warps take: `(q_rows + 2 kv_rows) / 2`.
    pairs: u32,
    /// The kernel, in [`QKV_NAMES`].
    kernel: usize,
}

/// Validates the arguments of [`ggml_qkv_rope_append_into`] (the launch then checks that no
/// written buffer overlaps another argument).
#[allow(clippy::too_many_arguments)]
fn check_qkv_rope_append(
    q: &Queue,
    (wq, wk, wv): (&GgmlMatrix, &GgmlMatrix, &GgmlMatrix),
    x: &Buffer,
    norm_weight: &Buffer,
    eps: f32,
    positions: &Buffer,
    theta_base: f32,
    q_out: &Buffer,
    k_cache: &Buffer,
    v_cache: &Buffer,
) -> Result<QkvGeometry> {
    const OP: &str = "ggml_qkv_rope_append";
    for (what, b) in [
        ("ggml_qkv_rope_append wq", wq.bytes()),
        ("ggml_qkv_rope_append wk", wk.bytes()),
        ("ggml_qkv_rope_append wv", wv.bytes()),
        ("ggml_qkv_rope_append x", x),
        ("ggml_qkv_rope_append norm_weight", norm_weight),
        ("ggml_qkv_rope_append positions", positions),
        ("ggml_qkv_rope_append q_out", q_out),
        ("ggml_qkv_rope_append k_cache", k_cache),
        ("ggml_qkv_rope_append v_cache", v_cache),
    ] {
        q.check_buffer(what, b)?;
    }
    for (what, m) in [
        ("ggml_qkv_rope_append wk", wk),
        ("ggml_qkv_rope_append wv", wv),
    ] {
        if m.cols() != wq.cols() {
            return Err(Error::ShapeMismatch {
                what,
                expected: format!("{} cols, as wq", wq.cols()),
                got: format!("{} cols", m.cols()),
            });
        }
    }
    if wv.rows() != wk.rows() {
        return Err(Error::ShapeMismatch {
            what: "ggml_qkv_rope_append wv",
            expected: format!("{} rows, as wk", wk.rows()),
            got: format!("{} rows", wv.rows()),
        });
    }
    let (tokens, _) = batch_of("ggml_qkv_rope_append x", wq, x, wq.rows())?;
    check_norm(
        (
            "ggml_qkv_rope_append norm_weight",
            "ggml_qkv_rope_append eps",
        ),
        x,
        norm_weight,
        wq.cols(),
        eps,
    )?;
    expect_float("ggml_qkv_rope_append k_cache", k_cache)?;
    let &[capacity, kv_heads, head_dim] = k_cache.shape() else {
        return Err(Error::ShapeMismatch {
            what: "ggml_qkv_rope_append k_cache",
            expected: "[capacity, kv_heads, head_dim]".to_owned(),
            got: format!("{:?}", k_cache.shape()),
        });
    };
    expect_dtype("ggml_qkv_rope_append v_cache", v_cache, k_cache.dtype())?;
    expect_shape("ggml_qkv_rope_append v_cache", v_cache, k_cache.shape())?;
    if capacity == 0 || kv_heads == 0 {
        return Err(Error::invalid(
            OP,
            format!(
                "k_cache '{}' {:?}: capacity and kv_heads must be non-zero",
                k_cache.label(),
                k_cache.shape()
            ),
        ));
    }
    if head_dim == 0 || !head_dim.is_multiple_of(2) || head_dim > QKV_MAX_HEAD_DIM {
        return Err(Error::invalid(
            OP,
            format!(
                "head_dim = {head_dim} (the caches' last dimension): must be even, non-zero and \
                 at most {QKV_MAX_HEAD_DIM}"
            ),
        ));
    }
    if wk.rows() != kv_heads * head_dim {
        return Err(Error::ShapeMismatch {
            what: "ggml_qkv_rope_append wk",
            expected: format!(
                "{} rows: the caches' kv_heads {kv_heads} x head_dim {head_dim}",
                kv_heads * head_dim
            ),
            got: format!("{} rows", wk.rows()),
        });
    }
    if !wq.rows().is_multiple_of(head_dim) {
        return Err(Error::ShapeMismatch {
            what: "ggml_qkv_rope_append wq",
            expected: format!("rows a multiple of the caches' head_dim {head_dim}"),
            got: format!("{} rows", wq.rows()),
        });
    }
    let heads = wq.rows() / head_dim;
    if !heads.is_multiple_of(kv_heads) {
        return Err(Error::invalid(
            OP,
            format!(
                "heads = {heads} (wq's rows / head_dim) is not a multiple of kv_heads = \
                 {kv_heads} (each kv head serves heads / kv_heads query heads)"
            ),
        ));
    }
    expect_dtype("ggml_qkv_rope_append positions", positions, DType::U32)?;
    expect_shape("ggml_qkv_rope_append positions", positions, &[tokens])?;
    if !(theta_base.is_finite() && theta_base > 0.0) {
        return Err(Error::invalid(
            "ggml_qkv_rope_append theta_base",
            format!("{theta_base} must be finite and positive"),
        ));
    }
    expect_dtype("ggml_qkv_rope_append q_out", q_out, DType::F32)?;
    expect_shape(
        "ggml_qkv_rope_append q_out",
        q_out,
        &[tokens, heads, head_dim],
    )?;
    let q_rows = index_u32("ggml_qkv_rope_append wq rows", wq.rows())?;
    let kv_rows = index_u32("ggml_qkv_rope_append wk rows", wk.rows())?;
    Ok(QkvGeometry {
        tokens: tokens as u32,
        q_rows,
        kv_rows,
        cols: index_u32("ggml_qkv_rope_append cols", wq.cols())?,
        head_dim: head_dim as u32,
        capacity: index_u32("ggml_qkv_rope_append capacity", capacity)?,
        pairs: index_u32("ggml_qkv_rope_append rows", (wq.rows() + 2 * wk.rows()) / 2)?,
        kernel: 3 * float_index(x.dtype()) + float_index(k_cache.dtype()),
    })
}

/// The first launch of a Llama attention block, "QKV + RoPE + append": the input norm, the Q, K
/// and V projections, RoPE on Q and K, and the append of K and V to the KV caches. For each row
/// `t` of `x`, a token at `p = positions[t]`, with `n = x[t] / sqrt(mean(x[t]²) + eps) *
/// norm_weight`:
///
/// `q_out[t] = rope(wq n, p)`, `k_cache[p] = rope(wk n, p)`, `v_cache[p] = wv n`
///
/// — what [`ggml_matvec_norm_into`] over `[wq, wk, wv]` followed by
/// [`rope_kv_append_into`](crate::ops::rope_kv_append_into) on the three parts of its output
/// computes, in one launch and without the f32 buffer between them.
///
/// **Arguments.** `wq` is `heads * head_dim` x `cols`, `wk` and `wv` `kv_heads * head_dim` x
/// `cols` (Q8_0, Q4_0 or Q4_1, formats may differ). `x` is f32, f16 or bf16, `[tokens, cols]`
/// with 1 to [`GGML_MAX_BATCH`] tokens (or `[cols]`: one token); `norm_weight` `[cols]` of its
/// dtype; `eps` finite and at least 0 (as [`ggml_matvec_norm`]). `positions` is U32 `[tokens]`,
/// device data, so that one decode step recorded into a [`LaunchBatch`](crate::LaunchBatch)
/// serves every position. `q_out` is **f32** `[tokens, heads, head_dim]` whatever the dtype of
/// `x`: the products are f32, and f32 is what the two-op sequence keeps (its `qkv` output is
/// f32), so nothing is rounded that the sequence would not round. `k_cache` and `v_cache` are
/// `[capacity, kv_heads, head_dim]` of one float dtype (f32, f16 or bf16, independent of `x`);
/// they fix `head_dim` (even, at most 256) and `kv_heads`, from which `heads = wq rows /
/// head_dim`. `heads` must be a multiple of `kv_heads` (as for
/// [`attention`](crate::ops::attention), which reads these caches); `theta_base` finite and
/// positive. The rows of `wq` and `wk` pair up as `style` says: rows `(2i, 2i + 1)` of each head
/// for [`RopeStyle::Interleaved`] (a GGUF Llama's Q and K rows are permuted for it), rows
/// `(i, i + head_dim / 2)` for [`RopeStyle::Neox`].
///
/// A position at or past `capacity` (device data, which the kernel cannot refuse) leaves the
/// caches untouched for that row; its `q_out` row is still written. Positions within one call
/// should differ: for two rows at one position, which one the caches keep is unspecified.
/// Nothing written may overlap an input or another output. Returns the submission's fence.
///
/// **On a GPU** each warp (SIMD-group) computes one pair of rows that rotate together, 8 warps
/// to a block of 256 threads over a grid of `ceil((q rows + 2 kv rows) / 16)` blocks
/// (grid-striding beyond 65535): the pair's two weight rows in one pass over `n`, each with
/// [`ggml_matvec_norm`]'s quarter-block product (the same operations in the same order). Lane
/// `t` then takes token `t`: it rotates the pair in f32 and stores it, a Q pair into `q_out`, a
/// K pair into the k cache row `positions[t]` (converted to the cache dtype), and a V pair,
/// not rotated, into the v cache. The input norm is [`ggml_matvec_norm`]'s prologue: every
/// block computes the RMS scales and keeps `n` in shared memory when it fits.
///
/// **Accuracy.** The products are [`ggml_matvec_norm`]'s and the rotation is
/// [`rope`](crate::ops::rope)'s term for term (the f32 inverse frequency and angle, the rotation
/// in f32), each value rounded once to its output's dtype: the same f32 operations in the same
/// order as the two-op sequence, whose result it gives (bit for bit on the CPU; a GPU compiler
/// may contract the rotation's multiplies and adds differently in the two kernels). It differs
/// from an exact computation by the products' error (see [`ggml_matvec_norm`]) plus rope's
/// angle error, which grows with the position.
///
/// Errors: `InvalidArgument` for a non-float `x` or cache, a bad `eps` or `theta_base`, an odd
/// `head_dim` or one above 256, an empty cache, `heads` not a multiple of `kv_heads`, or a
/// written buffer overlapping another argument; `ShapeMismatch` for `wk` or `wv` of other cols
/// than `wq`, `wv` of other rows than `wk`, `wk` rows other than `kv_heads * head_dim`, `wq`
/// rows not a multiple of `head_dim`, or a wrong shape of `x` (including more than 8 tokens),
/// `norm_weight`, `k_cache` (not 3-dimensional), `v_cache`, `positions` or `q_out`;
/// `DTypeMismatch` for a `norm_weight` of another dtype than `x`, a `v_cache` of another dtype
/// than `k_cache`, non-U32 `positions` or a non-f32 `q_out`; `WrongDevice` for a buffer of
/// another device.
#[allow(clippy::too_many_arguments)]
pub fn ggml_qkv_rope_append_into(
    q: &Queue,
    wq: &GgmlMatrix,
    wk: &GgmlMatrix,
    wv: &GgmlMatrix,
    x: &Buffer,
    norm_weight: &Buffer,
    eps: f32,
    positions: &Buffer,
    theta_base: f32,
    style: RopeStyle,
    q_out: &Buffer,
    k_cache: &Buffer,
    v_cache: &Buffer,
) -> Result<Fence> {
    let g = check_qkv_rope_append(
        q,
        (wq, wk, wv),
        x,
        norm_weight,
        eps,
        positions,
        theta_base,
        q_out,
        k_cache,
        v_cache,
    )?;
    let k = kernel(q, QKV_NAMES[g.kernel])?;
    // One warp per pair of rows (where the products take one per row).
    q.launch(
        &k,
        row_grid(g.pairs),
        &[
            wq.bytes().into(),
            wk.bytes().into(),
            wv.bytes().into(),
            x.into(),
            norm_weight.into(),
            positions.into(),
            q_out.into(),
            k_cache.into(),
            v_cache.into(),
            g.q_rows.into(),
            g.kv_rows.into(),
            wq.kind().into(),
            wk.kind().into(),
            wv.kind().into(),
            g.cols.into(),
            g.tokens.into(),
            g.head_dim.into(),
            g.capacity.into(),
            eps.into(),
            theta_base.into(),
            style.code().into(),
        ],
    )
}

// ---------------------------------------------------------------------------------------------
// CPU kernels

/// Fails unless the scalars describe matrices the kernels read: formats 0..=2, cols a non-zero
/// multiple of 32, batch 1..=GGML_MAX_BATCH.
fn check_geometry(name: &str, kinds: &[u32], cols: usize, batch: usize) -> Result<(), String> {
    if kinds.iter().any(|&k| k > 2)
        || cols == 0
        || !cols.is_multiple_of(32)
        || batch == 0
        || batch > GGML_MAX_BATCH
    {
        return Err(format!(
            "{name}: bad geometry: kinds {kinds:?}, cols {cols}, batch {batch}"
        ));
    }
    Ok(())
}

/// Fails unless `w` holds exactly `rows` rows of `cols` weights of `kind`.
fn expect_matrix(
    name: &str,
    what: &str,
    w: &[u8],
    rows: usize,
    cols: usize,
    kind: u32,
) -> Result<(), String> {
    let want = (cols / 32)
        .checked_mul(block_bytes(kind))
        .and_then(|b| b.checked_mul(rows))
        .ok_or_else(|| format!("{name}: {rows} rows of {cols} is no valid matrix"))?;
    expect_len(name, what, w.len(), want)
}

/// `n = x * scale * weight` per row of `cols`, with `scale = 1 / sqrt(mean(x²) + eps)`: what
/// `rms_norm`'s CPU kernel computes (the squares summed in f64, the scale and the products in
/// f32), kept in f32.
fn normalise<X: HostFloat>(x: &[X], weight: &[X], cols: usize, eps: f32) -> Vec<f32> {
    let mut n = Vec::with_capacity(x.len());
    for row in x.chunks_exact(cols) {
        let sum: f64 = row
            .iter()
            .map(|v| {
                let f = f64::from(v.to_f32());
                f * f
            })
            .sum();
        let scale = 1.0 / ((sum / cols as f64) as f32 + eps).sqrt();
        n.extend(
            row.iter()
                .zip(weight)
                .map(|(&v, &w)| v.to_f32() * scale * w.to_f32()),
        );
    }
    n
}

/// `y[b * stride + first + i] = row_i . n[b]` for every row `i` of `w` (blocks of `kind`, `cols`
/// weights a row) and every row `b` of `n` (f32 rows of `cols`): the products of the CPU
/// kernels, each row's blocks decoded once for all rows of `n`.
fn products(
    kind: u32,
    w: &[u8],
    n: &[f32],
    cols: usize,
    y: &mut [f32],
    stride: usize,
    first: usize,
) {
    let batch = n.len() / cols;
    for (i, row) in w.chunks_exact(cols / 32 * block_bytes(kind)).enumerate() {
        let mut acc = [0.0f32; GGML_MAX_BATCH];
        row_dot(kind, row, n, cols, &mut acc[..batch]);
        for (b, a) in acc.iter().take(batch).enumerate() {
            y[b * stride + first + i] = *a;
        }
    }
}

fn matvec_norm_cpu<X: HostFloat>(args: &mut CpuKernelArgs<'_>) -> Result<(), String> {
    const NAME: &str = "unibuf_ggml_matvec_norm";
    let rows = [args.u32(6)?, args.u32(7)?, args.u32(8)?].map(|r| r as usize);
    let kinds = [args.u32(9)?, args.u32(10)?, args.u32(11)?];
    let cols = args.u32(12)? as usize;
    let batch = args.u32(13)? as usize;
    let eps = args.f32(14)?;
    check_geometry(NAME, &kinds, cols, batch)?;
    let ws = [
        args.input::<u8>(0)?,
        args.input::<u8>(1)?,
        args.input::<u8>(2)?,
    ];
    let x = args.input::<X>(3)?;
    let nw = args.input::<X>(4)?;
    let y = args.output::<f32>(5)?;
    let total: usize = rows.iter().sum();
    for (i, (w, &r)) in ws.iter().zip(&rows).enumerate() {
        if r > 0 {
            expect_matrix(NAME, ["w0", "w1", "w2"][i], w, r, cols, kinds[i])?;
        }
    }
    expect_len(NAME, "x", x.len(), batch * cols)?;
    expect_len(NAME, "norm_weight", nw.len(), cols)?;
    expect_len(NAME, "y", y.len(), batch * total)?;
    let n = normalise(x, nw, cols, eps);
    let mut first = 0;
    for ((w, &r), &kind) in ws.iter().zip(&rows).zip(&kinds) {
        if r > 0 {
            products(kind, w, &n, cols, y, total, first);
            first += r;
        }
    }
    Ok(())
}

fn swiglu_norm_cpu<X: HostFloat>(args: &mut CpuKernelArgs<'_>) -> Result<(), String> {
    const NAME: &str = "unibuf_ggml_swiglu_norm";
    let rows = args.u32(5)? as usize;
    let kinds = [args.u32(6)?, args.u32(7)?];
    let cols = args.u32(8)? as usize;
    let batch = args.u32(9)? as usize;
    let eps = args.f32(10)?;
    check_geometry(NAME, &kinds, cols, batch)?;
    let gate = args.input::<u8>(0)?;
    let up = args.input::<u8>(1)?;
    let x = args.input::<X>(2)?;
    let nw = args.input::<X>(3)?;
    let y = args.output::<f32>(4)?;
    expect_matrix(NAME, "gate", gate, rows, cols, kinds[0])?;
    expect_matrix(NAME, "up", up, rows, cols, kinds[1])?;
    expect_len(NAME, "x", x.len(), batch * cols)?;
    expect_len(NAME, "norm_weight", nw.len(), cols)?;
    expect_len(NAME, "y", y.len(), batch * rows)?;
    let n = normalise(x, nw, cols, eps);
    let gate_rows = gate.chunks_exact(cols / 32 * block_bytes(kinds[0]));
    let up_rows = up.chunks_exact(cols / 32 * block_bytes(kinds[1]));
    for (r, (gr, ur)) in gate_rows.zip(up_rows).enumerate() {
        let mut g = [0.0f32; GGML_MAX_BATCH];
        let mut u = [0.0f32; GGML_MAX_BATCH];
        row_dot(kinds[0], gr, &n, cols, &mut g[..batch]);
        row_dot(kinds[1], ur, &n, cols, &mut u[..batch]);
        for b in 0..batch {
            y[b * rows + r] = g[b] / (1.0 + (-g[b]).exp()) * u[b];
        }
    }
    Ok(())
}

fn matvec_add_cpu<X: HostFloat>(args: &mut CpuKernelArgs<'_>) -> Result<(), String> {
    const NAME: &str = "unibuf_ggml_matvec_add";
    let rows = args.u32(4)? as usize;
    let cols = args.u32(5)? as usize;
    let batch = args.u32(6)? as usize;
    let kind = args.u32(7)?;
    check_geometry(NAME, &[kind], cols, batch)?;
    let w = args.input::<u8>(0)?;
    let x = args.input::<X>(1)?;
    let residual = args.input::<f32>(2)?;
    let y = args.output::<f32>(3)?;
    expect_matrix(NAME, "w", w, rows, cols, kind)?;
    expect_len(NAME, "x", x.len(), batch * cols)?;
    expect_len(NAME, "residual", residual.len(), batch * rows)?;
    expect_len(NAME, "y", y.len(), batch * rows)?;
    let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
    for (r, row) in w.chunks_exact(cols / 32 * block_bytes(kind)).enumerate() {
        let mut acc = [0.0f32; GGML_MAX_BATCH];
        row_dot(kind, row, &xf, cols, &mut acc[..batch]);
        for (b, a) in acc.iter().take(batch).enumerate() {
            let i = b * rows + r;
            y[i] = residual[i] + *a;
        }
    }
    Ok(())
}

fn dequantize_cpu<T: HostFloat>(args: &mut CpuKernelArgs<'_>) -> Result<(), String> {
    const NAME: &str = "unibuf_ggml_dequantize";
    let rows = args.u32(2)? as usize;
    let cols = args.u32(3)? as usize;
    let kind = args.u32(4)?;
    check_geometry(NAME, &[kind], cols, 1)?;
    let w = args.input::<u8>(0)?;
    let out = args.output::<T>(1)?;
    expect_matrix(NAME, "w", w, rows, cols, kind)?;
    let n = rows
        .checked_mul(cols)
        .ok_or_else(|| format!("{NAME}: {rows} rows of {cols} is no valid matrix"))?;
    expect_len(NAME, "out", out.len(), n)?;
    let mut block = [0.0f32; 32];
    // Blocks are row-major in both: block i holds elements 32 i .. 32 i + 32 of the output.
    for (blk, o) in w
        .chunks_exact(block_bytes(kind))
        .zip(out.chunks_exact_mut(32))
    {
        dequantize_block(kind, blk, &mut block);
        for (o, &v) in o.iter_mut().zip(&block) {
            *o = T::from_f32(v);
        }
    }
    Ok(())
}

fn qkv_rope_append_cpu<X: HostFloat, C: HostFloat>(
    args: &mut CpuKernelArgs<'_>,
) -> Result<(), String> {
    const NAME: &str = "unibuf_ggml_qkv_rope_append";
    let q_rows = args.u32(9)? as usize;
    let kv_rows = args.u32(10)? as usize;
    let kinds = [args.u32(11)?, args.u32(12)?, args.u32(13)?];
    let cols = args.u32(14)? as usize;
    let tokens = args.u32(15)? as usize;
    let head_dim = args.u32(16)? as usize;
    let capacity = args.u32(17)? as usize;
    let eps = args.f32(18)?;
    let theta = args.f32(19)?;
    let style = args.u32(20)?;
    check_geometry(NAME, &kinds, cols, tokens)?;
    if head_dim == 0
        || !head_dim.is_multiple_of(2)
        || q_rows == 0
        || kv_rows == 0
        || !q_rows.is_multiple_of(head_dim)
        || !kv_rows.is_multiple_of(head_dim)
        || style > 1
    {
        return Err(format!(
            "{NAME}: bad geometry: q_rows {q_rows}, kv_rows {kv_rows}, head_dim {head_dim}, \
             style {style}"
        ));
    }
    let ws = [
        args.input::<u8>(0)?,
        args.input::<u8>(1)?,
        args.input::<u8>(2)?,
    ];
    let x = args.input::<X>(3)?;
    let nw = args.input::<X>(4)?;
    let positions = args.input::<u32>(5)?;
    let q_out = args.output::<f32>(6)?;
    let k_cache = args.output::<C>(7)?;
    let v_cache = args.output::<C>(8)?;
    let rows = [q_rows, kv_rows, kv_rows];
    for (i, (w, &r)) in ws.iter().zip(&rows).enumerate() {
        expect_matrix(NAME, ["wq", "wk", "wv"][i], w, r, cols, kinds[i])?;
    }
    let cache_len = capacity
        .checked_mul(kv_rows)
        .ok_or_else(|| format!("{NAME}: capacity {capacity} x {kv_rows} overflows"))?;
    expect_len(NAME, "x", x.len(), tokens * cols)?;
    expect_len(NAME, "norm_weight", nw.len(), cols)?;
    expect_len(NAME, "positions", positions.len(), tokens)?;
    expect_len(NAME, "q_out", q_out.len(), tokens * q_rows)?;
    expect_len(NAME, "k_cache", k_cache.len(), cache_len)?;
    expect_len(NAME, "v_cache", v_cache.len(), cache_len)?;
    // The products as ggml_matvec_norm's CPU kernel computes them, then the rotation and the
    // cache writes as rope_kv_append's.
    let n = normalise(x, nw, cols, eps);
    let [yq, yk, yv] = [0, 1, 2].map(|i| {
        let mut y = vec![0.0f32; tokens * rows[i]];
        products(kinds[i], ws[i], &n, cols, &mut y, rows[i], 0);
        y
    });
    rope_kv_rows(
        &yq, &yk, &yv, positions, q_out, k_cache, v_cache, head_dim, theta, style,
    );
    Ok(())
}
