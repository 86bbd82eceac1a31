//! Matrix products through the platform's BLAS, run as external work on the queue's own
//! stream: [`matmul`] (`b` as `[k, n]`) and [`matmul_bt`] (`b` as a linear layer's `[n, k]`),
//! each with an `_into` form. The backends are `cpu.rs` (the `gemm` crate), `cuda.rs`
//! (cuBLAS) and `metal.rs` (MetalPerformanceShaders).

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(all(feature = "metal", target_vendor = "apple"))]
mod metal;

use super::{expect_dtype, expect_float, expect_shape, output};
use crate::backend::FillPattern;
use crate::buffer::Buffer;
use crate::dtype::DType;
use crate::epoch::Fence;
use crate::error::{Error, Result};
use crate::queue::Queue;

/// How `b` is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// `[k, n]`: `out = a @ b`.
    KxN,
    /// `[n, k]`: `out = a @ b.T` (a linear layer's weight).
    NxK,
}

/// One checked product: the sizes, the dtype of all three operands, and `b`'s layout.
#[derive(Clone, Copy, Debug)]
struct Gemm {
    m: usize,
    n: usize,
    k: usize,
    dtype: DType,
    layout: Layout,
}

impl Gemm {
    /// The submission label of a product of this dtype (when the queue handle has none).
    fn label(&self) -> &'static str {
        match self.dtype {
            DType::F32 => "unibuf_matmul_f32",
            DType::F16 => "unibuf_matmul_f16",
            _ => "unibuf_matmul_bf16",
        }
    }
}

impl std::fmt::Display for Gemm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = match self.layout {
            Layout::KxN => "b [k, n]",
            Layout::NxK => "b [n, k]",
        };
        write!(
            f,
            "{} m={} n={} k={} ({b})",
            self.dtype, self.m, self.n, self.k
        )
    }
}

/// `a @ b` into a fresh buffer: `a` `[m, k]` (or one row `[k]`), `b` `[k, n]`, the result
/// `[m, n]` (or `[n]`). Returns once queued.
///
/// Unlike the other ops this is no kernel of the registry: the product is handed to a BLAS
/// through [`Queue::external`], which orders it under the completion epochs like a launch (the
/// inputs' earlier writes are waited for, the fence is recorded on all three buffers), so an
/// upload before it and a download after it need no waits of the caller's.
///
/// | backend | library | arithmetic |
/// | --- | --- | --- |
/// | CPU | the `gemm` crate (packed SIMD kernels, threaded with rayon), on the queue's worker | f32; f16 and bf16 widened to f32 in scratch (`gemm`'s own f16 kernels round partial sums to f16) |
/// | CUDA | cuBLAS `cublasGemmEx`, loaded at run time, on the queue's stream | `CUBLAS_COMPUTE_32F` for every dtype: f32 is full FP32 (no TF32); reduced-precision split-k reductions are disallowed |
/// | Metal | MetalPerformanceShaders `MPSMatrixMultiplication`, in the queue's command buffer | f32 and f16 (MPS's own precision); bf16 is `Error::Unsupported { backend: "metal", .. }` (the MPS matrix kernel does not take it) |
///
/// Operands are row-major, contiguous views at any offset (e.g. [`Buffer::rows`]), all of one
/// dtype: f32, f16 or bf16. Products accumulate in f32 and are rounded once to the output dtype.
/// Empty products are defined as in mathematics: `k = 0` gives zeros (a fill, ordered like the
/// product), `m = 0` or `n = 0` an empty result (nothing is submitted).
///
/// Errors, before anything is submitted: `DTypeMismatch` when `b` differs from `a` in dtype,
/// `InvalidArgument` for another dtype or rank, `ShapeMismatch` when `b`'s `k` is not `a`'s last
/// dimension, `WrongDevice` for a buffer of another device, `Misaligned` for a view whose
/// address (or, on Metal, offset in its `MTLBuffer`) is not a multiple of its element size,
/// `InvalidArgument` on CUDA for a dimension above `i32::MAX`, and `Unsupported` for bf16 on
/// Metal, or on CUDA without the cuBLAS library.
///
/// ```
/// use unibuf::{ops, Device};
/// let dev = Device::open("cpu")?;
/// let q = dev.queue();
/// let a = dev.from_slice("a", &[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3])?;
/// let b = dev.from_slice("b", &[1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0], &[3, 2])?;
/// let c = ops::matmul(&q, &a, &b)?;
/// assert_eq!(q.download::<f32>(&c)?, [4.0, 5.0, 10.0, 11.0]);
/// // The same product with the weight stored [n, k], as a linear layer keeps it.
/// let w = dev.from_slice("w", &[1.0f32, 0.0, 1.0, 0.0, 1.0, 1.0], &[2, 3])?;
/// assert_eq!(q.download::<f32>(&ops::matmul_bt(&q, &a, &w)?)?, [4.0, 5.0, 10.0, 11.0]);
/// # Ok::<(), unibuf::Error>(())
/// ```
pub fn matmul(q: &Queue, a: &Buffer, b: &Buffer) -> Result<Buffer> {
    product(q, a, b, Layout::KxN)
}

