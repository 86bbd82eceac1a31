//! `unibuf.ops`: the fused inference primitives, one thin function per Rust op.
//!
//! Each op has the two Rust forms: `op(queue, ...)` returns a fresh output buffer (the op is
//! queued, not waited for), `op_into(queue, ..., out)` writes the caller's buffer and returns
//! the submission's `Fence`. Arithmetic is in f32 whatever the storage dtype. Launches do not
//! block, so they keep the GIL (releasing it would cost more than the launch).

use crate::buffer::PyBuffer;
use crate::device::PyDevice;
use crate::errors::{invalid, UbError, UbResult};
use crate::host::HostData;
use crate::queue::{PyFence, PyQueue};
use pyo3::prelude::*;
use unibuf::ops::{self, GgmlMatrix, Q4Matrix, Q8Activations, RopeStyle, Sampling};
use unibuf::Buffer;

/// A buffer argument, unless its device was closed.
fn arg<'a>(b: &'a PyBuffer, what: &'static str) -> UbResult<&'a Buffer> {
    b.get(what)
}

/// A fresh output buffer of the queue's device.
fn out(q: &PyQueue, b: Buffer) -> PyBuffer {
    PyBuffer::new(q.h.clone(), b)
}

/// RMSNorm of each row of ``x`` (last dimension) times ``weight`` (``[hidden]``):
/// ``x / sqrt(mean(x^2) + eps) * weight``, in x's dtype.
#[pyfunction]
#[pyo3(signature = (queue, x, weight, eps=1e-6))]
pub fn rms_norm(queue: &PyQueue, x: &PyBuffer, weight: &PyBuffer, eps: f32) -> UbResult<PyBuffer> {
    let q = queue.get("ops.rms_norm")?;
    let y = ops::rms_norm(
        q,
        arg(x, "ops.rms_norm")?,
        arg(weight, "ops.rms_norm")?,
        eps,
    )?;
    Ok(out(queue, y))
}

/// ``rms_norm`` into ``out`` (x's dtype and shape); returns the fence.
#[pyfunction]
#[pyo3(signature = (queue, x, weight, out, eps=1e-6))]
pub fn rms_norm_into(
    queue: &PyQueue,
    x: &PyBuffer,
    weight: &PyBuffer,
    out: &PyBuffer,
    eps: f32,
) -> UbResult<PyFence> {
    let w = "ops.rms_norm_into";
    let q = queue.get(w)?;
    Ok(ops::rms_norm_into(q, arg(x, w)?, arg(weight, w)?, eps, arg(out, w)?)?.into())
}

/// The residual add fused with the norm after it: returns ``(normed, sum)`` with
/// ``sum = x + residual`` (rounded to the dtype) and ``normed = rms_norm(sum, weight, eps)``.
#[pyfunction]
#[pyo3(signature = (queue, x, residual, weight, eps=1e-6))]
pub fn rms_norm_residual(
    queue: &PyQueue,
    x: &PyBuffer,
    residual: &PyBuffer,
    weight: &PyBuffer,
    eps: f32,
) -> UbResult<(PyBuffer, PyBuffer)> {
    let w = "ops.rms_norm_residual";
    let q = queue.get(w)?;
    let (n, s) = ops::rms_norm_residual(q, arg(x, w)?, arg(residual, w)?, arg(weight, w)?, eps)?;
    Ok((out(queue, n), out(queue, s)))
}

/// ``rms_norm_residual`` into ``normed_out`` and ``sum_out``; returns the fence.
#[pyfunction]
#[pyo3(signature = (queue, x, residual, weight, normed_out, sum_out, eps=1e-6))]
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_residual_into(
    queue: &PyQueue,
    x: &PyBuffer,
    residual: &PyBuffer,
    weight: &PyBuffer,
    normed_out: &PyBuffer,
    sum_out: &PyBuffer,
    eps: f32,
) -> UbResult<PyFence> {
    let w = "ops.rms_norm_residual_into";
    let q = queue.get(w)?;
    Ok(ops::rms_norm_residual_into(
        q,
        arg(x, w)?,
        arg(residual, w)?,
        arg(weight, w)?,
        eps,
        arg(normed_out, w)?,
        arg(sum_out, w)?,
    )?
    .into())
}

