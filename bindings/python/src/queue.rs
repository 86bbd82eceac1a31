//! `unibuf.Queue` and `unibuf.Fence`: ordered work on a device, and points in it.

use crate::buffer::PyBuffer;
use crate::device::{Handle, PyDevice};
use crate::errors::{invalid, UbError, UbResult};
use crate::host;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::sync::Arc;
use unibuf::{DType, Fence, FillPattern, Queue};

/// A point in one queue's work: complete once the queue has run everything submitted before
/// it. Returned by asynchronous calls and by the ``*_into`` ops; wait with ``Queue.wait``.
#[pyclass(name = "Fence", module = "unibuf", frozen, eq, hash)]
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PyFence {
    pub(crate) fence: Fence,
}

#[pymethods]
impl PyFence {
    /// The device's id.
    #[getter]
    fn device(&self) -> u64 {
        self.fence.device
    }

    /// The queue's number on its device.
    #[getter]
    fn queue(&self) -> u32 {
        self.fence.queue.0
    }

    /// The epoch on that queue (0: complete from the start).
    #[getter]
    fn epoch(&self) -> u64 {
        self.fence.epoch
    }

    fn __repr__(&self) -> String {
        format!(
            "Fence(device={}, queue={}, epoch={})",
            self.fence.device, self.fence.queue.0, self.fence.epoch
        )
    }
}

impl From<Fence> for PyFence {
    fn from(fence: Fence) -> PyFence {
        PyFence { fence }
    }
}

/// A queue of a device: transfers, fills and ops run on it in order. A label names its
/// submissions in the stats, faults and traces (``queue.labelled("decode")``).
#[pyclass(name = "Queue", module = "unibuf", frozen)]
pub struct PyQueue {
    pub(crate) h: Arc<Handle>,
    pub(crate) q: Queue,
}

impl PyQueue {
    pub fn new(h: Arc<Handle>, q: Queue) -> PyQueue {
        PyQueue { h, q }
    }

    /// The queue, unless its device was closed.
    pub fn get(&self, what: &'static str) -> UbResult<&Queue> {
        self.h.get(what)?;
        Ok(&self.q)
    }
}

/// The fill pattern of `value` in `dtype`: the value converted as NumPy's `astype` would,
/// refused where it does not fit an integer dtype.
fn pattern(dtype: DType, value: &Bound<'_, PyAny>) -> UbResult<FillPattern> {
    use half::{bf16, f16};
    let float = || -> UbResult<f64> {
        value
            .extract::<f64>()
            .map_err(|_| invalid("fill value", format!("{value} is not a number")))
    };
    let int = |lo: i128, hi: i128| -> UbResult<i128> {
        let v = value.extract::<i128>().map_err(|_| {
            invalid(
                "fill value",
                format!("{value} is not an integer, as {dtype} needs"),
            )
        })?;
        if v < lo || v > hi {
            return Err(invalid(
                "fill value",
                format!("{v} does not fit {dtype} ({lo}..={hi})"),
            ));
        }
        Ok(v)
    };
    Ok(match dtype {
        DType::F16 => FillPattern::of(f16::from_f64(float()?)),
        DType::BF16 => FillPattern::of(bf16::from_f64(float()?)),
        DType::F32 => FillPattern::of(float()? as f32),
        DType::F64 => FillPattern::of(float()?),
        DType::I8 => FillPattern::of(int(i8::MIN.into(), i8::MAX.into())? as i8),
        DType::U8 => FillPattern::of(int(0, u8::MAX.into())? as u8),
        DType::I16 => FillPattern::of(int(i16::MIN.into(), i16::MAX.into())? as i16),
        DType::U16 => FillPattern::of(int(0, u16::MAX.into())? as u16),
        DType::I32 => FillPattern::of(int(i32::MIN.into(), i32::MAX.into())? as i32),
        DType::U32 => FillPattern::of(int(0, u32::MAX.into())? as u32),
        DType::I64 => FillPattern::of(int(i64::MIN.into(), i64::MAX.into())? as i64),
        DType::U64 => FillPattern::of(int(0, u64::MAX.into())? as u64),
        other => {
            return Err(invalid(
                "fill",
                format!("no fill pattern for dtype {other}"),
            ))
        }
    })
}

#[pymethods]
impl PyQueue {
    /// The device this queue belongs to.
    #[getter]
    fn device(&self) -> PyDevice {
        PyDevice::from_handle(self.h.clone())
    }

    /// The queue's label, or None for the unlabelled default.
    #[getter]
    fn label(&self) -> Option<String> {
        self.q.label().map(str::to_owned)
    }

    /// The queue's number on its device (fences name it).
    #[getter]
    fn id(&self) -> u32 {
        self.q.id().0
    }

    /// A handle of the same queue whose submissions carry ``label``.
    fn labelled(&self, label: &str) -> PyQueue {
        PyQueue::new(self.h.clone(), self.q.labelled(label))
    }

    /// Copies host data into ``dst`` and returns once the data is on the device (the source
    /// may then be reused). ``src`` is ``bytes`` or a host DLPack object (a NumPy array, a CPU
    /// tensor) of ``dst``'s dtype and element count, C-contiguous. Staged where the hardware
    /// needs it; the GIL is released while it runs.
    fn upload(&self, py: Python<'_>, dst: &PyBuffer, src: &Bound<'_, PyAny>) -> PyResult<()> {
        let q = self.get("Queue.upload")?;
        let b = dst.get("Queue.upload")?;
        let data = host::HostData::read(src, "Queue.upload")?;
        data.upload(py, q, b)?;
        Ok(())
    }