/// [`matmul`] into `out` (the dtype of `a`, shape `[m, n]`, or `[n]` for a 1-D `a`), which
/// must not overlap `a` or `b` and must be writable. Returns the fence of the submission.
///
/// Errors as for [`matmul`], plus `DTypeMismatch` / `ShapeMismatch` for `out`,
/// `InvalidArgument` when `out` overlaps an input and `ReadOnly` for read-only memory.
pub fn matmul_into(q: &Queue, a: &Buffer, b: &Buffer, out: &Buffer) -> Result<Fence> {
    product_into(q, a, b, out, Layout::KxN)
}

/// `a @ b.T` with `b` stored `[n, k]`, as a linear layer keeps its weight (PyTorch's
/// `F.linear(a, b)`, `x @ W.T`), into a fresh buffer `[m, n]` (or `[n]`). Otherwise as
/// [`matmul`].
pub fn matmul_bt(q: &Queue, a: &Buffer, b: &Buffer) -> Result<Buffer> {
    product(q, a, b, Layout::NxK)
}

/// [`matmul_bt`] into `out`, with the rules of [`matmul_into`].
pub fn matmul_bt_into(q: &Queue, a: &Buffer, b: &Buffer, out: &Buffer) -> Result<Fence> {
    product_into(q, a, b, out, Layout::NxK)
}

fn product(q: &Queue, a: &Buffer, b: &Buffer, layout: Layout) -> Result<Buffer> {
    let g = check_inputs(q, a, b, layout)?;
    check_backend(q, &g)?;
    let out = output(q, "matmul", g.dtype, &out_shape(a, &g))?;
    submit(q, a, b, &out, g)?;
    Ok(out)
}

fn product_into(q: &Queue, a: &Buffer, b: &Buffer, out: &Buffer, layout: Layout) -> Result<Fence> {
    let g = check_inputs(q, a, b, layout)?;
    check_output(q, a, b, out, &g)?;
    check_backend(q, &g)?;
    submit(q, a, b, out, g)
}

/// `[m, n]`, or `[n]` for a 1-D `a`.
fn out_shape(a: &Buffer, g: &Gemm) -> Vec<usize> {
    if a.shape().len() == 1 {
        vec![g.n]
    } else {
        vec![g.m, g.n]
    }
}

/// Validates `a` and `b`: device, dtype, rank, inner dimension, alignment.
fn check_inputs(q: &Queue, a: &Buffer, b: &Buffer, layout: Layout) -> Result<Gemm> {
    q.check_buffer("matmul: a", a)?;
    q.check_buffer("matmul: b", b)?;
    expect_float("matmul: a", a)?;
    expect_dtype("matmul: b", b, a.dtype())?;
    let (m, k) = match *a.shape() {
        [k] => (1, k),
        [m, k] => (m, k),
        _ => {
            return Err(Error::invalid(
                "matmul: a",
                format!(
                    "'{}' has shape {:?}: a is a matrix [m, k] or one row [k]",
                    a.label(),
                    a.shape()
                ),
            ))
        }
    };
    let [rows, cols] = *b.shape() else {
        return Err(Error::invalid(
            "matmul: b",
            format!(
                "'{}' has shape {:?}: b is a matrix ({})",
                b.label(),
                b.shape(),
                match layout {
                    Layout::KxN => "[k, n]",
                    Layout::NxK => "[n, k]",
                }
            ),
        ));
    };
    let (b_k, n) = match layout {
        Layout::KxN => (rows, cols),
        Layout::NxK => (cols, rows),
    };
    if b_k != k {
        return Err(Error::ShapeMismatch {
            what: "matmul: b (its k must be a's last dimension)",
            expected: match layout {
                Layout::KxN => format!("[{k}, n]"),
                Layout::NxK => format!("[n, {k}]"),
            },
            got: format!("{:?}", b.shape()),
        });
    }
    check_aligned("matmul: a address", a)?;
    check_aligned("matmul: b address", b)?;
    Ok(Gemm {
        m,
        n,
        k,
        dtype: a.dtype(),
        layout,
    })
}