/// Softmax of each row (last dimension), computed stably in f32.
#[pyfunction]
pub fn softmax(queue: &PyQueue, x: &PyBuffer) -> UbResult<PyBuffer> {
    let q = queue.get("ops.softmax")?;
    Ok(out(queue, ops::softmax(q, arg(x, "ops.softmax")?)?))
}

/// ``softmax`` into ``out``; returns the fence.
#[pyfunction]
pub fn softmax_into(queue: &PyQueue, x: &PyBuffer, out: &PyBuffer) -> UbResult<PyFence> {
    let w = "ops.softmax_into";
    Ok(ops::softmax_into(queue.get(w)?, arg(x, w)?, arg(out, w)?)?.into())
}

/// SwiGLU: ``silu(gate) * up`` elementwise (same dtype and shape).
#[pyfunction]
pub fn swiglu(queue: &PyQueue, gate: &PyBuffer, up: &PyBuffer) -> UbResult<PyBuffer> {
    let w = "ops.swiglu";
    Ok(out(
        queue,
        ops::swiglu(queue.get(w)?, arg(gate, w)?, arg(up, w)?)?,
    ))
}

/// ``swiglu`` into ``out``; returns the fence.
#[pyfunction]
pub fn swiglu_into(
    queue: &PyQueue,
    gate: &PyBuffer,
    up: &PyBuffer,
    out: &PyBuffer,
) -> UbResult<PyFence> {
    let w = "ops.swiglu_into";
    Ok(ops::swiglu_into(queue.get(w)?, arg(gate, w)?, arg(up, w)?, arg(out, w)?)?.into())
}

fn rope_style(style: &str) -> UbResult<RopeStyle> {
    match style {
        "neox" => Ok(RopeStyle::Neox),
        "interleaved" => Ok(RopeStyle::Interleaved),
        _ => Err(invalid(
            "rope style",
            format!(
                "'{style}' is not a style (neox: rotate-half, as Llama; interleaved: as GPT-J)"
            ),
        )),
    }
}

/// Rotary embedding of ``x`` (``[tokens, heads, head_dim]``) at ``positions`` (uint32
/// ``[tokens]``). ``style``: "neox" (rotate-half, Llama) or "interleaved" (GPT-J).
#[pyfunction]
#[pyo3(signature = (queue, x, positions, theta_base=10000.0, style="neox"))]
pub fn rope(
    queue: &PyQueue,
    x: &PyBuffer,
    positions: &PyBuffer,
    theta_base: f32,
    style: &str,
) -> UbResult<PyBuffer> {
    let w = "ops.rope";
    let s = rope_style(style)?;
    Ok(out(
        queue,
        ops::rope(queue.get(w)?, arg(x, w)?, arg(positions, w)?, theta_base, s)?,
    ))
}

/// ``rope`` into ``out``; returns the fence.
#[pyfunction]
#[pyo3(signature = (queue, x, positions, out, theta_base=10000.0, style="neox"))]
pub fn rope_into(
    queue: &PyQueue,
    x: &PyBuffer,
    positions: &PyBuffer,
    out: &PyBuffer,
    theta_base: f32,
    style: &str,
) -> UbResult<PyFence> {
    let w = "ops.rope_into";
    let s = rope_style(style)?;
    Ok(ops::rope_into(
        queue.get(w)?,
        arg(x, w)?,
        arg(positions, w)?,
        theta_base,
        s,
        arg(out, w)?,
    )?
    .into())
}

/// ``a @ b`` (``[m, k] @ [k, n]``; float32, float16 or bfloat16, f32 accumulation) through
/// the backend's BLAS: gemm on the CPU, cuBLAS on CUDA, MPS on Metal.
#[pyfunction]
pub fn matmul(queue: &PyQueue, a: &PyBuffer, b: &PyBuffer) -> UbResult<PyBuffer> {
    let w = "ops.matmul";
    Ok(out(
        queue,
        ops::matmul(queue.get(w)?, arg(a, w)?, arg(b, w)?)?,
    ))
}

/// ``matmul`` into ``out`` (``[m, n]``); returns the fence.
#[pyfunction]
pub fn matmul_into(
    queue: &PyQueue,
    a: &PyBuffer,
    b: &PyBuffer,
    out: &PyBuffer,
) -> UbResult<PyFence> {
    let w = "ops.matmul_into";
    Ok(ops::matmul_into(queue.get(w)?, arg(a, w)?, arg(b, w)?, arg(out, w)?)?.into())
}

