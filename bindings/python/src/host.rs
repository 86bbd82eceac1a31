//! Host data from Python: `bytes`, or any object that exports host memory through DLPack
//! (NumPy arrays, CPU tensors). Used by uploads, downloads into arrays, and `from_host`.
//!
//! abi3 before Python 3.11 has no buffer protocol, and DLPack is what every array library
//! speaks anyway; it also tells dtype, shape, strides and read-only-ness exactly.

use crate::errors::{invalid, UbError, UbResult};
use dlpark::python::ImportedDlpack;
use dlpark::DlpackFlags;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use unibuf::interop::dlpack::ffi::DLDeviceType;
use unibuf::{Buffer, DType, Queue};

/// What keeps the memory alive while it is read or written.
enum Keep<'py> {
    Bytes(#[allow(dead_code)] Bound<'py, PyBytes>),
    // Dropped, it runs the producer's deleter (after the copy: `HostData` outlives it).
    Dlpack(#[allow(dead_code)] ImportedDlpack),
}

/// Contiguous host memory of a Python object, kept alive as long as this value.
pub struct HostData<'py> {
    _keep: Keep<'py>,
    ptr: *mut u8,
    bytes: usize,
    /// None for `bytes` (untyped).
    dtype: Option<DType>,
    shape: Vec<usize>,
    writable: bool,
    what: &'static str,
}

