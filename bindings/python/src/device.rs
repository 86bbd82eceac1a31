//! `unibuf.Device`: opens a backend's device; allocation, accounting, the copy audit, traces.

use crate::buffer::PyBuffer;
use crate::errors::{UbError, UbResult};
use crate::queue::{PyFence, PyQueue};
use crate::{convert, dlpack, dtype, host};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use unibuf::{Budget, Device};

/// The device a Python `Device`, and every queue and buffer made from it, share: once closed,
/// each of them refuses work with `DeviceClosedError` (their memory is freed as they are
/// collected, after the device drained).
pub struct Handle {
    device: Device,
    closed: AtomicBool,
}

impl Handle {
    pub fn new(device: Device) -> Arc<Handle> {
        Arc::new(Handle {
            device,
            closed: AtomicBool::new(false),
        })
    }

    /// The device, unless closed; `what` names the call in the error.
    pub fn get(&self, what: &'static str) -> UbResult<&Device> {
        if self.closed.load(Ordering::Acquire) {
            Err(UbError::Closed(what))
        } else {
            Ok(&self.device)
        }
    }

    /// The device's id (for messages; works after close).
    pub fn device_id(&self) -> u64 {
        self.device.id()
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// A device of one backend ("cpu", "cuda", "metal"): allocates buffers, makes queues, keeps the
/// memory accounting, the copy ledger and the submission stats.
///
/// ``Device(backend=None, *, memory_limit=None, cache_limit=None, gpu_timing=False)`` opens
/// one: ``backend`` is "cpu", "cuda" or "metal", or None for ``UNIBUF_BACKEND``, else the best
/// available. ``memory_limit`` caps the bytes the allocator holds (live plus cached),
/// ``cache_limit`` the cached bytes; ``gpu_timing`` records device time per submission on
/// CUDA (about a microsecond of host time each). Use it as a context manager, or call
/// ``close()``, to drain it and refuse further work.
#[pyclass(name = "Device", module = "unibuf", frozen)]
pub struct PyDevice {
    pub(crate) h: Arc<Handle>,
}

fn stats_dict<'py>(py: Python<'py>, s: &unibuf::MemoryStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    macro_rules! put {
        ($($f:ident),*) => { $( d.set_item(stringify!($f), s.$f)?; )* };
    }
    put!(
        active_bytes,
        active_count,
        requested_bytes,
        peak_active_bytes,
        reserved_bytes,
        peak_reserved_bytes,
        cached_bytes,
        cached_count,
        virtual_memory,
        cache_hits,
        device_allocs,
        device_frees,
        device_call_ns,
        oom_retries,
        ooms,
        external_bytes,
        external_count,
        foreign_bytes,
        foreign_count,
        staging_bytes,
        growable_bytes,
        growable_count
    );
    Ok(d)
}

impl PyDevice {
    pub fn from_handle(h: Arc<Handle>) -> PyDevice {
        PyDevice { h }
    }

    fn dev(&self, what: &'static str) -> UbResult<&Device> {
        self.h.get(what)
    }
}

#[pymethods]
impl PyDevice {
    #[new]
    #[pyo3(signature = (backend=None, *, memory_limit=None, cache_limit=None, gpu_timing=false))]
    fn new(
        py: Python<'_>,
        backend: Option<String>,
        memory_limit: Option<usize>,
        cache_limit: Option<usize>,
        gpu_timing: bool,
    ) -> PyResult<PyDevice> {
        let mut b = Device::builder().gpu_timing(gpu_timing);
        if let Some(name) = &backend {
            b = b.backend(name);
        }
        if let Some(m) = memory_limit {
            b = b.memory_limit(m);
        }
        if let Some(c) = cache_limit {
            b = b.cache_limit(c);
        }
        // Opening may load a driver and compile nothing yet; it can take a while on a GPU.
        let device = py.detach(|| b.open()).map_err(UbError::from)?;
        Ok(PyDevice {
            h: Handle::new(device),
        })
    }

    /// The device's number in this process (fences and errors name it).
    #[getter]
    fn id(&self) -> u64 {
        self.h.device.id()
    }

    /// The backend's name: "cpu", "cuda" or "metal".
    #[getter]
    fn backend(&self) -> &'static str {
        self.h.device.info().backend
    }