/// ``a @ b.T`` (``[m, k] @ [n, k].T``: weights stored as PyTorch's ``Linear`` stores them).
#[pyfunction]
pub fn matmul_bt(queue: &PyQueue, a: &PyBuffer, b: &PyBuffer) -> UbResult<PyBuffer> {
    let w = "ops.matmul_bt";
    Ok(out(
        queue,
        ops::matmul_bt(queue.get(w)?, arg(a, w)?, arg(b, w)?)?,
    ))
}

/// ``matmul_bt`` into ``out``; returns the fence.
#[pyfunction]
pub fn matmul_bt_into(
    queue: &PyQueue,
    a: &PyBuffer,
    b: &PyBuffer,
    out: &PyBuffer,
) -> UbResult<PyFence> {
    let w = "ops.matmul_bt_into";
    Ok(ops::matmul_bt_into(queue.get(w)?, arg(a, w)?, arg(b, w)?, arg(out, w)?)?.into())
}

fn sampling(temperature: f32, top_k: u32, top_p: f32, seed: u64) -> UbResult<Sampling> {
    let s = Sampling {
        temperature,
        top_k,
        top_p,
        seed,
    };
    s.validate()?;
    Ok(s)
}

/// Samples one token per row of ``logits`` (``[vocab]`` or ``[rows, vocab]``) on the
/// device into a uint32 ``[rows]`` buffer. ``temperature=0`` is greedy (argmax, ties to the
/// lower id); ``top_k`` (0: the kernel's maximum, 1024) and ``top_p`` restrict the
/// candidates; ``(seed, step, row)`` fixes the draw.
#[pyfunction]
#[pyo3(signature = (queue, logits, *, temperature=1.0, top_k=0, top_p=1.0, seed=0, step=0))]
#[allow(clippy::too_many_arguments)]
pub fn sample(
    queue: &PyQueue,
    logits: &PyBuffer,
    temperature: f32,
    top_k: u32,
    top_p: f32,
    seed: u64,
    step: u64,
) -> UbResult<PyBuffer> {
    let w = "ops.sample";
    let s = sampling(temperature, top_k, top_p, seed)?;
    Ok(out(
        queue,
        ops::sample(queue.get(w)?, arg(logits, w)?, &s, step)?,
    ))
}

/// ``sample`` into ``out`` (uint32 ``[rows]``); returns the fence.
#[pyfunction]
#[pyo3(signature = (queue, logits, out, *, temperature=1.0, top_k=0, top_p=1.0, seed=0, step=0))]
#[allow(clippy::too_many_arguments)]
pub fn sample_into(
    queue: &PyQueue,
    logits: &PyBuffer,
    out: &PyBuffer,
    temperature: f32,
    top_k: u32,
    top_p: f32,
    seed: u64,
    step: u64,
) -> UbResult<PyFence> {
    let w = "ops.sample_into";
    let s = sampling(temperature, top_k, top_p, seed)?;
    Ok(ops::sample_into(queue.get(w)?, arg(logits, w)?, &s, step, arg(out, w)?)?.into())
}

/// Float32 values as the `bytes` of their native representation (`numpy.frombuffer(b, "float32")`).
fn f32_bytes<'py>(py: Python<'py>, w: &[f32]) -> Bound<'py, pyo3::types::PyBytes> {
    let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_ne_bytes()).collect();
    pyo3::types::PyBytes::new(py, &bytes)
}

/// A 4-bit group-quantised matrix (``rows x cols``, one f16 scale per ``group`` weights of a
/// row): packed uint8 codes ``[rows, cols / 2]`` and float16 scales ``[rows, cols / group]``.
///
/// ``Q4Matrix(packed, scales, rows, cols, group)`` makes one over existing buffers (views at
/// any offset), checked against the geometry; ``Q4Matrix.quantize`` quantises weights.
#[pyclass(name = "Q4Matrix", module = "unibuf.ops", frozen)]
pub struct PyQ4Matrix {
    pub(crate) device: PyDevice,
    pub(crate) m: Q4Matrix,
}

