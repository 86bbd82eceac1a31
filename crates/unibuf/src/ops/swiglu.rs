//! SwiGLU's gated activation: `out = silu(gate) * up = gate / (1 + exp(-gate)) * up`,
//! elementwise over two tensors of one shape.

use super::row_common::{by_dtype, expect_len, float_kernels, HostFloat};
use super::{expect_dtype, expect_float, expect_shape, kernel, output};
use crate::backend::cpu::CpuKernelArgs;
use crate::backend::LaunchDims;
use crate::buffer::Buffer;
use crate::dtype::DType;
use crate::epoch::Fence;
use crate::error::{Error, Result};
use crate::kernel::{KernelSource, Param, ScalarType};
use crate::queue::Queue;

const NAMES: [&str; 3] = [
    "unibuf_swiglu_f32",
    "unibuf_swiglu_f16",
    "unibuf_swiglu_bf16",
];

const CUDA: &str = concat!(
    include_str!("cuda/common.cuh"),
    include_str!("cuda/swiglu.cu")
);
const MSL: &str = include_str!("msl/swiglu.metal");

/// Threads per block of the elementwise launch.
const THREADS: u32 = 256;

/// Blocks at most: enough to fill any current GPU many times over; the kernel grid-strides
/// over the rest.
const MAX_BLOCKS: u64 = 65_535;

const fn params(dtype: DType) -> [Param; 4] {
    [
        Param::input("gate", dtype),
        Param::input("up", dtype),
        Param::output("out", dtype),
        Param::scalar("n", ScalarType::U64),
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
        swiglu_cpu::<f32>,
        swiglu_cpu::<half::f16>,
        swiglu_cpu::<half::bf16>,
    ],
);

/// `silu(gate) * up` elementwise, into a fresh buffer of the shape and dtype of `gate` (f32,
/// f16 or bf16; `up` the same dtype and shape; arithmetic in f32). Returns once queued.
pub fn swiglu(q: &Queue, gate: &Buffer, up: &Buffer) -> Result<Buffer> {
    check(gate, up)?;
    let out = output(q, "swiglu", gate.dtype(), gate.shape())?;
    swiglu_into(q, gate, up, &out)?;
    Ok(out)
}

/// [`swiglu`] into `out` (the dtype and shape of `gate`, not overlapping the inputs). Returns
/// the fence of the submission.
pub fn swiglu_into(q: &Queue, gate: &Buffer, up: &Buffer, out: &Buffer) -> Result<Fence> {
    let n = check(gate, up)?;
    expect_dtype("swiglu: out", out, gate.dtype())?;
    expect_shape("swiglu: out", out, gate.shape())?;
    let k = kernel(q, by_dtype("swiglu", NAMES, gate.dtype())?)?;
    // One thread per 16-byte vector (the CUDA kernel's unit when aligned), at least one block.
    let vectors = n.div_ceil((16 / gate.dtype().size()) as u64);
    let blocks = vectors.div_ceil(u64::from(THREADS)).clamp(1, MAX_BLOCKS) as u32;
    q.launch(
        &k,
        LaunchDims::linear(blocks, THREADS),
        &[gate.into(), up.into(), out.into(), n.into()],
    )
}

/// Validates the inputs; returns the element count.
fn check(gate: &Buffer, up: &Buffer) -> Result<u64> {
    expect_float("swiglu", gate)?;
    expect_dtype("swiglu: up", up, gate.dtype())?;
    expect_shape("swiglu: up", up, gate.shape())?;
    if gate.is_empty() {
        return Err(Error::invalid(
            "swiglu",
            format!(
                "'{}' has shape {:?}: no elements",
                gate.label(),
                gate.shape()
            ),
        ));
    }
    Ok(gate.len() as u64)
}

fn swiglu_cpu<T: HostFloat>(args: &mut CpuKernelArgs<'_>) -> Result<(), String> {
    const NAME: &str = "swiglu";
    let n = usize::try_from(args.u64(3)?).map_err(|e| format!("{NAME}: n: {e}"))?;
    let gate = args.input::<T>(0)?;
    let up = args.input::<T>(1)?;
    let out = args.output::<T>(2)?;
    expect_len(NAME, "gate", gate.len(), n)?;
    expect_len(NAME, "up", up.len(), n)?;
    expect_len(NAME, "out", out.len(), n)?;
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        let g = g.to_f32();
        *o = T::from_f32(g / (1.0 + (-g).exp()) * u.to_f32());
    }
    Ok(())
}
