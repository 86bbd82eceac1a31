//! DLPack from Python: taking other frameworks' tensors (`Device.from_dlpack`) and handing
//! buffers to them (`Buffer.__dlpack__`), with the Array API's stream rules.
//!
//! dlpark does the Python side (capsules, `__dlpack__` negotiation, the DLPack 1.3 C exchange
//! API where a producer offers it); unibuf's core does the device side (wrapping the memory
//! as Foreign, ordering its epochs against the foreign stream).

use crate::errors::{UbError, UbResult};
use dlpark::ffi::{DLDevice, DLDeviceType};
use dlpark::python::consumer::stream::{self, StreamArg};
use dlpark::python::{DlpackStream as PyStreamArg, ImportedDlpack};
use pyo3::prelude::*;
use std::cell::Cell;
use std::ffi::c_void;
use unibuf::interop::dlpack::{CopyPolicy, DlpackLegacyTensor, DlpackTensor, ImportOptions};
use unibuf::interop::{ForeignSignal, NativeHandle, NativeQueue};
use unibuf::{Buffer, Device};

/// The driver's handle of CUDA's legacy default stream (`CU_STREAM_LEGACY`).
const CU_STREAM_LEGACY: usize = 0x1;

/// The consumer side of a CUDA import: what `__dlpack__(stream=...)` is given, and the
/// producer's stream when the C exchange API reports it instead.
struct CudaConsumer {
    /// The stream passed to `__dlpack__`: unibuf's default queue (the producer orders its
    /// work before it), or none with `-1` when the producer's stream is known.
    own: Option<usize>,
    /// The producer's work stream, from the caller or the C exchange API.
    producer: Cell<Option<usize>>,
}

// SAFETY: `as_python_arg` names no stream for host memory, and for CUDA memory either `-1` (no
// synchronisation) or the default queue's own `CUstream`, a live stream of the importing
// device's context for the whole import (the device outlives the call).
unsafe impl PyStreamArg for CudaConsumer {
    fn as_python_arg(&self, _py: Python<'_>, device: DLDevice) -> PyResult<StreamArg> {
        // Host memory has no stream in the Array API (a CPU tensor offered to a CUDA device).
        if device.device_type != DLDeviceType::CUDA {
            return Ok(stream::none());
        }
        Ok(match self.own {
            Some(s) => stream::cuda(s as *mut c_void),
            None => stream::no_sync(),
        })
    }

    unsafe fn wait_for_producer(&self, _device: DLDevice, producer: *mut c_void) -> PyResult<bool> {
        // The exchange API hands over the producer's current stream: unibuf waits for it
        // itself (an event, device-side), so the producer needs no synchronisation.
        self.producer.set(Some(producer as usize));
        Ok(true)
    }
}

/// The Array API's `copy` as unibuf's policy: None copies only what cannot be shared (a
/// strided tensor), False never copies, True always does.
fn copy_policy(copy: Option<bool>) -> CopyPolicy {
    match copy {
        None => CopyPolicy::IfNeeded,
        Some(false) => CopyPolicy::Never,
        Some(true) => CopyPolicy::Always,
    }
}

/// Takes `obj` through DLPack onto `dev` (see `Device.from_dlpack`).
pub fn import(
    py: Python<'_>,
    dev: &Device,
    obj: &Bound<'_, PyAny>,
    copy: Option<bool>,
    read_only: bool,
    label: &str,
    producer_stream: Option<usize>,
) -> PyResult<Buffer> {
    let mut opts = ImportOptions::new()
        .label(label)
        .copy(copy_policy(copy))
        .read_only(read_only);
    let imported = match dev.queue().native().map_err(UbError::from)? {
        NativeQueue::Cuda { stream: own, .. } => {
            let consumer = CudaConsumer {
                own: if producer_stream.is_some() {
                    None
                } else {
                    Some(own.addr())
                },
                producer: Cell::new(producer_stream),
            };
            let imported = dlpark::python::from_dlpack(obj.as_borrowed(), Some(&consumer), None)?;
            // The producer's work is ordered before unibuf's default queue either way: by the
            // producer on `own`, or by an event wait on the producer's stream here. The wait
            // gives the import a fence, which orders every other queue too.
            // A null producer stream is CUDA's legacy default stream (the exchange API's and
            // PyTorch's spelling); the driver names it CU_STREAM_LEGACY.
            let wait_on = match consumer.producer.get() {
                Some(0) => CU_STREAM_LEGACY,
                Some(s) => s,
                None => own.addr(),
            };
            opts = opts.wait_for(ForeignSignal::CudaStream(NativeHandle::from_addr(wait_on)));
            imported
        }
        // Host memory needs no stream, and Metal's DLPack convention has none.
        _ => dlpark::python::from_dlpack(obj.as_borrowed(), None, None)?,
    };
    let b = crate::site::detach(py, move || -> UbResult<Buffer> {
        // SAFETY: the DLPack protocol makes the producer vouch for the descriptor (device,
        // data, offset, dtype, shape, strides inside one allocation, alive until the deleter
        // runs). Its pending work is ordered as above: the producer synchronised on our
        // stream, or the wait names its live stream (from the caller or the exchange API) of
        // this device's context. Writes by others while unibuf works on the memory are the
        // caller's to order, as between any two frameworks sharing memory.
        let b = match imported {
            ImportedDlpack::Versioned(m) => unsafe {
                dev.from_dlpack(DlpackTensor::from(m), &opts)
            },
            ImportedDlpack::Legacy(m) => unsafe {
                dev.from_dlpack_legacy(DlpackLegacyTensor::from(m), &opts)
            },
        }?;
        Ok(b)
    })?;
    Ok(b)
}
