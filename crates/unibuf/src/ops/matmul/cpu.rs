//! The CPU product: the `gemm` crate, run as external work on the queue's worker thread.
//!
//! f32 goes to `gemm::gemm::<f32>` directly. f16 and bf16 are widened to f32 in scratch,
//! multiplied in f32 and narrowed once at the end:
//! - bf16: `gemm` 0.19 has no bf16 kernels at all;
//! - f16: `gemm` has f16 kernels, but they do not keep an f32 accumulator across the whole
//!   depth: their matrix-vector paths (one row of `a` with `b` as `[k, n]`, the decode shape)
//!   round the partial sums to f16 after every step of `k`, and the blocked path rounds them
//!   between its depth blocks. Measured against the exactly rounded result at k = 4096, they
//!   were off by hundreds of f16 ulps (about 1357 at m = 1, 463 at 64 x 64), where the widened
//!   path is within half an ulp. That would break this op's contract (f32 accumulation,
//!   rounded once), so f16 is widened like bf16.
//!
//! The widening is done one slab of `k` at a time into an f32 accumulator (`out` in f32), so the
//! scratch stays near [`SCRATCH_ELEMS`] elements whatever the sizes, apart from the accumulator
//! itself.

use super::{Gemm, Layout};
use crate::buffer::Buffer;
use crate::epoch::Fence;
use crate::error::{Error, Result};
use crate::interop::{NativeBuffer, NativeHandle};
use crate::queue::Queue;
use crate::DType;
use gemm::Parallelism;
use half::slice::HalfFloatSliceExt;

/// f32 elements of widened `a` and `b` per slab of `k`: 16 MiB.
const SCRATCH_ELEMS: usize = 1 << 22;

/// The fewest `k` per slab (below it the accumulator's re-reads would dominate).
const MIN_SLAB: usize = 64;

/// The host address of a view (the CPU backend's native buffers are host memory).
fn host_ptr(what: &'static str, b: &Buffer) -> Result<NativeHandle> {
    match b.native()? {
        NativeBuffer::Host { ptr, .. } => Ok(ptr),
        other => Err(Error::invalid(
            what,
            format!(
                "the CPU backend gave {other:?} for '{}', not host memory",
                b.label()
            ),
        )),
    }
}

/// Queues the product on `q`'s worker. The caller checked shapes, dtypes, alignment, that
/// `out` is writable and overlaps neither input, and that `m`, `n` and `k` are non-zero.
pub(super) fn submit(q: &Queue, a: &Buffer, b: &Buffer, out: &Buffer, g: Gemm) -> Result<Fence> {
    let pa = host_ptr("matmul: a", a)?;
    let pb = host_ptr("matmul: b", b)?;
    let po = host_ptr("matmul: out", out)?;
    q.external(&[a, b], &[out], move |_| {
        // SAFETY: the external-work contract: `a`, `b` and `out` are alive until this
        // submission's fence completes (freed memory is reused only after it), and the epochs
        // order this closure after every earlier write of `a` and `b` and every earlier use of
        // `out`, and before every later use of them, on any queue or the host. The views hold
        // m*k, k*n (or n*k) and m*n elements of `g.dtype` at element-aligned addresses (checked
        // by the op), and `out` overlaps neither input (checked), so the only writes are to
        // memory nothing else reads or writes meanwhile.
        unsafe {
            run(
                g,
                pa.as_ptr().cast_const(),
                pb.as_ptr().cast_const(),
                po.as_ptr(),
            )
        };
        Ok(())
    })
}

/// The product on host memory.
///
/// # Safety
/// `a`, `b` and `out` point to `g.m * g.k`, `g.k * g.n` and `g.m * g.n` elements of `g.dtype`,
/// element-aligned, valid for the call; `out` overlaps neither input and nothing else accesses
/// it meanwhile; nothing writes `a` or `b` meanwhile.
unsafe fn run(
    g: Gemm,
    a: *const std::ffi::c_void,
    b: *const std::ffi::c_void,
    out: *mut std::ffi::c_void,
) {
    match g.dtype {
        DType::F32 => {
            // SAFETY: the caller's contract, for f32 elements.
            unsafe { gemm_f32(g, a.cast(), b.cast(), out.cast(), false) }
        }
        DType::F16 => {
            // SAFETY: the caller's contract, for f16 elements.
            unsafe { widened::<half::f16>(g, a.cast(), b.cast(), out.cast()) }
        }
        _ => {
            // SAFETY: the caller's contract, for bf16 elements (the op takes only f32, f16 and
            // bf16).
            unsafe { widened::<half::bf16>(g, a.cast(), b.cast(), out.cast()) }
        }
    }
}