    /// The contents of ``src`` as ``bytes`` (blocks without the GIL until the work writing
    /// it is done).
    fn download<'py>(&self, py: Python<'py>, src: &PyBuffer) -> PyResult<Bound<'py, PyBytes>> {
        let q = self.get("Queue.download")?;
        let b = src.get("Queue.download")?;
        let bytes = b.cast(DType::U8).map_err(UbError::from)?;
        let v = crate::site::detach(py, || q.download::<u8>(&bytes)).map_err(UbError::from)?;
        Ok(PyBytes::new(py, &v))
    }

    /// Copies ``src`` into ``out``, a writable C-contiguous host DLPack object (a NumPy
    /// array) of its dtype and element count. Blocks without the GIL until done.
    fn download_into(
        &self,
        py: Python<'_>,
        src: &PyBuffer,
        out: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let q = self.get("Queue.download_into")?;
        let b = src.get("Queue.download_into")?;
        let mut data = host::HostData::read(out, "Queue.download_into")?;
        data.download_into(py, q, b)?;
        Ok(())
    }

    /// Copies ``src`` into ``dst`` (same dtype and length) on the device and waits for it
    /// (without the GIL); ``copy_async`` returns at once with a fence.
    fn copy(&self, py: Python<'_>, src: &PyBuffer, dst: &PyBuffer) -> UbResult<()> {
        let q = self.get("Queue.copy")?;
        let (s, d) = (src.get("Queue.copy")?, dst.get("Queue.copy")?);
        crate::site::detach(py, || q.copy(s, d))?;
        Ok(())
    }

    /// Queues a device copy of ``src`` into ``dst`` and returns its fence at once.
    fn copy_async(&self, py: Python<'_>, src: &PyBuffer, dst: &PyBuffer) -> UbResult<PyFence> {
        let q = self.get("Queue.copy_async")?;
        let (s, d) = (src.get("Queue.copy_async")?, dst.get("Queue.copy_async")?);
        Ok(crate::site::scoped(py, || q.copy_async(s, d))?.into())
    }

    /// Fills ``dst`` with ``value`` (converted to its dtype) and waits.
    fn fill(&self, py: Python<'_>, dst: &PyBuffer, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let q = self.get("Queue.fill")?;
        let b = dst.get("Queue.fill")?;
        let p = pattern(b.dtype(), value)?;
        crate::site::detach(py, || q.fill(b, p)).map_err(UbError::from)?;
        Ok(())
    }

    /// Queues a fill of ``dst`` with ``value`` and returns its fence at once.
    fn fill_async(
        &self,
        py: Python<'_>,
        dst: &PyBuffer,
        value: &Bound<'_, PyAny>,
    ) -> PyResult<PyFence> {
        let q = self.get("Queue.fill_async")?;
        let b = dst.get("Queue.fill_async")?;
        let p = pattern(b.dtype(), value)?;
        Ok(crate::site::scoped(py, || q.fill_async(b, p))
            .map_err(UbError::from)?
            .into())
    }

    /// Blocks (without the GIL) until ``fence`` completes.
    fn wait(&self, py: Python<'_>, fence: &PyFence) -> UbResult<()> {
        let q = self.get("Queue.wait")?;
        let f = fence.fence;
        py.detach(|| q.wait(f))?;
        Ok(())
    }

    /// Blocks (without the GIL) until everything submitted to this queue completes.
    fn drain(&self, py: Python<'_>) -> UbResult<()> {
        let q = self.get("Queue.drain")?;
        py.detach(|| q.drain())?;
        Ok(())
    }

    /// The fence of the last submission to this queue.
    fn last_fence(&self) -> PyFence {
        self.q.last_fence().into()
    }

    /// The native queue as an integer: the ``CUstream`` on CUDA (for
    /// ``torch.cuda.ExternalStream``), the ``MTLCommandQueue`` on Metal, 0 on the CPU.
    fn native(&self) -> UbResult<usize> {
        let q = self.get("Queue.native")?;
        Ok(match q.native()? {
            unibuf::interop::NativeQueue::Cuda { stream, .. } => stream.addr(),
            unibuf::interop::NativeQueue::Metal { command_queue, .. } => command_queue.addr(),
            _ => 0,
        })
    }

    /// Makes this queue's later work wait, device-side, for everything enqueued so far on a
    /// foreign CUDA stream (a ``CUstream`` as an integer, e.g.
    /// ``torch.cuda.current_stream().cuda_stream``). Returns the wait's fence.
    ///
    /// The stream must be a live stream of this device's context; 0 is the legacy default
    /// stream.
    fn wait_cuda_stream(&self, stream: usize) -> UbResult<PyFence> {
        let q = self.get("Queue.wait_cuda_stream")?;
        // 0 is the legacy default stream (PyTorch's handle of it), CU_STREAM_LEGACY to the driver.
        let stream = if stream == 0 { 0x1 } else { stream };
        let s = unibuf::interop::ForeignSignal::CudaStream(
            unibuf::interop::NativeHandle::from_addr(stream),
        );
        // SAFETY: `wait_foreign` needs a live CUstream of this device's context; the Python
        // caller passes one (as the DLPack stream protocol trusts its caller), and a non-CUDA
        // device refuses the signal before touching the handle.
        Ok(unsafe { q.wait_foreign(s) }?.into())
    }

    fn __repr__(&self) -> String {
        format!(
            "Queue(device={}, id={}, label={:?})",
            self.h.device_id(),
            self.q.id().0,
            self.q.label()
        )
    }
}