impl<'py> HostData<'py> {
    /// Reads `obj`'s memory: `bytes`, or a host DLPack object (kDLCPU or kDLCUDAHost),
    /// C-contiguous. `what` names the call in errors.
    pub fn read(obj: &Bound<'py, PyAny>, what: &'static str) -> UbResult<HostData<'py>> {
        if let Ok(b) = obj.cast::<PyBytes>() {
            let data = b.as_bytes();
            return Ok(HostData {
                ptr: data.as_ptr().cast_mut(),
                bytes: data.len(),
                dtype: None,
                shape: vec![data.len()],
                writable: false,
                what,
                _keep: Keep::Bytes(b.clone()),
            });
        }
        let imported = dlpark::python::from_dlpack(obj.as_borrowed(), None, None).map_err(|e| {
            invalid(
                "host data",
                format!(
                    "{what} takes bytes or a host array that speaks DLPack (a NumPy array, a \
                     CPU tensor); {} failed: {e}",
                    type_name(obj)
                ),
            )
        })?;
        let flags = imported.flags();
        let t = imported
            .validate()
            .map_err(|e| invalid("host data", format!("{what}: malformed DLPack tensor: {e}")))?;
        let dev = t.device();
        if dev.device_type != DLDeviceType::CPU && dev.device_type != DLDeviceType::CUDAHOST {
            return Err(invalid(
                "host data",
                format!(
                    "{what} reads host memory; this {} is on DLPack device type {} (id {}): \
                     take device memory with Device.from_dlpack instead",
                    type_name(obj),
                    dev.device_type.0,
                    dev.device_id
                ),
            ));
        }
        let compact = t
            .is_compact()
            .map_err(|e| invalid("host data", format!("{what}: {e}")))?;
        let shape: Vec<usize> = t.shape().iter().map(|&d| d.max(0) as usize).collect();
        if !compact {
            return Err(invalid(
                "host data",
                format!(
                    "{what}: the array (shape {shape:?}, strides {:?}) is not C-contiguous; \
                     pass a contiguous copy (numpy.ascontiguousarray)",
                    t.strides()
                ),
            ));
        }
        let dtype = DType::from_dlpack(t.dtype())?;
        let bytes = t.num_bytes();
        let base = t.data_ptr().cast::<u8>().cast_mut();
        let ptr = if bytes == 0 {
            std::ptr::NonNull::<u8>::dangling().as_ptr()
        } else {
            base.wrapping_add(t.byte_offset() as usize)
        };
        Ok(HostData {
            ptr,
            bytes,
            dtype: Some(dtype),
            shape,
            writable: !flags.contains(DlpackFlags::READ_ONLY),
            what,
            _keep: Keep::Dlpack(imported),
        })
    }

    /// The dtype and shape of a buffer made from this data: the data's own unless given (an
    /// explicit dtype must agree with a typed source; an explicit shape must hold the same
    /// number of elements; untyped bytes are uint8 unless a dtype is given).
    pub fn layout(
        &self,
        dtype: Option<DType>,
        shape: Option<&[usize]>,
    ) -> UbResult<(DType, Vec<usize>)> {
        let dt = match (self.dtype, dtype) {
            (Some(have), Some(want)) if have != want => {
                return Err(UbError::Core(unibuf::Error::DTypeMismatch {
                    what: "from_host: data",
                    expected: want,
                    got: have,
                }))
            }
            (Some(have), _) => have,
            (None, Some(want)) => want,
            (None, None) => DType::U8,
        };
        if !self.bytes.is_multiple_of(dt.size()) {
            return Err(UbError::Core(unibuf::Error::ShapeMismatch {
                what: "from_host: data length",
                expected: format!("a multiple of {} bytes ({dt})", dt.size()),
                got: format!("{} bytes", self.bytes),
            }));
        }
        let n = self.bytes / dt.size();
        let sh = match shape {
            Some(s) => {
                let m = s.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
                if m != Some(n) {
                    return Err(UbError::Core(unibuf::Error::ShapeMismatch {
                        what: "from_host: shape",
                        expected: format!("{n} elements (the data's)"),
                        got: format!("shape {s:?}"),
                    }));
                }
                s.to_vec()
            }
            None if self.dtype.is_some() => self.shape.clone(),
            None => vec![n],
        };
        Ok((dt, sh))
    }

    /// Checks the data against `b`: the same dtype (where typed) and byte length.
    fn check(&self, b: &Buffer) -> UbResult<()> {
        if let Some(d) = self.dtype {
            if d != b.dtype() {
                return Err(UbError::Core(unibuf::Error::DTypeMismatch {
                    what: self.what,
                    expected: b.dtype(),
                    got: d,
                }));
            }
        }
        if self.bytes != b.byte_len() {
            return Err(UbError::Core(unibuf::Error::ShapeMismatch {
                what: self.what,
                expected: format!(
                    "{} bytes (buffer '{}', shape {:?})",
                    b.byte_len(),
                    b.label(),
                    b.shape()
                ),
                got: format!("{} bytes (shape {:?})", self.bytes, self.shape),
            }));
        }
        Ok(())
    }

    /// Uploads the data into `b` on `q`, without the GIL.
    pub fn upload(&self, py: Python<'_>, q: &Queue, b: &Buffer) -> UbResult<()> {
        self.check(b)?;
        let dst = b.cast(DType::U8)?;
        // SAFETY: `ptr` addresses `bytes` readable bytes of the object, which `_keep` holds
        // (a `bytes` object, or a DLPack export whose deleter has not run) for as long as this
        // value lives, which outlives the call; the slice is only read. Another Python thread
        // writing the array while the GIL is released would race, as with every extension
        // that releases the GIL around a read of an array.
        let data = unsafe { std::slice::from_raw_parts(self.ptr.cast_const(), self.bytes) };
        crate::site::detach(py, || q.upload(&dst, data))?;
        Ok(())
    }

    /// Downloads `b` into the data on `q`, without the GIL.
    pub fn download_into(&mut self, py: Python<'_>, q: &Queue, b: &Buffer) -> UbResult<()> {
        if !self.writable {
            return Err(invalid(
                "out",
                format!(
                    "{}: the destination is read-only (bytes, or an array exported read-only)",
                    self.what
                ),
            ));
        }
        self.check(b)?;
        let src = b.cast(DType::U8)?;
        // SAFETY: as in `upload`; the producer exported the memory writable (no READ_ONLY
        // flag), and `&mut self` makes this the only slice made of it here.
        let out = unsafe { std::slice::from_raw_parts_mut(self.ptr, self.bytes) };
        crate::site::detach(py, || q.download_into(&src, out))?;
        Ok(())
    }
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "object".to_owned())
}

impl HostData<'_> {
    /// The data as f32 values: a float32 array, or bytes of a multiple of 4 (aligned).
    pub fn as_f32(&self) -> UbResult<&[f32]> {
        if let Some(d) = self.dtype {
            if d != DType::F32 {
                return Err(UbError::Core(unibuf::Error::DTypeMismatch {
                    what: self.what,
                    expected: DType::F32,
                    got: d,
                }));
            }
        }
        if !self.bytes.is_multiple_of(4) || !(self.ptr as usize).is_multiple_of(4) {
            return Err(UbError::Core(unibuf::Error::Misaligned {
                what: "float32 host data (length and address)",
                value: self.bytes,
                align: 4,
            }));
        }
        // SAFETY: `ptr` addresses `bytes` readable bytes kept alive by `_keep` for the borrow
        // of `self`; both are multiples of 4, and every bit pattern is a valid f32.
        Ok(unsafe {
            std::slice::from_raw_parts(self.ptr.cast::<f32>().cast_const(), self.bytes / 4)
        })
    }
}