/// Validates the output of the `_into` forms: device, dtype, shape, writability, alignment and
/// no overlap with an input.
fn check_output(q: &Queue, a: &Buffer, b: &Buffer, out: &Buffer, g: &Gemm) -> Result<()> {
    q.check_buffer("matmul: out", out)?;
    expect_dtype("matmul: out", out, g.dtype)?;
    expect_shape("matmul: out", out, &out_shape(a, g))?;
    if !out.is_writable() {
        return Err(Error::ReadOnly {
            what: "matmul",
            label: out.label().to_owned(),
        });
    }
    check_aligned("matmul: out address", out)?;
    for (name, input) in [("a", a), ("b", b)] {
        if overlaps(out, input) {
            return Err(Error::invalid(
                "matmul: out",
                format!(
                    "the output (bytes {}..{} of '{}') overlaps input {name} (bytes {}..{}): \
                     the product cannot run in place",
                    out.byte_offset(),
                    out.byte_offset() + out.byte_len(),
                    out.label(),
                    input.byte_offset(),
                    input.byte_offset() + input.byte_len()
                ),
            ));
        }
    }
    Ok(())
}

/// Whether two views share bytes (empty views share none).
fn overlaps(x: &Buffer, y: &Buffer) -> bool {
    let (xs, ys) = (x.byte_offset(), y.byte_offset());
    x.shares_memory_with(y) && xs < ys + y.byte_len() && ys < xs + x.byte_len()
}

/// The BLAS reads elements in place: each view must start on a multiple of its element size
/// (always true of allocations and typed views; possible for wrapped byte memory).
fn check_aligned(what: &'static str, b: &Buffer) -> Result<()> {
    let size = b.dtype().size();
    let addr = b.device_address();
    if !addr.is_multiple_of(size as u64) {
        return Err(Error::Misaligned {
            what,
            value: addr as usize,
            align: size,
        });
    }
    Ok(())
}

/// Whether the queue's backend can run the product: Metal takes f32 and f16 only; CUDA needs
/// the cuBLAS library and dimensions that fit its `int`s.
fn check_backend(q: &Queue, g: &Gemm) -> Result<()> {
    match q.device().info().backend {
        "cpu" => Ok(()),
        #[cfg(feature = "cuda")]
        "cuda" => cuda::check(g),
        #[cfg(all(feature = "metal", target_vendor = "apple"))]
        "metal" => metal::check(g),
        backend => Err(Error::Unsupported {
            backend,
            what: format!(
                "ops::matmul ({g}): no BLAS is wired up on {backend}; use the CPU, CUDA or \
                 Metal backend"
            ),
        }),
    }
}

/// Submits the checked product (the backend checked by [`check_backend`]): the backend's BLAS,
/// or a zero fill for `k = 0`.
fn submit(q: &Queue, a: &Buffer, b: &Buffer, out: &Buffer, g: Gemm) -> Result<Fence> {
    let labelled;
    let q = if q.label().is_some() {
        q
    } else {
        labelled = q.labelled(g.label());
        &labelled
    };
    if out.is_empty() {
        return Ok(q.done_fence());
    }
    if g.k == 0 {
        // An empty sum: every element is 0, and all-zero bytes are 0.0 in f32, f16 and bf16.
        return q.fill_async(out, FillPattern::u8(0));
    }
    #[cfg(feature = "cuda")]
    if q.device().info().backend == "cuda" {
        return cuda::submit(q, a, b, out, g);
    }
    #[cfg(all(feature = "metal", target_vendor = "apple"))]
    if q.device().info().backend == "metal" {
        return metal::submit(q, a, b, out, g);
    }
    cpu::submit(q, a, b, out, g)
}
