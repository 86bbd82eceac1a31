//! RMSNorm over the last dimension, alone or fused with the residual add that precedes it in a
//! transformer block: `y = x / sqrt(mean(x²) + eps) * weight`.

use super::row_common::{
    by_dtype, expect_finite_at_least, expect_len, float_kernels, matrix_len, row_launch, rows_u32,
    HostFloat,
};
use super::{expect_dtype, expect_float, expect_shape, index_u32, kernel, output, rows_and_last};
use crate::backend::cpu::CpuKernelArgs;
use crate::buffer::Buffer;
use crate::dtype::DType;
use crate::epoch::Fence;
use crate::error::Result;
use crate::kernel::{KernelSource, Param, ScalarType};
use crate::queue::Queue;

const NAMES: [&str; 3] = [
    "unibuf_rms_norm_f32",
    "unibuf_rms_norm_f16",
    "unibuf_rms_norm_bf16",
];
const RESIDUAL_NAMES: [&str; 3] = [
    "unibuf_rms_norm_residual_f32",
    "unibuf_rms_norm_residual_f16",
    "unibuf_rms_norm_residual_bf16",
];

const CUDA: &str = concat!(
    include_str!("cuda/common.cuh"),
    include_str!("cuda/norm.cu")
);
const MSL: &str = include_str!("msl/norm.metal");

const fn norm_params(dtype: DType) -> [Param; 6] {
    [
        Param::input("x", dtype),
        Param::input("weight", dtype),
        Param::output("out", dtype),
        Param::scalar("rows", ScalarType::U32),
        Param::scalar("hidden", ScalarType::U32),
        Param::scalar("eps", ScalarType::F32),
    ]
}

const fn residual_params(dtype: DType) -> [Param; 8] {
    [
        Param::input("x", dtype),
        Param::input("residual", dtype),
        Param::input("weight", dtype),
        Param::output("normed", dtype),
        Param::output("sum", dtype),
        Param::scalar("rows", ScalarType::U32),
        Param::scalar("hidden", ScalarType::U32),
        Param::scalar("eps", ScalarType::F32),
    ]
}

const NORM_F32: [Param; 6] = norm_params(DType::F32);
const NORM_F16: [Param; 6] = norm_params(DType::F16);
const NORM_BF16: [Param; 6] = norm_params(DType::BF16);
const RESIDUAL_F32: [Param; 8] = residual_params(DType::F32);
const RESIDUAL_F16: [Param; 8] = residual_params(DType::F16);
const RESIDUAL_BF16: [Param; 8] = residual_params(DType::BF16);

const NORM: [KernelSource; 3] = float_kernels(
    NAMES,
    [&NORM_F32, &NORM_F16, &NORM_BF16],
    CUDA,
    MSL,
    [
        norm_cpu::<f32>,
        norm_cpu::<half::f16>,
        norm_cpu::<half::bf16>,
    ],
);
const RESIDUAL: [KernelSource; 3] = float_kernels(
    RESIDUAL_NAMES,
    [&RESIDUAL_F32, &RESIDUAL_F16, &RESIDUAL_BF16],
    CUDA,
    MSL,
    [
        residual_cpu::<f32>,
        residual_cpu::<half::f16>,
        residual_cpu::<half::bf16>,
    ],
);

pub(crate) const KERNELS: &[KernelSource] = &[
    NORM[0],
    NORM[1],
    NORM[2],
    RESIDUAL[0],
    RESIDUAL[1],
    RESIDUAL[2],
];

