//! What the element-wise and row-wise ops share: the storage dtypes as the CPU kernels see them,
//! kernel choice by dtype, launch geometry, and the checks of their arguments.

use super::index_u32;
use crate::backend::cpu::CpuKernelFn;
use crate::backend::LaunchDims;
use crate::buffer::Buffer;
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::kernel::{KernelSource, Param};

/// A storage dtype the ops compute on, as the CPU kernels see it: widened to f32 for the
/// arithmetic and rounded once (to nearest even) on the way back.
pub(crate) trait HostFloat: Element + Copy {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

impl HostFloat for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl HostFloat for half::f16 {
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        half::f16::from_f32(v)
    }
}

impl HostFloat for half::bf16 {
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
}

/// The kernel of `names` (`[f32, f16, bf16]`) for `dtype`, which `expect_float` admitted.
pub(crate) fn by_dtype(
    op: &'static str,
    names: [&'static str; 3],
    dtype: DType,
) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok(names[0]),
        DType::F16 => Ok(names[1]),
        DType::BF16 => Ok(names[2]),
        other => Err(Error::invalid(
            op,
            format!("{other:?}: this op takes f32, f16 or bf16"),
        )),
    }
}

/// `rows` as a kernel argument; a buffer with an empty leading dimension is refused rather
/// than launched with an empty grid.
pub(crate) fn rows_u32(op: &'static str, b: &Buffer, rows: usize) -> Result<u32> {
    if rows == 0 {
        return Err(Error::invalid(
            op,
            format!(
                "'{}' has shape {:?}: no rows (a leading dimension is 0)",
                b.label(),
                b.shape()
            ),
        ));
    }
    index_u32(op, rows)
}

/// Launch geometry of a row-wise op: one block per row (the kernels grid-stride, so a grid
/// capped at the CUDA limit of 2³¹-1 still covers every row) and about four 16-byte vectors
/// per thread, which keeps enough loads in flight per SM to saturate HBM and lets the norm hold
/// its row in registers; at least one warp, at most 1024 threads.
pub(crate) fn row_launch(rows: u32, hidden: usize, dtype: DType) -> LaunchDims {
    let per_vector = 16 / dtype.size();
    let vectors = hidden.div_ceil(per_vector);
    let threads = vectors.div_ceil(4).next_multiple_of(32).clamp(32, 1024) as u32;
    LaunchDims::linear(rows.min(i32::MAX as u32), threads)
}

/// Checks a scalar argument that must be finite and at least `min`.
pub(crate) fn expect_finite_at_least(what: &'static str, v: f32, min: f32) -> Result<()> {
    if !v.is_finite() || v < min {
        return Err(Error::invalid(
            what,
            format!("{v} must be finite and at least {min}"),
        ));
    }
    Ok(())
}

/// Fails unless argument `what` of a CPU kernel holds `want` elements (the kernel would
/// otherwise index out of bounds; on a GPU this is a fault, here an error naming it).
pub(crate) fn expect_len(kernel: &str, what: &str, have: usize, want: usize) -> Result<(), String> {
    if have == want {
        Ok(())
    } else {
        Err(format!(
            "{kernel}: '{what}' has {have} elements, expected {want}"
        ))
    }
}

/// `rows * hidden`, the element count of a row-wise op's matrix, checked.
pub(crate) fn matrix_len(kernel: &str, rows: usize, hidden: usize) -> Result<usize, String> {
    rows.checked_mul(hidden)
        .filter(|_| hidden > 0)
        .ok_or_else(|| format!("{kernel}: {rows} rows of {hidden} is no valid matrix"))
}

/// The f32, f16 and bf16 kernels of one op: its names and parameters per dtype (in that order),
/// one CUDA and one MSL source holding all three entry points, and the CPU version per dtype.
pub(crate) const fn float_kernels(
    names: [&'static str; 3],
    params: [&'static [Param]; 3],
    cuda: &'static str,
    msl: &'static str,
    cpu: [CpuKernelFn; 3],
) -> [KernelSource; 3] {
    const fn one(
        name: &'static str,
        params: &'static [Param],
        cuda: &'static str,
        msl: &'static str,
        cpu: CpuKernelFn,
    ) -> KernelSource {
        KernelSource {
            name,
            params,
            cuda: Some(cuda),
            msl: Some(msl),
            cpu: Some(cpu),
        }
    }
    [
        one(names[0], params[0], cuda, msl, cpu[0]),
        one(names[1], params[1], cuda, msl, cpu[1]),
        one(names[2], params[2], cuda, msl, cpu[2]),
    ]
}