    /// The device's name as the driver gives it.
    #[getter]
    fn name(&self) -> String {
        self.h.device.info().name.clone()
    }

    /// Whether ``close()`` was called.
    #[getter]
    fn closed(&self) -> bool {
        self.h.is_closed()
    }

    /// What the backend reports: name, backend, unified_memory, total_memory, page_size,
    /// max_buffer_len, alloc_alignment, timestamps.
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let i = self.h.device.info();
        let d = PyDict::new(py);
        d.set_item("name", &i.name)?;
        d.set_item("backend", i.backend)?;
        d.set_item("unified_memory", i.unified_memory)?;
        d.set_item("total_memory", i.total_memory)?;
        d.set_item("page_size", i.page_size)?;
        d.set_item("max_buffer_len", i.max_buffer_len)?;
        d.set_item("alloc_alignment", i.alloc_alignment)?;
        d.set_item("timestamps", i.timestamps)?;
        Ok(d)
    }

    /// The device's default queue, or a labelled handle of it (the label names its
    /// submissions in the stats and traces). The same stream as every other handle.
    #[pyo3(signature = (label=None))]
    fn queue(&self, label: Option<&str>) -> UbResult<PyQueue> {
        let q = self.dev("Device.queue")?.queue();
        let q = match label {
            Some(l) => q.labelled(l),
            None => q,
        };
        Ok(PyQueue::new(self.h.clone(), q))
    }

    /// A new queue with its own stream (work on it runs concurrently with other queues';
    /// unibuf orders it by the buffers' fences).
    fn new_queue(&self, label: &str) -> UbResult<PyQueue> {
        let q = self.dev("Device.new_queue")?.new_queue(label)?;
        Ok(PyQueue::new(self.h.clone(), q))
    }

    /// Allocates a buffer of ``shape`` and ``dtype`` in ``mode`` ("auto": Shared on unified
    /// memory, Private on a discrete GPU; "shared": host-visible; "private": device-only).
    /// ``dtype`` defaults to float32. Its contents are undefined until written.
    #[pyo3(signature = (shape, dtype=None, *, mode="auto", label="python"))]
    fn alloc(
        &self,
        shape: Vec<usize>,
        dtype: Option<&Bound<'_, PyAny>>,
        mode: &str,
        label: &str,
    ) -> PyResult<PyBuffer> {
        let d = dtype
            .map(dtype::extract)
            .transpose()?
            .unwrap_or(unibuf::DType::F32);
        let m = convert::parse_alloc_mode(mode)?;
        let dev = self.dev("Device.alloc")?;
        let b = dev
            .alloc_labelled(label, d, &shape, m)
            .map_err(UbError::from)?;
        Ok(PyBuffer::new(self.h.clone(), b))
    }

    /// A new buffer holding a copy of host data: ``bytes``, or any C-contiguous host object
    /// that speaks DLPack (a NumPy array, a CPU tensor). An array keeps its dtype (a
    /// different ``dtype`` is a ``DTypeMismatchError``) and its shape unless ``shape`` gives
    /// another of the same element count; bytes are uint8 unless ``dtype`` says otherwise,
    /// 1-D unless ``shape`` is given.
    #[pyo3(name = "from_host", signature = (data, *, dtype=None, shape=None, mode="auto", label="python"))]
    fn buffer_from_host(
        &self,
        py: Python<'_>,
        data: &Bound<'_, PyAny>,
        dtype: Option<&Bound<'_, PyAny>>,
        shape: Option<Vec<usize>>,
        mode: &str,
        label: &str,
    ) -> PyResult<PyBuffer> {
        let m = convert::parse_alloc_mode(mode)?;
        let dtype = dtype.map(dtype::extract).transpose()?;
        let src = host::HostData::read(data, "Device.from_host")?;
        let (dt, sh) = src.layout(dtype, shape.as_deref())?;
        let dev = self.dev("Device.from_host")?;
        let b = dev
            .alloc_labelled(label, dt, &sh, m)
            .map_err(UbError::from)?;
        let q = dev.queue();
        src.upload(py, &q, &b)?;
        Ok(PyBuffer::new(self.h.clone(), b))
    }

    /// Takes a tensor of another framework without copying, through DLPack (``__dlpack__``):
    /// a PyTorch, CuPy, JAX or NumPy array on this device's memory. The buffer is Foreign
    /// memory; the producer's object stays alive until the last view is dropped and the last
    /// unibuf work that used it completes.
    ///
    /// Streams: by default the producer is asked to make the data ready on this device's
    /// queue (``__dlpack__(stream=...)``). With ``producer_stream`` (a ``CUstream`` as an
    /// integer, e.g. ``torch.cuda.current_stream().cuda_stream``) the producer is asked for no
    /// synchronisation and unibuf's queue waits for that stream instead, device-side.
    /// ``copy`` has the Array API's meaning: None copies only what cannot be shared (a strided
    /// tensor, into a fresh buffer: a recorded device copy), False never copies (a strided
    /// tensor is an ``InvalidArgumentError``), True always copies.
    #[pyo3(name = "from_dlpack", signature = (obj, *, copy=None, read_only=false, label="dlpack", producer_stream=None))]
    fn buffer_from_dlpack(
        &self,
        py: Python<'_>,
        obj: &Bound<'_, PyAny>,
        copy: Option<bool>,
        read_only: bool,
        label: &str,
        producer_stream: Option<usize>,
    ) -> PyResult<PyBuffer> {
        let dev = self.dev("Device.from_dlpack")?;
        let b = dlpack::import(py, dev, obj, copy, read_only, label, producer_stream)?;
        Ok(PyBuffer::new(self.h.clone(), b))
    }

    /// The allocator's accounting: active, reserved, cached, peak, foreign and staging bytes,
    /// cache hits, device calls, OOM retries.
    fn memory_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        stats_dict(py, &self.h.device.memory_stats())
    }

    /// Live memory per label: a list of ``(label, bytes, buffers)``, most bytes first.
    fn memory_by_label(&self) -> Vec<(String, usize, usize)> {
        self.h.device.memory_by_label()
    }

    /// The memory budget: ``{"memory_limit": int | None, "cache_limit": int | None}``.
    fn budget<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let b = self.h.device.budget();
        let d = PyDict::new(py);
        d.set_item("memory_limit", b.memory_limit)?;
        d.set_item("cache_limit", b.cache_limit)?;
        Ok(d)
    }

    /// Sets the memory budget (None lifts a limit).
    #[pyo3(signature = (*, memory_limit=None, cache_limit=None))]
    fn set_budget(&self, memory_limit: Option<usize>, cache_limit: Option<usize>) -> UbResult<()> {
        self.dev("Device.set_budget")?.set_budget(Budget {
            memory_limit,
            cache_limit,
        });
        Ok(())
    }

    /// Caps the bytes made resident (Metal residency sets; elsewhere accounting only).
    #[pyo3(signature = (bytes=None))]
    fn set_residency_budget(&self, bytes: Option<usize>) -> UbResult<()> {
        self.dev("Device.set_residency_budget")?
            .set_residency_budget(bytes);
        Ok(())
    }

    /// Releases cached blocks whose work is complete; returns the bytes released.
    fn trim(&self, py: Python<'_>) -> UbResult<usize> {
        let dev = self.dev("Device.trim")?;
        Ok(py.detach(|| dev.trim()))
    }

    /// The copy audit: every byte moved, by direction and by call site (``CopyReport``;
    /// ``str()`` prints the table).
    fn copy_report(&self) -> crate::report::CopyReport {
        crate::report::CopyReport::new(self.h.device.copy_report())
    }

    /// Forgets the copy ledger's records and totals (to audit one phase of a program).
    fn clear_copy_ledger(&self) {
        self.h.device.ledger().clear();
    }

    /// Per-label submission counts and host/device times: ``{"gpu_timing": bool, "labels":
    /// [{"label", "count", "encode_ns", "wait_ns", "waits", "gpu_ns", "timed"}]}``.
    fn submission_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.h.device.submission_stats();
        let d = PyDict::new(py);
        d.set_item("gpu_timing", s.gpu_timing)?;
        let labels = PyList::empty(py);
        for l in &s.labels {
            let e = PyDict::new(py);
            e.set_item("label", &l.label)?;
            e.set_item("count", l.count)?;
            e.set_item("encode_ns", l.encode_ns)?;
            e.set_item("wait_ns", l.wait_ns)?;
            e.set_item("waits", l.waits)?;
            e.set_item("gpu_ns", l.gpu_ns)?;
            e.set_item("timed", l.timed)?;
            labels.append(e)?;
        }
        d.set_item("labels", labels)?;
        Ok(d)
    }

    /// Zeroes the submission stats.
    fn reset_submission_stats(&self) {
        self.h.device.reset_submission_stats();
    }

    /// The submissions and copies as a Chrome trace (JSON text for chrome://tracing or
    /// Perfetto).
    fn chrome_trace(&self) -> String {
        self.h.device.chrome_trace()
    }

    /// Writes the Chrome trace to ``path``.
    fn write_chrome_trace(&self, py: Python<'_>, path: std::path::PathBuf) -> UbResult<()> {
        let dev = &self.h.device;
        py.detach(|| dev.write_chrome_trace(&path))?;
        Ok(())
    }

    /// Compiles every registered kernel now (instead of on first use); returns how many.
    fn warm_all(&self, py: Python<'_>) -> UbResult<usize> {
        let dev = self.dev("Device.warm_all")?;
        Ok(py.detach(|| dev.warm_all())?)
    }

    /// Blocks (without the GIL) until every queue's submitted work completes.
    fn drain(&self, py: Python<'_>) -> UbResult<()> {
        let dev = self.dev("Device.drain")?;
        py.detach(|| dev.drain())?;
        Ok(())
    }

    /// Blocks (without the GIL) until ``fence`` completes.
    fn wait(&self, py: Python<'_>, fence: &PyFence) -> UbResult<()> {
        let dev = self.dev("Device.wait")?;
        let f = fence.fence;
        py.detach(|| dev.wait(f))?;
        Ok(())
    }

    /// Whether ``fence`` has completed (never blocks).
    fn is_complete(&self, fence: &PyFence) -> UbResult<bool> {
        Ok(self.dev("Device.is_complete")?.is_complete(fence.fence)?)
    }

    /// The sticky device fault, as the exception it would raise, or None.
    fn fault(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.h
            .device
            .fault()
            .map(|e| PyErr::from(UbError::from(e)).into_value(py).into_any())
    }

    /// Clears a device fault after the faulted work has been dealt with.
    fn reset(&self, py: Python<'_>) -> UbResult<()> {
        let dev = self.dev("Device.reset")?;
        py.detach(|| dev.reset())?;
        Ok(())
    }

    /// Drains the device (without the GIL), releases its cached memory and refuses all later
    /// work with ``DeviceClosedError``: allocations, queues, transfers, fills, ops, waits,
    /// views, DLPack exchanges, loads and expert reads, on the device, its queues and its
    /// buffers. What was recorded stays readable (info, memory stats, the copy report,
    /// submission stats, traces, buffer properties). Memory still viewed by live buffers (or
    /// exported through DLPack) is freed when they are. Closing twice is a no-op.
    fn close(&self, py: Python<'_>) -> UbResult<()> {
        if self.h.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let dev = &self.h.device;
        let drained = py.detach(|| {
            let r = dev.drain();
            dev.trim();
            r
        });
        drained?;
        Ok(())
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> UbResult<bool> {
        self.close(py)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        let i = self.h.device.info();
        format!(
            "Device(backend={:?}, name={:?}, id={}{})",
            i.backend,
            i.name,
            self.h.device.id(),
            if self.h.is_closed() { ", closed" } else { "" }
        )
    }
}

/// Every backend, best first: ``[{"name", "compiled", "found", "detail"}]``.
#[pyfunction]
pub fn backends(py: Python<'_>) -> PyResult<Bound<'_, PyList>> {
    let list = PyList::empty(py);
    for s in py.detach(unibuf::backends) {
        let d = PyDict::new(py);
        d.set_item("name", s.name)?;
        d.set_item("compiled", s.compiled)?;
        d.set_item("found", s.found)?;
        d.set_item("detail", s.detail)?;
        list.append(d)?;
    }
    Ok(list)
}