/// RMSNorm of every row of `x` (its last dimension; any rank ≥ 1) scaled by `weight`
/// (`[hidden]`, the dtype of `x`): `y = x / sqrt(mean(x²) + eps) * weight`, into a fresh
/// buffer of the shape and dtype of `x`. Storage may be f32, f16 or bf16; the arithmetic is
/// f32. Returns once the work is queued (not waiting for it).
///
/// ```
/// use unibuf::{ops, Device};
/// let dev = Device::open("cpu")?;
/// let q = dev.queue();
/// let x = dev.from_slice("x", &[3.0f32, -4.0, 1.0, 1.0], &[2, 2])?;
/// let w = dev.from_slice("w", &[1.0f32, 2.0], &[2])?;
/// let y = q.download::<f32>(&ops::rms_norm(&q, &x, &w, 0.0)?)?;
/// // Row 0 has rms sqrt((9 + 16) / 2); row 1 has rms 1.
/// let r = (12.5f32).sqrt();
/// let want = [3.0 / r, -8.0 / r, 1.0, 2.0];
/// assert!(y.iter().zip(want).all(|(y, w)| (y - w).abs() < 1e-6));
/// # Ok::<(), unibuf::Error>(())
/// ```
pub fn rms_norm(q: &Queue, x: &Buffer, weight: &Buffer, eps: f32) -> Result<Buffer> {
    check_norm("rms_norm", x, weight, eps)?;
    let out = output(q, "rms_norm", x.dtype(), x.shape())?;
    rms_norm_into(q, x, weight, eps, &out)?;
    Ok(out)
}

/// [`rms_norm`] into `out` (the dtype and shape of `x`, not overlapping the inputs). Returns
/// the fence of the submission.
pub fn rms_norm_into(
    q: &Queue,
    x: &Buffer,
    weight: &Buffer,
    eps: f32,
    out: &Buffer,
) -> Result<Fence> {
    let (rows, hidden) = check_norm("rms_norm", x, weight, eps)?;
    expect_dtype("rms_norm: out", out, x.dtype())?;
    expect_shape("rms_norm: out", out, x.shape())?;
    let k = kernel(q, by_dtype("rms_norm", NAMES, x.dtype())?)?;
    q.launch(
        &k,
        row_launch(rows, hidden as usize, x.dtype()),
        &[
            x.into(),
            weight.into(),
            out.into(),
            rows.into(),
            hidden.into(),
            eps.into(),
        ],
    )
}

/// The residual add fused with the norm that follows it: `sum = x + residual` (rounded to the
/// dtype) and `normed = rms_norm(sum, weight, eps)`, computed from the rounded sum so that it
/// equals feeding the returned `sum` into [`rms_norm`]. `residual` has the dtype and shape of
/// `x`. Returns `(normed, sum)`, once queued.
pub fn rms_norm_residual(
    q: &Queue,
    x: &Buffer,
    residual: &Buffer,
    weight: &Buffer,
    eps: f32,
) -> Result<(Buffer, Buffer)> {
    check_residual(x, residual, weight, eps)?;
    let normed = output(q, "rms_norm_residual", x.dtype(), x.shape())?;
    let sum = output(q, "rms_norm_residual: sum", x.dtype(), x.shape())?;
    rms_norm_residual_into(q, x, residual, weight, eps, &normed, &sum)?;
    Ok((normed, sum))
}

/// [`rms_norm_residual`] into `normed_out` and `sum_out` (each the dtype and shape of `x`,
/// overlapping neither the inputs nor each other). Returns the fence of the submission.
pub fn rms_norm_residual_into(
    q: &Queue,
    x: &Buffer,
    residual: &Buffer,
    weight: &Buffer,
    eps: f32,
    normed_out: &Buffer,
    sum_out: &Buffer,
) -> Result<Fence> {
    let (rows, hidden) = check_residual(x, residual, weight, eps)?;
    expect_dtype("rms_norm_residual: normed_out", normed_out, x.dtype())?;
    expect_shape("rms_norm_residual: normed_out", normed_out, x.shape())?;
    expect_dtype("rms_norm_residual: sum_out", sum_out, x.dtype())?;
    expect_shape("rms_norm_residual: sum_out", sum_out, x.shape())?;
    let k = kernel(q, by_dtype("rms_norm_residual", RESIDUAL_NAMES, x.dtype())?)?;
    q.launch(
        &k,
        row_launch(rows, hidden as usize, x.dtype()),
        &[
            x.into(),
            residual.into(),
            weight.into(),
            normed_out.into(),
            sum_out.into(),
            rows.into(),
            hidden.into(),
            eps.into(),
        ],
    )
}

