//! Softmax over the last dimension, numerically stable (the row's maximum is subtracted before
//! exponentiating), for rows of any length: one element, a head's attention scores, a 128k
//! vocabulary.

use super::row_common::{
    by_dtype, expect_len, float_kernels, matrix_len, row_launch, rows_u32, HostFloat,
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
    "unibuf_softmax_f32",
    "unibuf_softmax_f16",
    "unibuf_softmax_bf16",
];

const CUDA: &str = concat!(
    include_str!("cuda/common.cuh"),
    include_str!("cuda/softmax.cu")
);
const MSL: &str = include_str!("msl/softmax.metal");

const fn params(dtype: DType) -> [Param; 4] {
    [
        Param::input("x", dtype),
        Param::output("out", dtype),
        Param::scalar("rows", ScalarType::U32),
        Param::scalar("n", ScalarType::U32),
    ]
}

const F32: [Param; 4] = params(DType::F32);
const F16: [Param; 4] = params(DType::F16);
const BF16: [Param; 4] = params(DType::BF16);

pub(crate) const KERNELS: &[KernelSource] = &float_kernels(
    NAMES,
    [&F32, &F16, &BF16],
    CUDA,
    MSL,
    [
        softmax_cpu::<f32>,
        softmax_cpu::<half::f16>,
        softmax_cpu::<half::bf16>,
    ],
);

/// Softmax of every row of `x` over its last dimension (any rank ≥ 1), into a fresh buffer of
/// the shape and dtype of `x` (f32, f16 or bf16; arithmetic in f32). `-inf` entries (masked
/// logits) get probability 0; a row whose entries are all `-inf` has no distribution and comes
/// out NaN, as in PyTorch. Returns once the work is queued.
pub fn softmax(q: &Queue, x: &Buffer) -> Result<Buffer> {
    check(x)?;
    let out = output(q, "softmax", x.dtype(), x.shape())?;
    softmax_into(q, x, &out)?;
    Ok(out)
}

/// [`softmax`] into `out` (the dtype and shape of `x`, not overlapping it). Returns the fence
/// of the submission.
pub fn softmax_into(q: &Queue, x: &Buffer, out: &Buffer) -> Result<Fence> {
    let (rows, n) = check(x)?;
    expect_dtype("softmax: out", out, x.dtype())?;
    expect_shape("softmax: out", out, x.shape())?;
    let k = kernel(q, by_dtype("softmax", NAMES, x.dtype())?)?;
    q.launch(
        &k,
        row_launch(rows, n as usize, x.dtype()),
        &[x.into(), out.into(), rows.into(), n.into()],
    )
}

/// Validates `x`; returns (rows, row length) as kernel arguments.
fn check(x: &Buffer) -> Result<(u32, u32)> {
    expect_float("softmax", x)?;
    let (rows, n) = rows_and_last("softmax", x)?;
    Ok((rows_u32("softmax", x, rows)?, index_u32("softmax", n)?))
}

fn softmax_cpu<T: HostFloat>(args: &mut CpuKernelArgs<'_>) -> Result<(), String> {
    const NAME: &str = "softmax";
    let rows = args.u32(2)? as usize;
    let n = args.u32(3)? as usize;
    let x = args.input::<T>(0)?;
    let out = args.output::<T>(1)?;
    let len = matrix_len(NAME, rows, n)?;
    expect_len(NAME, "x", x.len(), len)?;
    expect_len(NAME, "out", out.len(), len)?;
    for (xr, yr) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let max = xr
            .iter()
            .map(|v| v.to_f32())
            .fold(f32::NEG_INFINITY, f32::max);
        // The sum in f64 so that the CPU result does not drift with the row length.
        let total: f64 = xr.iter().map(|v| f64::from((v.to_f32() - max).exp())).sum();
        let inv = (1.0 / total) as f32;
        for (y, v) in yr.iter_mut().zip(xr) {
            *y = T::from_f32((v.to_f32() - max).exp() * inv);
        }
    }
    Ok(())
}