#[pymethods]
impl PyQ4Matrix {
    #[new]
    fn new(
        packed: &PyBuffer,
        scales: &PyBuffer,
        rows: usize,
        cols: usize,
        group: usize,
    ) -> UbResult<PyQ4Matrix> {
        let w = "Q4Matrix";
        let m = Q4Matrix::from_parts(
            arg(packed, w)?.clone(),
            arg(scales, w)?.clone(),
            rows,
            cols,
            group,
        )?;
        Ok(PyQ4Matrix {
            device: PyDevice::from_handle(packed.h.clone()),
            m,
        })
    }

    /// Quantises row-major float32 ``weights`` (a host array or bytes of ``rows * cols``
    /// values) on the host (scale = max|w| / 7 per group, rounded to f16) and uploads codes
    /// and scales to ``device``. ``group``: 32, 64 or 128.
    #[staticmethod]
    #[pyo3(signature = (device, weights, rows, cols, group=32, label="q4"))]
    fn quantize(
        py: Python<'_>,
        device: &PyDevice,
        weights: &Bound<'_, PyAny>,
        rows: usize,
        cols: usize,
        group: usize,
        label: &str,
    ) -> PyResult<PyQ4Matrix> {
        let dev = device.h.get("Q4Matrix.quantize")?;
        let data = HostData::read(weights, "Q4Matrix.quantize")?;
        let w = data.as_f32()?;
        let m = py
            .detach(|| Q4Matrix::quantize(dev, label, w, rows, cols, group))
            .map_err(UbError::from)?;
        Ok(PyQ4Matrix {
            device: PyDevice::from_handle(device.h.clone()),
            m,
        })
    }

    /// The packed codes, uint8 ``[rows, cols / 2]``.
    #[getter]
    fn packed(&self) -> PyBuffer {
        PyBuffer::new(self.device.h.clone(), self.m.packed().clone())
    }

    /// The scales, float16 ``[rows, cols / group]``.
    #[getter]
    fn scales(&self) -> PyBuffer {
        PyBuffer::new(self.device.h.clone(), self.m.scales().clone())
    }

    /// Rows of the matrix.
    #[getter]
    fn rows(&self) -> usize {
        self.m.rows()
    }

    /// Columns of the matrix (the length of x).
    #[getter]
    fn cols(&self) -> usize {
        self.m.cols()
    }

    /// Weights per scale: 32, 64 or 128.
    #[getter]
    fn group(&self) -> usize {
        self.m.group()
    }

    /// Bytes of codes and scales (what one matrix-vector product reads).
    #[getter]
    fn weight_bytes(&self) -> usize {
        self.m.weight_bytes()
    }

    /// The dequantised weights (row-major ``rows * cols`` float32) as ``bytes``, downloaded
    /// through ``queue`` (for references and tests; ``numpy.frombuffer(..., "float32")``).
    fn dequantize<'py>(
        &self,
        py: Python<'py>,
        queue: &PyQueue,
    ) -> UbResult<Bound<'py, pyo3::types::PyBytes>> {
        let q = queue.get("Q4Matrix.dequantize")?;
        let m = &self.m;
        let w = py.detach(|| m.dequantize_host(q))?;
        Ok(f32_bytes(py, &w))
    }

    fn __repr__(&self) -> String {
        format!(
            "Q4Matrix(rows={}, cols={}, group={})",
            self.m.rows(),
            self.m.cols(),
            self.m.group()
        )
    }
}

/// Activations quantised to int8 in blocks of 32 (per-block f32 scales and sums), the input
/// of ``q4_matvec_q8``. Allocate once with ``Q8Activations.alloc`` and refill with
/// ``quantize_activations_into`` at every step.
#[pyclass(name = "Q8Activations", module = "unibuf.ops", frozen)]
pub struct PyQ8Activations {
    device: PyDevice,
    a: Q8Activations,
}

#[pymethods]
impl PyQ8Activations {
    /// Buffers for activations of shape ``x_shape`` (``[cols]`` or ``[batch, cols]``, ``cols``
    /// a multiple of 32), uninitialised.
    #[staticmethod]
    #[pyo3(signature = (device, x_shape, label="q8"))]
    fn alloc(device: &PyDevice, x_shape: Vec<usize>, label: &str) -> UbResult<PyQ8Activations> {
        let dev = device.h.get("Q8Activations.alloc")?;
        Ok(PyQ8Activations {
            device: PyDevice::from_handle(device.h.clone()),
            a: Q8Activations::alloc(dev, label, &x_shape)?,
        })
    }

