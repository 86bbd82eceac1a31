//! The Metal product: MetalPerformanceShaders' `MPSMatrixMultiplication`, encoded into the
//! queue's command buffer as external work.
//!
//! MPS matrices are row-major like unibuf's views, so no transposition trick is needed: `a` is
//! the left matrix `[m, k]`, `b` the right matrix (`[k, n]`, or `[n, k]` read with
//! `transposeRight`), `out` the result `[m, n]`, each an `MPSMatrix` over the view's `MTLBuffer`
//! at the view's offset with `rowBytes` = columns x element size. `alpha = 1`, `beta = 0`.
//!
//! Data types: f32 (`MPSDataTypeFloat32`) and f16 (`MPSDataTypeFloat16`), the two floating
//! types `MPSMatrixMultiplication` documents. MPS has an `MPSDataTypeBFloat16` constant (macOS
//! 14), but the matrix kernel does not list it among its types, and MPS reports an unsupported
//! type by an assertion, not an error: bf16 is refused with `Error::Unsupported` before
//! anything is submitted.
//!
//! Offsets: `initWithBuffer:offset:descriptor:` documents no alignment of its own; the
//! descriptor requires `rowBytes` to be a multiple of the element size, and the offset is held
//! to the same rule (a view starting mid-element is refused with `Error::Misaligned`).
//!
//! The kernel object is created per call: caching it per (device, shape, layout) would need a
//! keyed store in the device's BLAS slot with eviction, and creating an `MPSMatrixMultiplication`
//! is cheap next to the product (MPS caches its pipelines itself).

use super::{Gemm, Layout};
use crate::buffer::Buffer;
use crate::epoch::Fence;
use crate::error::{Error, Result};
use crate::interop::{NativeBuffer, NativeDevice, NativeEncoder, NativeHandle};
use crate::queue::Queue;
use crate::DType;
use objc2::rc::Retained;
use objc2::runtime::ProtocolObject;
use objc2::AnyThread;
use objc2_metal::{MTLBuffer, MTLCommandBuffer, MTLDevice};
use objc2_metal_performance_shaders::{
    MPSDataType, MPSMatrix, MPSMatrixDescriptor, MPSMatrixMultiplication,
};

/// The checks the Metal path adds before anything is allocated or submitted: a dtype the MPS
/// matrix kernel takes.
pub(super) fn check(g: &Gemm) -> Result<()> {
    match g.dtype {
        DType::F32 | DType::F16 => Ok(()),
        _ => Err(Error::Unsupported {
            backend: "metal",
            what: format!(
                "ops::matmul ({g}): MPSMatrixMultiplication documents only float32 and float16 \
                 (MPSDataTypeBFloat16 exists, but the matrix kernel does not list it, and MPS \
                 asserts on a type it lacks); convert to f16 or f32, or use the CPU or CUDA \
                 backend"
            ),
        }),
    }
}

/// The `MTLBuffer` and offset of a view, its offset checked against the element size.
fn native(what: &'static str, b: &Buffer) -> Result<(NativeHandle, usize)> {
    match b.native()? {
        NativeBuffer::Metal { buffer, offset, .. } => {
            let size = b.dtype().size();
            if !offset.is_multiple_of(size) {
                return Err(Error::Misaligned {
                    what,
                    value: offset,
                    align: size,
                });
            }
            Ok((buffer, offset))
        }
        other => Err(Error::invalid(
            what,
            format!("the Metal backend gave {other:?} for '{}'", b.label()),
        )),
    }
}

/// Encodes the product into the queue's command buffer. The caller checked shapes, dtypes,
/// element alignment of the addresses, the dtype ([`check`]), that `out` is writable and
/// overlaps neither input, and that `m`, `n` and `k` are non-zero.
pub(super) fn submit(q: &Queue, a: &Buffer, b: &Buffer, out: &Buffer, g: Gemm) -> Result<Fence> {
    check(&g)?;
    let NativeDevice::Metal { device } = q.device().native() else {
        return Err(Error::invalid(
            "matmul",
            "the Metal path was given a queue of another backend",
        ));
    };
    let ma = native("matmul: a offset", a)?;
    let mb = native("matmul: b offset", b)?;
    let mo = native("matmul: out offset", out)?;
    q.external(&[a, b], &[out], move |encoder| {
        let NativeEncoder::Metal { command_buffer } = encoder else {
            return Err(format!("ops::matmul on Metal was handed {encoder:?}").into());
        };
        // SAFETY: the external-work contract: the closure runs at submission with
        // `command_buffer` the queue's live, uncommitted command buffer with no encoder open
        // (MPS opens and ends its own); `device` is the device's `id<MTLDevice>`, alive as long
        // as the device; the three `MTLBuffer`s stay alive (their memory unreused) until this
        // submission's fence completes, and the epochs order the command buffer after earlier
        // writes of `a` and `b` and earlier uses of `out`, and later uses after it. The views
        // hold m*k, k*n (or n*k) and m*n elements of `g.dtype` at element-aligned offsets, and
        // `out` overlaps neither input (all checked by the op).
        unsafe { encode(device, command_buffer, g, ma, mb, mo) }.map_err(Into::into)
    })
}

