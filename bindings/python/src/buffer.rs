//! `unibuf.Buffer`: a typed view of device memory, and its DLPack export.

use crate::convert;
use crate::device::{Handle, PyDevice};
use crate::dtype;
use crate::errors::{invalid, UbError, UbResult};
use dlpark::python::producer::ExportRequest;
use dlpark::DlpackFlags;
use pyo3::prelude::*;
use pyo3::types::{PyList, PySlice, PyTuple};
use std::sync::Arc;
use unibuf::interop::dlpack::DlpackStream;
use unibuf::Buffer;

/// A typed, row-major view of device memory: a whole allocation or a view of one (``rows``,
/// ``slice``, ``reshape``, ``cast``, ``buf[i:j]``). Views share memory and keep it alive;
/// unibuf reuses memory only after the last view is gone and the last work that used it has
/// completed.
///
/// Hand a buffer to PyTorch, NumPy, CuPy or JAX without copying through DLPack
/// (``torch.from_dlpack(buf)``, ``numpy.from_dlpack(buf)``); the consumer's stream is
/// ordered after unibuf's pending work on it.
#[pyclass(name = "Buffer", module = "unibuf", frozen)]
pub struct PyBuffer {
    pub(crate) h: Arc<Handle>,
    pub(crate) b: Buffer,
}

impl PyBuffer {
    pub fn new(h: Arc<Handle>, b: Buffer) -> PyBuffer {
        PyBuffer { h, b }
    }

    /// The buffer, unless its device was closed.
    pub fn get(&self, what: &'static str) -> UbResult<&Buffer> {
        self.h.get(what)?;
        Ok(&self.b)
    }

    fn view(&self, b: Buffer) -> PyBuffer {
        PyBuffer::new(self.h.clone(), b)
    }
}

/// The DLPack stream argument (an integer, or an object with `__cuda_stream__`) in unibuf's
/// terms.
fn export_stream(request: &ExportRequest<'_>, cuda: bool) -> PyResult<DlpackStream> {
    use dlpark::python::producer::CudaStreamRequest as R;
    if request.stream().is_none() {
        return Ok(DlpackStream::None);
    }
    if !cuda {
        // The Array API has no stream numbering for host memory; -1 still means "no sync".
        let s: i64 = request
            .stream()
            .map(|s| s.extract::<i64>())
            .transpose()
            .map_err(|_| invalid("stream", "a host buffer takes stream=None or -1"))?
            .unwrap_or(0);
        return match s {
            -1 => Ok(DlpackStream::NoSync),
            other => Err(invalid(
                "stream",
                format!("{other}: a host buffer takes stream=None or -1"),
            )
            .into()),
        };
    }
    Ok(match request.cuda_stream()? {
        R::Omitted => DlpackStream::None,
        R::NoSync => DlpackStream::NoSync,
        R::LegacyDefault => DlpackStream::CudaLegacy,
        R::PerThreadDefault => DlpackStream::CudaPerThread,
        // SAFETY: the Array API makes the consumer responsible for passing a live stream of
        // the exporting device (PyTorch, CuPy and JAX pass their current stream).
        R::Pointer(p) => unsafe { DlpackStream::cuda(unibuf::interop::NativeHandle::from_addr(p)) },
    })
}