    /// The int8 values ``[batch, cols]`` (in the kernels' order within each block).
    #[getter]
    fn values(&self) -> PyBuffer {
        PyBuffer::new(self.device.h.clone(), self.a.values().clone())
    }

    /// The per-block sums, int32 ``[batch, cols / 32]``.
    #[getter]
    fn sums(&self) -> PyBuffer {
        PyBuffer::new(self.device.h.clone(), self.a.sums().clone())
    }

    /// The per-block scales, float32 ``[batch, cols / 32]``.
    #[getter]
    fn scales(&self) -> PyBuffer {
        PyBuffer::new(self.device.h.clone(), self.a.scales().clone())
    }

    /// Rows of activations (1 for a 1-D x).
    #[getter]
    fn batch(&self) -> usize {
        self.a.batch()
    }

    /// Values per row.
    #[getter]
    fn cols(&self) -> usize {
        self.a.cols()
    }
}

/// ``m @ x`` for a ``Q4Matrix`` and ``x`` of ``[cols]`` or ``[batch, cols]`` (batch up to
/// 8; float32, float16 or bfloat16) into float32 ``[rows]`` / ``[batch, rows]``.
#[pyfunction]
pub fn q4_matvec(queue: &PyQueue, m: &PyQ4Matrix, x: &PyBuffer) -> UbResult<PyBuffer> {
    let w = "ops.q4_matvec";
    m.device.h.get(w)?;
    Ok(out(queue, ops::q4_matvec(queue.get(w)?, &m.m, arg(x, w)?)?))
}

/// ``q4_matvec`` into ``out``; returns the fence.
#[pyfunction]
pub fn q4_matvec_into(
    queue: &PyQueue,
    m: &PyQ4Matrix,
    x: &PyBuffer,
    out: &PyBuffer,
) -> UbResult<PyFence> {
    let w = "ops.q4_matvec_into";
    m.device.h.get(w)?;
    Ok(ops::q4_matvec_into(queue.get(w)?, &m.m, arg(x, w)?, arg(out, w)?)?.into())
}

/// Quantises ``x`` (``[cols]`` or ``[batch, cols]``) to int8 blocks on the device.
#[pyfunction]
pub fn quantize_activations(queue: &PyQueue, x: &PyBuffer) -> UbResult<PyQ8Activations> {
    let w = "ops.quantize_activations";
    let a = ops::quantize_activations(queue.get(w)?, arg(x, w)?)?;
    Ok(PyQ8Activations {
        device: PyDevice::from_handle(queue.h.clone()),
        a,
    })
}

/// ``quantize_activations`` into ``xq`` (allocated for x's shape); returns the fence.
#[pyfunction]
pub fn quantize_activations_into(
    queue: &PyQueue,
    x: &PyBuffer,
    xq: &PyQ8Activations,
) -> UbResult<PyFence> {
    let w = "ops.quantize_activations_into";
    xq.device.h.get(w)?;
    Ok(ops::quantize_activations_into(queue.get(w)?, arg(x, w)?, &xq.a)?.into())
}

/// ``m @ x`` with int8 activations (``dp4a`` on CUDA): the fastest decode matvec.
#[pyfunction]
pub fn q4_matvec_q8(queue: &PyQueue, m: &PyQ4Matrix, xq: &PyQ8Activations) -> UbResult<PyBuffer> {
    let w = "ops.q4_matvec_q8";
    m.device.h.get(w)?;
    xq.device.h.get(w)?;
    Ok(out(queue, ops::q4_matvec_q8(queue.get(w)?, &m.m, &xq.a)?))
}

/// ``q4_matvec_q8`` into ``out``; returns the fence.
#[pyfunction]
pub fn q4_matvec_q8_into(
    queue: &PyQueue,
    m: &PyQ4Matrix,
    xq: &PyQ8Activations,
    out: &PyBuffer,
) -> UbResult<PyFence> {
    let w = "ops.q4_matvec_q8_into";
    m.device.h.get(w)?;
    xq.device.h.get(w)?;
    Ok(ops::q4_matvec_q8_into(queue.get(w)?, &m.m, &xq.a, arg(out, w)?)?.into())
}