/// An `MPSMatrix` of `rows` x `columns` elements of `ty`, row-major and dense, over `buffer`
/// at `offset`.
///
/// # Safety
/// `buffer` is a live `id<MTLBuffer>` holding `rows * columns` elements of `ty` from `offset`.
unsafe fn matrix(
    (buffer, offset): (NativeHandle, usize),
    rows: usize,
    columns: usize,
    elem: usize,
    ty: MPSDataType,
) -> std::result::Result<Retained<MPSMatrix>, String> {
    // SAFETY: the caller's contract: a live `id<MTLBuffer>`; retaining keeps it alive for as
    // long as this function uses it (the MPSMatrix retains it too).
    let buffer =
        unsafe { Retained::retain(buffer.as_ptr().cast::<ProtocolObject<dyn MTLBuffer>>()) }
            .ok_or("ops::matmul: a null MTLBuffer")?;
    // SAFETY: plain class method; rowBytes is a multiple of the element size.
    let desc = unsafe {
        MPSMatrixDescriptor::matrixDescriptorWithRows_columns_rowBytes_dataType(
            rows,
            columns,
            columns * elem,
            ty,
        )
    };
    // SAFETY: the buffer holds the descriptor's (rows - 1) * rowBytes + columns * elem bytes
    // from `offset` (the caller's contract), and stays alive while the work runs (the matrix
    // retains it; the external-work contract keeps its memory unreused until the fence).
    Ok(unsafe {
        MPSMatrix::initWithBuffer_offset_descriptor(MPSMatrix::alloc(), &buffer, offset, &desc)
    })
}

/// Creates the kernel and the three matrices and encodes the product.
///
/// # Safety
/// `device` is a live `id<MTLDevice>`; `command_buffer` a live, uncommitted
/// `id<MTLCommandBuffer>` of that device with no encoder open; the buffers hold the elements `g`
/// names from their offsets and stay alive until the command buffer completes, the result
/// overlapping neither input.
unsafe fn encode(
    device: NativeHandle,
    command_buffer: NativeHandle,
    g: Gemm,
    a: (NativeHandle, usize),
    b: (NativeHandle, usize),
    out: (NativeHandle, usize),
) -> std::result::Result<(), String> {
    // SAFETY: the caller's contract: the device's live `id<MTLDevice>`.
    let device =
        unsafe { Retained::retain(device.as_ptr().cast::<ProtocolObject<dyn MTLDevice>>()) }
            .ok_or("ops::matmul: a null MTLDevice")?;
    // SAFETY: the caller's contract: the queue's live command buffer, not yet committed.
    let command_buffer = unsafe {
        Retained::retain(
            command_buffer
                .as_ptr()
                .cast::<ProtocolObject<dyn MTLCommandBuffer>>(),
        )
    }
    .ok_or("ops::matmul: a null MTLCommandBuffer")?;
    let (ty, elem) = match g.dtype {
        DType::F32 => (MPSDataType::Float32, 4),
        DType::F16 => (MPSDataType::Float16, 2),
        other => {
            return Err(format!(
                "ops::matmul on Metal: {other} is not supported by MPS"
            ))
        }
    };
    let (b_rows, b_cols) = match g.layout {
        Layout::KxN => (g.k, g.n),
        Layout::NxK => (g.n, g.k),
    };
    // SAFETY: the caller's contract for each buffer and its element count.
    let (left, right, result) = unsafe {
        (
            matrix(a, g.m, g.k, elem, ty)?,
            matrix(b, b_rows, b_cols, elem, ty)?,
            matrix(out, g.m, g.n, elem, ty)?,
        )
    };
    // SAFETY: a live device; the sizes are those of the matrices above. Created per call (see
    // the module's notes).
    let kernel = unsafe {
        MPSMatrixMultiplication::initWithDevice_transposeLeft_transposeRight_resultRows_resultColumns_interiorColumns_alpha_beta(
            MPSMatrixMultiplication::alloc(),
            &device,
            false,
            g.layout == Layout::NxK,
            g.m,
            g.n,
            g.k,
            1.0,
            0.0,
        )
    };
    // SAFETY: the caller's contract: an uncommitted command buffer of `device` with no encoder
    // open; the matrices hold resultRows x interiorColumns, interiorColumns x resultColumns
    // (after the transpose) and resultRows x resultColumns elements; beta = 0, so the result's
    // old contents are never read. MPS retains what the command buffer needs until it completes.
    unsafe {
        kernel.encodeToCommandBuffer_leftMatrix_rightMatrix_resultMatrix(
            &command_buffer,
            &left,
            &right,
            &result,
        )
    };
    Ok(())
}