#[pymethods]
impl PyBuffer {
    /// The dtype's NumPy / PyTorch name ("float32", "bfloat16", ...).
    #[getter]
    fn dtype(&self) -> &'static str {
        dtype::py_name(self.b.dtype())
    }

    /// The shape, row-major.
    #[getter]
    fn shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, self.b.shape())
    }

    /// The number of dimensions.
    #[getter]
    fn ndim(&self) -> usize {
        self.b.shape().len()
    }

    /// Elements in the view.
    #[getter]
    fn size(&self) -> usize {
        self.b.len()
    }

    /// Bytes in the view.
    #[getter]
    fn nbytes(&self) -> usize {
        self.b.byte_len()
    }

    /// The view's offset in its allocation, in bytes.
    #[getter]
    fn byte_offset(&self) -> usize {
        self.b.byte_offset()
    }

    /// The storage mode: "shared", "private", "external" or "foreign".
    #[getter]
    fn mode(&self) -> &'static str {
        convert::mode_name(self.b.mode())
    }

    /// The label given at allocation (stats, errors and the ledger name it).
    #[getter]
    fn label(&self) -> String {
        self.b.label().to_owned()
    }

    /// Whether the host can address the memory (Shared, External, host Foreign memory).
    #[getter]
    fn is_host_accessible(&self) -> bool {
        self.b.is_host_accessible()
    }

    /// Whether the memory can be written (False over read-only mappings and read-only
    /// imports).
    #[getter]
    fn is_writable(&self) -> bool {
        self.b.is_writable()
    }

    /// The address of the first element on the device (for foreign kernels).
    #[getter]
    fn device_address(&self) -> u64 {
        self.b.device_address()
    }

    /// The device the buffer lives on.
    #[getter]
    fn device(&self) -> PyDevice {
        PyDevice::from_handle(self.h.clone())
    }

    /// Whether two views share one allocation.
    fn shares_memory_with(&self, other: &PyBuffer) -> bool {
        self.b.shares_memory_with(&other.b)
    }

    /// A 1-D view of elements ``start:stop`` of the flattened buffer.
    #[pyo3(signature = (start=None, stop=None))]
    fn slice(&self, start: Option<isize>, stop: Option<isize>) -> UbResult<PyBuffer> {
        let r = convert::resolve_range(start, stop, self.b.len());
        Ok(self.view(self.get("Buffer.slice")?.slice(r)?))
    }

    /// A view of rows ``start:stop`` along the first dimension.
    #[pyo3(signature = (start=None, stop=None))]
    fn rows(&self, start: Option<isize>, stop: Option<isize>) -> UbResult<PyBuffer> {
        let n = self.b.shape().first().copied().unwrap_or(0);
        let r = convert::resolve_range(start, stop, n);
        Ok(self.view(self.get("Buffer.rows")?.rows(r)?))
    }

    /// The same elements with another shape of the same element count.
    #[pyo3(signature = (*shape))]
    fn reshape(&self, shape: &Bound<'_, PyTuple>) -> PyResult<PyBuffer> {
        // reshape(2, 3) and reshape((2, 3)) both work, as in NumPy.
        let dims: Vec<usize> = match shape.len() {
            1 if shape.get_item(0)?.extract::<usize>().is_err() => shape.get_item(0)?.extract()?,
            _ => shape.extract()?,
        };
        Ok(self.view(
            self.get("Buffer.reshape")?
                .reshape(&dims)
                .map_err(UbError::from)?,
        ))
    }

    /// The same bytes as another dtype (the last dimension rescaled by the size ratio).
    fn cast(&self, dtype: &Bound<'_, PyAny>) -> PyResult<PyBuffer> {
        let d = dtype::extract(dtype)?;
        Ok(self.view(self.get("Buffer.cast")?.cast(d).map_err(UbError::from)?))
    }

    /// ``buf[i:j]``: rows ``i:j`` (step 1); ``buf[i]``: row ``i`` without its first
    /// dimension.
    fn __getitem__(&self, key: &Bound<'_, PyAny>) -> PyResult<PyBuffer> {
        let n = self.b.shape().first().copied().unwrap_or(0);
        if let Ok(s) = key.cast::<PySlice>() {
            let step: Option<isize> = s.getattr("step")?.extract()?;
            if step.is_some_and(|s| s != 1) {
                return Err(invalid(
                    "index",
                    "views are contiguous: a slice step other than 1 is not supported",
                )
                .into());
            }
            let start: Option<isize> = s.getattr("start")?.extract()?;
            let stop: Option<isize> = s.getattr("stop")?.extract()?;
            return Ok(self.rows(start, stop)?);
        }
        let i: isize = key.extract()?;
        let idx = if i < 0 { i + n as isize } else { i };
        if idx < 0 || idx as usize >= n {
            return Err(UbError::Core(unibuf::Error::OutOfBounds {
                what: "buffer row",
                start: i.max(0) as usize,
                end: i.max(0) as usize + 1,
                len: n,
            })
            .into());
        }
        let row = self
            .get("Buffer.__getitem__")?
            .rows(idx as usize..idx as usize + 1)
            .map_err(UbError::from)?;
        let rest: Vec<usize> = self.b.shape()[1..].to_vec();
        Ok(self.view(row.reshape(&rest).map_err(UbError::from)?))
    }

    /// The length of the first dimension (a 0-d buffer has none: ``TypeError``).
    fn __len__(&self) -> PyResult<usize> {
        self.b
            .shape()
            .first()
            .copied()
            .ok_or_else(|| pyo3::exceptions::PyTypeError::new_err("len() of a 0-d buffer"))
    }

    /// Iterates over the rows (``buf[0]``, ``buf[1]``, ...), as NumPy does.
    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let n = self.__len__()?;
        let b = self.get("Buffer.__iter__")?;
        let rest = b.shape()[1..].to_vec();
        let rows = (0..n)
            .map(|i| {
                let row = b.rows(i..i + 1)?.reshape(&rest)?;
                Ok(self.view(row))
            })
            .collect::<Result<Vec<PyBuffer>, unibuf::Error>>()
            .map_err(UbError::from)?;
        PyList::new(py, rows)?
            .into_any()
            .try_iter()
            .map(|i| i.into_any())
    }

    /// A copy of the contents as a NumPy array (downloaded from device memory, or copied from
    /// host memory); for a zero-copy view of host memory use ``numpy.from_dlpack(buf)``.
    /// bfloat16 has no NumPy dtype: ``cast("uint16")`` first, or use PyTorch.
    fn numpy<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let b = self.get("Buffer.numpy")?;
        if b.dtype() == unibuf::DType::BF16 {
            return Err(UbError::Core(unibuf::Error::Unsupported {
                backend: "numpy",
                what: "bfloat16 arrays (cast the buffer to uint16, or use torch.from_dlpack)"
                    .to_owned(),
            })
            .into());
        }
        let np = py.import("numpy")?;
        let out = np.call_method1("empty", (PyTuple::new(py, b.shape())?, self.dtype()))?;
        let q = self.h.get("Buffer.numpy")?.queue();
        let mut data = crate::host::HostData::read(&out, "Buffer.numpy")?;
        data.download_into(py, &q, b)?;
        drop(data);
        Ok(out)
    }

    /// The native handle as an integer: the ``CUdeviceptr`` on CUDA, the ``id<MTLBuffer>``
    /// on Metal (add ``byte_offset``), the host address on the CPU.
    fn native(&self) -> UbResult<usize> {
        let b = self.get("Buffer.native")?;
        Ok(match b.native()? {
            unibuf::interop::NativeBuffer::Host { ptr, .. } => ptr.addr(),
            unibuf::interop::NativeBuffer::Cuda { device_ptr, .. } => device_ptr as usize,
            unibuf::interop::NativeBuffer::Metal { buffer, .. } => buffer.addr(),
            _ => 0,
        })
    }

    /// The DLPack device: ``(device_type, device_id)`` (1: CPU, 2: CUDA, 3: CUDA host, 8:
    /// Metal).
    fn __dlpack_device__(&self) -> UbResult<(i32, i32)> {
        let d = self.get("Buffer.__dlpack_device__")?.dlpack_device()?;
        Ok((d.device_type.0 as i32, d.device_id))
    }

    /// Exports the view through DLPack, zero-copy (a ``dltensor_versioned`` capsule when the
    /// consumer passes ``max_version`` >= (1, 0), else a legacy ``dltensor``). unibuf's
    /// pending work on the buffer is ordered before ``stream`` (device-side on CUDA); with no
    /// stream the call waits for it, without the GIL. ``copy=True`` and other devices are
    /// refused (``BufferError``): unibuf exports only what it can share.
    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__(
        &self,
        py: Python<'_>,
        stream: Option<&Bound<'_, PyAny>>,
        max_version: Option<(u32, u32)>,
        dl_device: Option<(u32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Py<PyAny>> {
        let b = self.get("Buffer.__dlpack__")?;
        let request = ExportRequest::parse(stream, max_version, dl_device, copy)?;
        let device = b.dlpack_device().map_err(UbError::from)?;
        let flags = if b.is_writable() {
            DlpackFlags::empty()
        } else {
            DlpackFlags::READ_ONLY
        };
        request.validate_zero_copy(device, flags)?;
        let cuda = matches!(device.device_type.0, 2 | 3);
        let s = export_stream(&request, cuda)?;
        let versioned = max_version.is_some_and(|(major, _)| major >= 1);
        // The export may wait for pending work (stream None): without the GIL.
        let capsule = if versioned {
            let t = crate::site::detach(py, || b.to_dlpack(s)).map_err(UbError::from)?;
            t.into_managed().into_pyobject(py)?.into_any().unbind()
        } else {
            let t = crate::site::detach(py, || b.to_dlpack_legacy(s)).map_err(UbError::from)?;
            t.into_managed().into_pyobject(py)?.into_any().unbind()
        };
        Ok(capsule)
    }

    /// The buffer as an object of ``like``'s framework (e.g. a ``torch.Tensor`` when ``like``
    /// is one), zero-copy, through the framework's DLPack C exchange API
    /// (``__dlpack_c_exchange_api__``): no Python-level ``from_dlpack`` runs, which is what
    /// makes it fast. ``stream`` is the framework's current stream on this device (a
    /// ``CUstream`` as an integer; 0 is the legacy default stream), which waits device-side for
    /// unibuf's pending work on the buffer, as the ``stream`` of ``__dlpack__``; None waits on
    /// the host. ``UnsupportedError`` if the framework has no exchange API.
    #[pyo3(signature = (like, *, stream=None))]
    fn export_like<'py>(
        &self,
        py: Python<'py>,
        like: &Bound<'py, PyAny>,
        stream: Option<i64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let b = self.get("Buffer.export_like")?;
        let Some(api) =
            dlpark::python::consumer::exchange::ExchangeApi::from_object(like.as_borrowed())?
        else {
            return Err(UbError::Core(unibuf::Error::Unsupported {
                backend: "dlpack",
                what: format!(
                    "export_like: {} has no DLPack C exchange API (use its from_dlpack)",
                    like.get_type().name()?
                ),
            })
            .into());
        };
        // The legacy default stream's handle is 0 in PyTorch; the Array API numbers it 1.
        let stream = stream.map(|s| if s == 0 { 1 } else { s });
        // SAFETY: as `__dlpack__`'s stream: the caller passes the framework's live stream of
        // this device (or a CUDA default-stream number).
        let s = unsafe { DlpackStream::from_array_api(stream) }.map_err(UbError::from)?;
        let t = crate::site::detach(py, || b.to_dlpack(s)).map_err(UbError::from)?;
        api.managed_tensor_to_py_object_no_sync(t.into_managed(), py)
    }

    fn __repr__(&self) -> String {
        format!(
            "Buffer(label={:?}, dtype={}, shape={:?}, mode={}, device={})",
            self.b.label(),
            self.dtype(),
            self.b.shape(),
            self.mode(),
            self.h.device_id()
        )
    }
}