/// `out (+)= a @ b` in f32 with `gemm`, all row-major; `b` as `g.layout` says, `a` `[m, k]`
/// with rows `k` apart, `out` `[m, n]`. With `accumulate`, the product is added to `out`.
///
/// # Safety
/// The pointers cover the elements the sizes name, aligned; `out` overlaps neither input;
/// nothing else touches `out`, or writes `a` or `b`, during the call.
unsafe fn gemm_f32(g: Gemm, a: *const f32, b: *const f32, out: *mut f32, accumulate: bool) {
    let (m, n, k) = (g.m, g.n, g.k);
    // Strides in elements; views are far smaller than isize::MAX bytes, so these fit.
    let (b_rs, b_cs) = match g.layout {
        // Element (row kk, column j) of the [k, n] operand.
        Layout::KxN => (n as isize, 1),
        // The same element, read from the [n, k] storage at (j, kk).
        Layout::NxK => (1, k as isize),
    };
    // SAFETY: the caller's contract; gemm reads m*k and k*n elements at these strides and writes
    // m*n, computing dst = alpha * dst + beta * lhs @ rhs (dst read only when `accumulate`).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out,
            1,
            n as isize,
            accumulate,
            a,
            1,
            k as isize,
            b,
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::Rayon(0),
        )
    }
}

/// f16 or bf16: widened to f32 one slab of `k` at a time, accumulated in f32, narrowed once.
///
/// # Safety
/// As for [`run`], with `T` the elements' type.
unsafe fn widened<T>(g: Gemm, a: *const T, b: *const T, out: *mut T)
where
    [T]: HalfFloatSliceExt,
{
    let (m, n, k) = (g.m, g.n, g.k);
    // SAFETY: the caller's contract: m*k, k*n and m*n valid, aligned elements; `out` overlaps
    // neither input and nothing else uses the memory meanwhile, so a unique `&mut` is sound.
    let (a, b, out) = unsafe {
        (
            std::slice::from_raw_parts(a, m * k),
            std::slice::from_raw_parts(b, k * n),
            std::slice::from_raw_parts_mut(out, m * n),
        )
    };
    let slab = (SCRATCH_ELEMS / (m + n)).max(MIN_SLAB).min(k);
    let mut acc = vec![0.0f32; m * n];
    let mut a32 = vec![0.0f32; m * slab];
    let mut b32 = vec![0.0f32; slab * n];
    let mut k0 = 0;
    while k0 < k {
        let kc = slab.min(k - k0);
        // a[:, k0..k0 + kc] as [m, kc].
        for (i, dst) in a32.chunks_exact_mut(kc).take(m).enumerate() {
            a[i * k + k0..i * k + k0 + kc].convert_to_f32_slice(dst);
        }
        let layout = match g.layout {
            Layout::KxN => {
                // Rows k0..k0 + kc of b, contiguous: [kc, n].
                b[k0 * n..(k0 + kc) * n].convert_to_f32_slice(&mut b32[..kc * n]);
                Layout::KxN
            }
            Layout::NxK => {
                // b[:, k0..k0 + kc] as [n, kc]: still the [n, k] layout, with k = kc.
                for (j, dst) in b32.chunks_exact_mut(kc).take(n).enumerate() {
                    b[j * k + k0..j * k + k0 + kc].convert_to_f32_slice(dst);
                }
                Layout::NxK
            }
        };
        let slab_gemm = Gemm { k: kc, layout, ..g };
        // SAFETY: a32 holds m*kc elements, b32 kc*n, acc m*n, all owned here and distinct.
        unsafe {
            gemm_f32(
                slab_gemm,
                a32.as_ptr(),
                b32.as_ptr(),
                acc.as_mut_ptr(),
                k0 > 0,
            )
        };
        k0 += kc;
    }
    out.convert_from_f32_slice(&acc);
}
