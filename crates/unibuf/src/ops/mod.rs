//! Fused inference primitives: RMSNorm (optionally with the residual add), softmax, SwiGLU,
//! rotary embedding, the 4-bit group-quantised matrix-vector product, the matrix-vector
//! product over GGUF's block formats (Q8_0, Q4_0, Q4_1) read natively, embedding rows from
//! such tables, on-device top-k / top-p sampling, and grouped-query attention over KV caches
//! (RoPE fused with the cache append, split-K decode attention).
//!
//! Every op is one kernel of the registry (CUDA C, Metal Shading Language and a Rust CPU
//! version under one name, registered when the device opens and compiled on first use or by
//! [`Device::warm_all`](crate::Device::warm_all)), launched through the checked launch path, so
//! a submission of an op carries the queue's label (else the kernel's name) into the stats,
//! faults and traces. Each op has two forms: `op(&queue, ..)` takes its output from the
//! allocator (Shared on unified memory, Private on a discrete GPU), `op_into(&queue, .., &out)`
//! writes a buffer the caller owns. Temporaries need no care from the caller: a buffer
//! dropped while a submission uses it is reused only after that submission's fence completes.
//!
//! The op kernels can be looked up by name (`unibuf_*`) and launched directly, but their
//! contract is the op's: an op checks every shape and scalar before it launches, and the
//! kernels do not all check them again (the int8-activation matvec checks only its block size,
//! since more checks slowed it by 10-15%), so a direct launch must pass what the op would.
//!
//! Arithmetic is in f32 whatever the storage dtype (f32, f16, bf16), with results rounded once
//! to the output dtype.
//!
//! ```
//! use unibuf::{ops, DType, Device};
//! let dev = Device::open("cpu")?;
//! let q = dev.queue();
//! let x = dev.from_slice("x", &[1.0f32, 2.0, 3.0, 4.0], &[1, 4])?;
//! let p = ops::softmax(&q, &x)?;
//! let probs = q.download::<f32>(&p)?;
//! assert!((probs.iter().sum::<f32>() - 1.0).abs() < 1e-6);
//! # Ok::<(), unibuf::Error>(())
//! ```

mod attention;
mod embed;
mod ggml_fused;
mod ggml_matvec;
mod matmul;
mod norm;
mod q4;
mod q8;
mod rope;
mod row_common;
mod sample;
mod softmax;
mod swiglu;

pub use attention::{attention, attention_into, rope_kv_append_into};
pub use embed::{embed_rows, embed_rows_into, EmbeddingTable};
pub use ggml_fused::{
    ggml_dequantize, ggml_dequantize_into, ggml_matvec_add, ggml_matvec_add_into, ggml_matvec_norm,
    ggml_matvec_norm_into, ggml_qkv_rope_append_into, ggml_swiglu_norm, ggml_swiglu_norm_into,
    GGML_MAX_STACKED,
};
pub use ggml_matvec::{ggml_matvec, ggml_matvec_into, GgmlMatrix, GGML_MAX_BATCH};
pub use matmul::{matmul, matmul_bt, matmul_bt_into, matmul_into};
pub use norm::{rms_norm, rms_norm_into, rms_norm_residual, rms_norm_residual_into};
pub use q4::{
    q4_matvec, q4_matvec_into, q4_matvec_q8, q4_matvec_q8_into, Q4Matrix, Q4_GROUPS, Q4_MAX_BATCH,
};
pub use q8::{quantize_activations, quantize_activations_into, Q8Activations, Q8_BLOCK};
pub use rope::{rope, rope_into, RopeStyle};
pub use sample::{sample, sample_into, Sampling, SAMPLE_MAX_K};
pub use softmax::{softmax, softmax_into};
pub use swiglu::{swiglu, swiglu_into};

use crate::buffer::Buffer;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kernel::{Kernel, KernelSource};
use crate::queue::Queue;
use crate::storage::StorageMode;

/// Every op kernel, registered in each device's registry when it opens. Their names start
/// with `unibuf_`, which user kernels therefore cannot take.
pub(crate) fn kernels() -> impl Iterator<Item = &'static KernelSource> {
    [
        norm::KERNELS,
        ggml_matvec::KERNELS,
        ggml_fused::KERNELS,
        embed::KERNELS,
        softmax::KERNELS,
        swiglu::KERNELS,
        rope::KERNELS,
        attention::KERNELS,
        q4::KERNELS,
        q8::KERNELS,
        sample::KERNELS,
    ]
    .into_iter()
    .flatten()
}

/// Compiles the specialised variants the ops launch (beyond each kernel without constants),
/// so that [`Device::warm_all`](crate::Device::warm_all) leaves nothing to compile.
pub(crate) fn warm_variants(dev: &crate::Device) -> Result<()> {
    q4::warm(dev)
}

/// The compiled kernel `name` of the queue's device (compiled once, then a cache lookup).
pub(crate) fn kernel(q: &Queue, name: &str) -> Result<Kernel> {
    q.device().kernel(name)
}

/// A fresh output of `dtype` x `shape` for an op, from the allocator, labelled with the op.
pub(crate) fn output(q: &Queue, op: &str, dtype: DType, shape: &[usize]) -> Result<Buffer> {
    q.device()
        .alloc_labelled(op, dtype, shape, StorageMode::Auto)
}

/// Checks that `b` holds one of the float dtypes the ops compute on.
pub(crate) fn expect_float(op: &'static str, b: &Buffer) -> Result<()> {
    match b.dtype() {
        DType::F32 | DType::F16 | DType::BF16 => Ok(()),
        other => Err(Error::invalid(
            op,
            format!(
                "'{}' is {other:?}: this op takes f32, f16 or bf16",
                b.label()
            ),
        )),
    }
}

/// Checks that `b` has `dtype`.
pub(crate) fn expect_dtype(what: &'static str, b: &Buffer, dtype: DType) -> Result<()> {
    if b.dtype() != dtype {
        return Err(Error::DTypeMismatch {
            what,
            expected: dtype,
            got: b.dtype(),
        });
    }
    Ok(())
}

/// Checks that `b` has exactly `shape`.
pub(crate) fn expect_shape(what: &'static str, b: &Buffer, shape: &[usize]) -> Result<()> {
    if b.shape() != shape {
        return Err(Error::ShapeMismatch {
            what,
            expected: format!("{shape:?}"),
            got: format!("{:?}", b.shape()),
        });
    }
    Ok(())
}

/// (rows, last dimension) of a buffer viewed as a matrix over its last dimension; rank 0 and a
/// zero-length last dimension are refused.
pub(crate) fn rows_and_last(what: &'static str, b: &Buffer) -> Result<(usize, usize)> {
    let Some((&last, leading)) = b.shape().split_last() else {
        return Err(Error::invalid(
            what,
            format!(
                "'{}' is a scalar (shape []): need at least one dimension",
                b.label()
            ),
        ));
    };
    if last == 0 {
        return Err(Error::invalid(
            what,
            format!(
                "'{}' has shape {:?}: the last dimension is empty",
                b.label(),
                b.shape()
            ),
        ));
    }
    Ok((leading.iter().product(), last))
}

/// A kernel index argument: counts above `u32::MAX` are refused (a grid dimension could not
/// cover them either).
pub(crate) fn index_u32(what: &'static str, n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| {
        Error::invalid(
            what,
            format!("{n} is more than the kernels index ({})", u32::MAX),
        )
    })
}