/// A ``rows x cols`` matrix in a ggml block format ("Q8_0", "Q4_0" or "Q4_1"), as a GGUF file
/// stores it: ``bytes`` is uint8 ``[rows, bytes per row]`` (what ``weights.load`` gives for a
/// block-format tensor), read natively by ``ggml_matvec``.
///
/// ``GgmlMatrix(bytes, ggml_type, rows, cols)``; ``cols`` a multiple of 32.
#[pyclass(name = "GgmlMatrix", module = "unibuf.ops", frozen)]
pub struct PyGgmlMatrix {
    device: PyDevice,
    m: GgmlMatrix,
}

#[pymethods]
impl PyGgmlMatrix {
    #[new]
    fn new(bytes: &PyBuffer, ggml_type: &str, rows: usize, cols: usize) -> UbResult<PyGgmlMatrix> {
        use unibuf::weights::gguf::GgmlType;
        let ty = [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1]
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(ggml_type))
            .ok_or_else(|| {
                invalid(
                    "ggml_type",
                    format!("'{ggml_type}' is not a format read natively (Q8_0, Q4_0, Q4_1)"),
                )
            })?;
        let m = GgmlMatrix::new(arg(bytes, "GgmlMatrix")?.clone(), ty, rows, cols)?;
        Ok(PyGgmlMatrix {
            device: PyDevice::from_handle(bytes.h.clone()),
            m,
        })
    }

    /// The blocks, uint8 ``[rows, bytes per row]``.
    #[getter]
    fn bytes(&self) -> PyBuffer {
        PyBuffer::new(self.device.h.clone(), self.m.bytes().clone())
    }

    /// The block format's name.
    #[getter]
    fn ggml_type(&self) -> &'static str {
        self.m.ggml_type().name()
    }

    /// Rows of the matrix.
    #[getter]
    fn rows(&self) -> usize {
        self.m.rows()
    }

    /// Columns of the matrix (the length of x).
    #[getter]
    fn cols(&self) -> usize {
        self.m.cols()
    }

    /// The dequantised weights (row-major ``rows * cols`` float32) as ``bytes``, downloaded
    /// through ``queue`` (for references and tests).
    fn dequantize<'py>(
        &self,
        py: Python<'py>,
        queue: &PyQueue,
    ) -> UbResult<Bound<'py, pyo3::types::PyBytes>> {
        let q = queue.get("GgmlMatrix.dequantize")?;
        let m = &self.m;
        let w = py.detach(|| m.dequantize_host(q))?;
        Ok(f32_bytes(py, &w))
    }

    fn __repr__(&self) -> String {
        format!(
            "GgmlMatrix({}, rows={}, cols={})",
            self.m.ggml_type().name(),
            self.m.rows(),
            self.m.cols()
        )
    }
}

/// ``m @ x`` for a ``GgmlMatrix`` and ``x`` (float32, float16 or bfloat16) of ``[cols]`` or
/// ``[batch, cols]`` (batch up to 8) into float32 ``[rows]`` / ``[batch, rows]``, the blocks
/// read natively.
#[pyfunction]
pub fn ggml_matvec(queue: &PyQueue, m: &PyGgmlMatrix, x: &PyBuffer) -> UbResult<PyBuffer> {
    let w = "ops.ggml_matvec";
    m.device.h.get(w)?;
    Ok(out(
        queue,
        ops::ggml_matvec(queue.get(w)?, &m.m, arg(x, w)?)?,
    ))
}

/// ``ggml_matvec`` into ``out``; returns the fence.
#[pyfunction]
pub fn ggml_matvec_into(
    queue: &PyQueue,
    m: &PyGgmlMatrix,
    x: &PyBuffer,
    out: &PyBuffer,
) -> UbResult<PyFence> {
    let w = "ops.ggml_matvec_into";
    m.device.h.get(w)?;
    Ok(ops::ggml_matvec_into(queue.get(w)?, &m.m, arg(x, w)?, arg(out, w)?)?.into())
}

/// An embedding table: ``vocab`` rows of ``cols`` values, in a ggml block format
/// (``EmbeddingTable.blocks(m)`` of a ``GgmlMatrix``) or float32/float16/bfloat16
/// (``EmbeddingTable.rows(buf)`` of a ``[vocab, cols]`` buffer).
#[pyclass(name = "EmbeddingTable", module = "unibuf.ops", frozen)]
pub struct PyEmbeddingTable {
    device: PyDevice,
    t: ops::EmbeddingTable,
}