/// Validates `x`, `weight` and `eps`; returns (rows, hidden) as kernel arguments.
fn check_norm(op: &'static str, x: &Buffer, weight: &Buffer, eps: f32) -> Result<(u32, u32)> {
    expect_float(op, x)?;
    let (rows, hidden) = rows_and_last(op, x)?;
    let rows = rows_u32(op, x, rows)?;
    let (weight_what, eps_what) = if op == "rms_norm" {
        ("rms_norm: weight", "rms_norm: eps")
    } else {
        ("rms_norm_residual: weight", "rms_norm_residual: eps")
    };
    expect_dtype(weight_what, weight, x.dtype())?;
    expect_shape(weight_what, weight, &[hidden])?;
    expect_finite_at_least(eps_what, eps, 0.0)?;
    Ok((rows, index_u32(op, hidden)?))
}

fn check_residual(x: &Buffer, residual: &Buffer, weight: &Buffer, eps: f32) -> Result<(u32, u32)> {
    let dims = check_norm("rms_norm_residual", x, weight, eps)?;
    expect_dtype("rms_norm_residual: residual", residual, x.dtype())?;
    expect_shape("rms_norm_residual: residual", residual, x.shape())?;
    Ok(dims)
}

/// The scale `1 / sqrt(mean(v²) + eps)` of one row; the squares are summed in f64 so that the
/// CPU result does not drift with the row length (the GPU sums per thread, then as a tree).
fn inverse_rms<T: HostFloat>(row: impl Iterator<Item = T>, hidden: usize, eps: f32) -> f32 {
    let sum: f64 = row
        .map(|v| {
            let f = f64::from(v.to_f32());
            f * f
        })
        .sum();
    1.0 / ((sum / hidden as f64) as f32 + eps).sqrt()
}

fn norm_cpu<T: HostFloat>(args: &mut CpuKernelArgs<'_>) -> Result<(), String> {
    const NAME: &str = "rms_norm";
    let rows = args.u32(3)? as usize;
    let hidden = args.u32(4)? as usize;
    let eps = args.f32(5)?;
    let x = args.input::<T>(0)?;
    let w = args.input::<T>(1)?;
    let out = args.output::<T>(2)?;
    let n = matrix_len(NAME, rows, hidden)?;
    expect_len(NAME, "x", x.len(), n)?;
    expect_len(NAME, "weight", w.len(), hidden)?;
    expect_len(NAME, "out", out.len(), n)?;
    for (xr, yr) in x.chunks_exact(hidden).zip(out.chunks_exact_mut(hidden)) {
        let scale = inverse_rms(xr.iter().copied(), hidden, eps);
        for ((y, &v), &w) in yr.iter_mut().zip(xr).zip(w) {
            *y = T::from_f32(v.to_f32() * scale * w.to_f32());
        }
    }
    Ok(())
}

fn residual_cpu<T: HostFloat>(args: &mut CpuKernelArgs<'_>) -> Result<(), String> {
    const NAME: &str = "rms_norm_residual";
    let rows = args.u32(5)? as usize;
    let hidden = args.u32(6)? as usize;
    let eps = args.f32(7)?;
    let x = args.input::<T>(0)?;
    let r = args.input::<T>(1)?;
    let w = args.input::<T>(2)?;
    let normed = args.output::<T>(3)?;
    let sum = args.output::<T>(4)?;
    let n = matrix_len(NAME, rows, hidden)?;
    expect_len(NAME, "x", x.len(), n)?;
    expect_len(NAME, "residual", r.len(), n)?;
    expect_len(NAME, "weight", w.len(), hidden)?;
    expect_len(NAME, "normed", normed.len(), n)?;
    expect_len(NAME, "sum", sum.len(), n)?;
    for (s, (&a, &b)) in sum.iter_mut().zip(x.iter().zip(r)) {
        *s = T::from_f32(a.to_f32() + b.to_f32());
    }
    for (sr, yr) in sum
        .chunks_exact(hidden)
        .zip(normed.chunks_exact_mut(hidden))
    {
        let scale = inverse_rms(sr.iter().copied(), hidden, eps);
        for ((y, &v), &w) in yr.iter_mut().zip(sr).zip(w) {
            *y = T::from_f32(v.to_f32() * scale * w.to_f32());
        }
    }
    Ok(())
}