#[pymethods]
impl PyEmbeddingTable {
    /// A table in a ggml block format: the matrix's rows are the vocabulary.
    #[staticmethod]
    fn blocks(m: &PyGgmlMatrix) -> UbResult<PyEmbeddingTable> {
        m.device.h.get("EmbeddingTable.blocks")?;
        Ok(PyEmbeddingTable {
            device: PyDevice::from_handle(m.device.h.clone()),
            t: ops::EmbeddingTable::blocks(&m.m),
        })
    }

    /// A table of float32, float16 or bfloat16 values, ``[vocab, cols]``.
    #[staticmethod]
    fn rows(table: &PyBuffer) -> UbResult<PyEmbeddingTable> {
        let b = arg(table, "EmbeddingTable.rows")?;
        Ok(PyEmbeddingTable {
            device: PyDevice::from_handle(table.h.clone()),
            t: ops::EmbeddingTable::rows(b.clone())?,
        })
    }

    /// Rows in the table.
    #[getter]
    fn vocab(&self) -> usize {
        self.t.vocab()
    }

    /// Values per row.
    #[getter]
    fn cols(&self) -> usize {
        self.t.cols()
    }
}

/// The rows ``ids`` (uint32 ``[n]``) of ``table`` as a fresh ``[n, cols]`` buffer of
/// ``dtype`` (float32, float16 or bfloat16). An id past the vocabulary gives a row of NaN.
#[pyfunction]
#[pyo3(signature = (queue, table, ids, dtype=None))]
pub fn embed_rows(
    queue: &PyQueue,
    table: &PyEmbeddingTable,
    ids: &PyBuffer,
    dtype: Option<&Bound<'_, PyAny>>,
) -> PyResult<PyBuffer> {
    let w = "ops.embed_rows";
    table.device.h.get(w)?;
    let d = dtype
        .map(crate::dtype::extract)
        .transpose()?
        .unwrap_or(unibuf::DType::F32);
    let q = queue.get(w)?;
    let y = ops::embed_rows(q, &table.t, arg(ids, w)?, d).map_err(UbError::from)?;
    Ok(out(queue, y))
}

/// ``embed_rows`` into ``out`` (``[n, cols]``); returns the fence.
#[pyfunction]
pub fn embed_rows_into(
    queue: &PyQueue,
    table: &PyEmbeddingTable,
    ids: &PyBuffer,
    out: &PyBuffer,
) -> UbResult<PyFence> {
    let w = "ops.embed_rows_into";
    table.device.h.get(w)?;
    Ok(ops::embed_rows_into(queue.get(w)?, &table.t, arg(ids, w)?, arg(out, w)?)?.into())
}

/// Registers the ops in the `unibuf._unibuf.ops` submodule.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyQ4Matrix>()?;
    m.add_class::<PyQ8Activations>()?;
    m.add_class::<PyGgmlMatrix>()?;
    m.add_class::<PyEmbeddingTable>()?;
    macro_rules! add {
        ($($f:ident),* $(,)?) => { $( m.add_function(wrap_pyfunction!($f, m)?)?; )* };
    }
    add!(
        rms_norm,
        rms_norm_into,
        rms_norm_residual,
        rms_norm_residual_into,
        softmax,
        softmax_into,
        swiglu,
        swiglu_into,
        rope,
        rope_into,
        matmul,
        matmul_into,
        matmul_bt,
        matmul_bt_into,
        sample,
        sample_into,
        q4_matvec,
        q4_matvec_into,
        quantize_activations,
        quantize_activations_into,
        q4_matvec_q8,
        q4_matvec_q8_into,
        ggml_matvec,
        ggml_matvec_into,
        embed_rows,
        embed_rows_into,
    );
    m.add("Q4_GROUPS", ops::Q4_GROUPS.to_vec())?;
    m.add("Q4_MAX_BATCH", ops::Q4_MAX_BATCH)?;
    m.add("Q8_BLOCK", ops::Q8_BLOCK)?;
    m.add("SAMPLE_MAX_K", ops::SAMPLE_MAX_K)?;
    m.add("GGML_MAX_BATCH", ops::GGML_MAX_BATCH)?;
    Ok(())
}
