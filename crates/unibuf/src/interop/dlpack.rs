//! DLPack: buffers handed to and taken from PyTorch, JAX, CuPy, NumPy, MLX and every other
//! framework that speaks DLPack, without copying.
//!
//! The ABI structs, the version rule and the flags are [`dlpark`]'s (re-exported here, with
//! its [`ffi`] module, so that callers and tests need no dependency of their own); what
//! unibuf adds is the mapping to its devices, dtypes and epochs:
//!
//! - **Export** ([`Buffer::to_dlpack`], [`Buffer::to_dlpack_legacy`]): a
//!   `DLManagedTensorVersioned` (DLPack 1.x, version set, `READ_ONLY` when the buffer is not
//!   writable) or a legacy `DLManagedTensor`, owned by a [`DlpackTensor`] /
//!   [`DlpackLegacyTensor`] until [`into_raw`](DlpackTensor::into_raw) hands it to a capsule.
//!   Its deleter drops a clone of the buffer, so the memory lives as long as the consumer
//!   holds the tensor. Shape and explicit row-major strides (DLPack 1.2 forbids NULL strides
//!   for `ndim > 0`; the legacy struct gets them too, which every version accepts).
//! - **Import** ([`Device::from_dlpack`], [`Device::from_dlpack_legacy`]): contiguous tensors
//!   are wrapped zero-copy through [`Device::wrap_foreign`], whose owner runs the producer's
//!   deleter exactly once, after the last view drops and the last fence that used the memory
//!   completes. Strided tensors are copied into a fresh buffer when [`ImportOptions::copy`]
//!   allows it, else refused.
//! - **Streams** (the Array API rule): the exporter is given the consumer's stream
//!   ([`DlpackStream`]) and orders unibuf's pending work on the buffer before it: a
//!   device-side wait on a CUDA stream or Metal command buffer
//!   ([`Device::order_native`]), a host wait when the consumer gave none. Work the *producer*
//!   still has in flight on an imported tensor is waited for with [`ImportOptions::wait_for`].
//!
//! Every export and every import is a zero-byte [`Direction::Shared`] record in the copy
//! ledger at the caller's location; the copy of a strided import is a
//! [`Direction::DeviceToDevice`] record besides.
//!
//! | unibuf | DLPack device | `data` | `byte_offset` |
//! |---|---|---|---|
//! | CPU backend, any mode | `kDLCPU`, id 0 | host address of the view | 0 |
//! | CUDA, Private (device memory) | `kDLCUDA`, id = the CUDA ordinal | device address | 0 |
//! | CUDA, Shared / External (pinned or registered host memory) | `kDLCUDAHost`, id 0 | host address | 0 |
//! | Metal | `kDLMetal`, id 0 | the `id<MTLBuffer>` | the view's offset in it |
//!
//! Imports take the same pairs back (`kDLCUDAHost` with any id), and on CUDA also `kDLCPU`
//! memory that is pinned (PyTorch exports pinned tensors as `kDLCPU`; pageable memory is
//! refused by [`Device::wrap_foreign`]'s check, [`Error::InvalidArgument`]); anything else is
//! refused.
//!
//! Seen with PyTorch 2.11 on an H100: both ABIs, both ways, zero-copy (writes through the
//! import visible to PyTorch), strided views copied when allowed, its current stream (legacy
//! default or a side stream) honoured on export; it refuses `kDLCUDAHost` tensors
//! ("Unsupported device_type: 3"), so hand it Private buffers.
//!
//! ## Errors on import
//!
//! One rule: **the tensor is consumed whatever happens.** On every error its deleter has run
//! exactly once by the time the error is returned (or, where the memory was already wrapped,
//! runs once the work that used it completes), so nothing leaks and nothing is freed twice.
//!
//! | input | error |
//! |---|---|
//! | a device type this backend does not address, or an unknown one | [`Error::Unsupported`], naming the type and id |
//! | the right device type with another device id | [`Error::WrongDevice`] (`expected`/`got` are DLPack device ids) |
//! | bool, complex, float8/6/4, opaque dtypes, `lanes != 1`, bit widths unibuf has no dtype for | [`Error::Unsupported`], naming code, bits and lanes |
//! | NULL data with elements | [`Error::InvalidArgument`] (`what`: "DLPack data") |
//! | `data + byte_offset` not aligned to the element size | [`Error::Misaligned`] |
//! | strides not row-major with [`CopyPolicy::Never`] | [`Error::InvalidArgument`] (`what`: "DLPack strides"), naming shape and strides |
//! | negative strides, or more than [`MAX_GATHER_COPIES`] runs to gather | [`Error::Unsupported`], naming shape and strides |
//! | a versioned tensor of major version other than 1 ([`DlpackTensor::from_raw`]) | [`Error::Unsupported`] |
//! | malformed metadata (negative `ndim` or dimensions, NULL shape, overflow) | [`Error::InvalidArgument`] (`what`: "DLPack tensor") |
//!
//! NULL strides are read as row-major whatever the declared version: DLPack 1.2 forbids
//! producers to write them, and reading them the old way is harmless.
//!
//! ```
//! use unibuf::interop::dlpack::{DlpackStream, ImportOptions};
//! use unibuf::{Device, StorageMode};
//! let dev = Device::open("cpu")?;
//! let x = dev.from_slice("x", &[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3])?;
//! let tensor = x.to_dlpack(DlpackStream::None)?;      // what `__dlpack__()` returns
//! assert_eq!(tensor.view()?.shape(), &[2, 3]);
//! assert_eq!(tensor.view()?.strides(), Some(&[3i64, 1][..]));
//! // A consumer takes it back (here unibuf itself): zero-copy, the same memory.
//! // SAFETY: the tensor is our own export, valid until its deleter runs.
//! let y = unsafe { dev.from_dlpack(tensor, &ImportOptions::new().label("y")) }?;
//! assert_eq!(y.native()?, x.native()?);
//! assert_eq!(y.mode(), StorageMode::Foreign);
//! assert_eq!(&*y.read::<f32>()?, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
//! # Ok::<(), unibuf::Error>(())
//! ```

use crate::backend::Command;
use crate::buffer::Buffer;
use crate::device::{plan_waits, Completion, Device, Use, Waiter};
use crate::dtype::DType;
use crate::epoch::Access;
use crate::error::{Error, Result};
use crate::interop::{
    ForeignAccess, ForeignMemory, ForeignSignal, NativeBuffer, NativeDevice, NativeHandle,
    NativeWaiter,
};
use crate::ledger::CallSite;
use crate::ledger::{CopyRecord, Direction};
use crate::storage::StorageMode;
use dlpark::ffi::{
    DLDataType, DLDataTypeCode, DLDevice, DLDeviceType, DLManagedTensor, DLManagedTensorVersioned,
    DLPackVersion, DLTensor,
};
use dlpark::{AllocationDeleter, Managed, ManagedTensorBase};
use std::ffi::c_void;
use std::fmt;

pub use dlpark;
pub use dlpark::ffi;
pub use dlpark::DlpackFlags;

/// The most contiguous runs a strided import is gathered in (one device copy command each).
/// A tensor that needs more (a transposed matrix, whose runs are single elements, of more
/// than 65 536 elements) is refused with [`Error::Unsupported`]: make it contiguous on the
/// producer's side, where a kernel does it in one pass.
pub const MAX_GATHER_COPIES: usize = 1 << 16;

/// The legacy default stream's handle in CUDA's driver API (`CU_STREAM_LEGACY`).
const CU_STREAM_LEGACY: usize = 0x1;
/// The per-thread default stream's handle (`CU_STREAM_PER_THREAD`).
const CU_STREAM_PER_THREAD: usize = 0x2;

// ---- streams ---------------------------------------------------------------------------------

/// The consumer's stream of an export: the Array API's `__dlpack__(stream=...)`.
///
/// unibuf orders its pending work on the buffer (the last writes, and the reads since when
/// the export is writable) before this stream, so the consumer's work on it sees the data
/// and does not race unibuf's readers. Work unibuf submits on the buffer *after* the export
/// is not ordered against the consumer: join that with
/// [`Queue::wait_foreign`](crate::Queue::wait_foreign).
///
/// The variants holding a handle can only be made through the `unsafe` constructors
/// ([`DlpackStream::cuda`], [`DlpackStream::metal_command_buffer`],
/// [`DlpackStream::from_array_api`]), which state what the handle must be, so that exporting
/// stays safe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DlpackStream {
    /// No stream: a host consumer (NumPy, a CPU framework), or a consumer that gave none. The
    /// export blocks until unibuf's pending work on the buffer completes (the Array API reads
    /// `None` as CUDA's legacy default stream; a host wait is stronger and needs no stream).
    None,
    /// The consumer orders the work itself (the Array API's `stream=-1`): nothing waits.
    NoSync,
    /// CUDA's legacy default stream (the Array API's `stream=1`).
    CudaLegacy,
    /// CUDA's per-thread default stream (the Array API's `stream=2`).
    CudaPerThread,
    /// A CUDA stream of this device's context (the Array API's `stream > 2`, a `CUstream`).
    #[non_exhaustive]
    Cuda {
        /// The `CUstream`.
        stream: NativeHandle,
    },
    /// A Metal command buffer of this device, not yet committed, with no encoder open: its
    /// later commands wait.
    #[non_exhaustive]
    MetalCommandBuffer {
        /// The `id<MTLCommandBuffer>`.
        command_buffer: NativeHandle,
    },
}

impl DlpackStream {
    /// A CUDA stream.
    ///
    /// # Safety
    /// `stream` is a live `CUstream` of the exporting device's context until the export
    /// returns.
    pub unsafe fn cuda(stream: NativeHandle) -> DlpackStream {
        DlpackStream::Cuda { stream }
    }

    /// A Metal command buffer.
    ///
    /// # Safety
    /// `command_buffer` is a live `id<MTLCommandBuffer>` of the exporting device, not yet
    /// committed and with no encoder open, until the export returns.
    pub unsafe fn metal_command_buffer(command_buffer: NativeHandle) -> DlpackStream {
        DlpackStream::MetalCommandBuffer { command_buffer }
    }

    /// The stream the Array API's `__dlpack__(stream=...)` names, CUDA's numbering: `None`
    /// (no stream), `-1` (no synchronisation), `1` (legacy default), `2` (per-thread default),
    /// anything larger a `CUstream`. `0` is refused, as the Array API disallows it (it is
    /// ambiguous), and so are other negative values.
    ///
    /// # Safety
    /// A value above 2 is a live `CUstream` of the exporting device's context until the export
    /// returns.
    pub unsafe fn from_array_api(stream: Option<i64>) -> Result<DlpackStream> {
        match stream {
            None => Ok(DlpackStream::None),
            Some(-1) => Ok(DlpackStream::NoSync),
            Some(1) => Ok(DlpackStream::CudaLegacy),
            Some(2) => Ok(DlpackStream::CudaPerThread),
            Some(s) if s > 2 => Ok(DlpackStream::Cuda {
                stream: NativeHandle::from_addr(s as usize),
            }),
            Some(s) => Err(Error::invalid(
                "DLPack stream",
                format!(
                    "{s}: the Array API allows None, -1, 1, 2 or a stream handle (0 is ambiguous \
                     and disallowed)"
                ),
            )),
        }
    }

    /// What waits for unibuf's fences; `None` for `NoSync`.
    fn waiter(self) -> Option<NativeWaiter> {
        match self {
            DlpackStream::None => Some(NativeWaiter::Host),
            DlpackStream::NoSync => None,
            DlpackStream::CudaLegacy => Some(NativeWaiter::CudaStream(NativeHandle::from_addr(
                CU_STREAM_LEGACY,
            ))),
            DlpackStream::CudaPerThread => Some(NativeWaiter::CudaStream(NativeHandle::from_addr(
                CU_STREAM_PER_THREAD,
            ))),
            DlpackStream::Cuda { stream } => Some(NativeWaiter::CudaStream(stream)),
            DlpackStream::MetalCommandBuffer { command_buffer } => {
                Some(NativeWaiter::MetalCommandBuffer(command_buffer))
            }
        }
    }

    /// The consumer's CUDA stream, where it named one: its work on the export may still be
    /// queued when it calls the deleter.
    fn consumer_stream(self) -> Option<NativeHandle> {
        match self {
            DlpackStream::CudaLegacy => Some(NativeHandle::from_addr(CU_STREAM_LEGACY)),
            DlpackStream::CudaPerThread => Some(NativeHandle::from_addr(CU_STREAM_PER_THREAD)),
            DlpackStream::Cuda { stream } => Some(stream),
            _ => None,
        }
    }

    /// Refuses a stream the device cannot order work before (a CUDA stream on the CPU), before
    /// anything is waited for, so that the answer does not depend on whether work is pending.
    fn check(self, device: &Device) -> Result<()> {
        let handle = match self {
            DlpackStream::Cuda { stream } => Some(stream),
            DlpackStream::MetalCommandBuffer { command_buffer } => Some(command_buffer),
            _ => None,
        };
        if handle.is_some_and(NativeHandle::is_null) {
            return Err(Error::invalid(
                "DLPack stream",
                format!("{self:?}: a null handle"),
            ));
        }
        let fits = matches!(
            (device.native(), self),
            (_, DlpackStream::None | DlpackStream::NoSync)
                | (
                    NativeDevice::Cuda { .. },
                    DlpackStream::CudaLegacy
                        | DlpackStream::CudaPerThread
                        | DlpackStream::Cuda { .. },
                )
                | (
                    NativeDevice::Metal { .. },
                    DlpackStream::MetalCommandBuffer { .. }
                )
        );
        if fits {
            return Ok(());
        }
        let backend = device.info().backend;
        Err(Error::Unsupported {
            backend,
            what: format!(
                "the DLPack consumer stream {self:?} (a {backend} device orders work before \
                 {})",
                match device.native() {
                    NativeDevice::Cuda { .. } => "None, NoSync or a CUDA stream",
                    NativeDevice::Metal { .. } => "None, NoSync or a Metal command buffer",
                    _ => "None or NoSync: it has no native streams",
                }
            ),
        })
    }
}

// ---- owned tensors ---------------------------------------------------------------------------

/// An owned DLPack 1.x tensor (`DLManagedTensorVersioned`): dropped, it runs its deleter.
///
/// Made by [`Buffer::to_dlpack`] or taken from a foreign producer with
/// [`DlpackTensor::from_raw`]; handed to a consumer with [`DlpackTensor::into_raw`] (the
/// pointer a `"dltensor_versioned"` capsule holds) or to unibuf with [`Device::from_dlpack`].
pub struct DlpackTensor(dlpark::versioned::Dlpack);

/// An owned legacy DLPack tensor (`DLManagedTensor`, before 1.0): dropped, it runs its deleter.
///
/// Made by [`Buffer::to_dlpack_legacy`] or [`DlpackLegacyTensor::from_raw`]; handed on with
/// [`DlpackLegacyTensor::into_raw`] (a `"dltensor"` capsule) or [`Device::from_dlpack_legacy`].
/// It carries no flags: a read-only buffer exported this way is marked nowhere, so prefer the
/// versioned form.
pub struct DlpackLegacyTensor(dlpark::legacy::Dlpack);

fn null_pointer() -> Error {
    Error::invalid("DLPack tensor", "a null DLManagedTensor pointer")
}

impl DlpackTensor {
    /// Takes ownership of a producer's tensor. A major version other than 1 is refused with
    /// [`Error::Unsupported`] after its deleter has run (the one field DLPack keeps at the same
    /// place in every version), as the DLPack header asks of consumers.
    ///
    /// # Safety
    /// `ptr` is null or points to a `DLManagedTensorVersioned` the caller owns: its metadata
    /// stays readable and unchanged until the deleter runs, its deleter (if not NULL) may be
    /// called exactly once from any thread and does not unwind, and its data is what the
    /// descriptor says (for [`Device::from_dlpack`]'s contract).
    pub unsafe fn from_raw(ptr: *mut DLManagedTensorVersioned) -> Result<DlpackTensor> {
        // SAFETY: the caller's contract; dlpark releases an incompatible tensor before it
        // returns the version error.
        match unsafe { Managed::from_raw(ptr) } {
            Ok(m) => Ok(DlpackTensor(m)),
            Err(dlpark::dlpack::FromRawError::Version { source }) => Err(Error::Unsupported {
                backend: "dlpack",
                what: format!(
                    "DLPack major version {} (unibuf reads major version {}; the tensor's \
                     deleter was called)",
                    source.actual, source.expected
                ),
            }),
            Err(_) => Err(null_pointer()),
        }
    }

    /// Hands the tensor on as a raw pointer (for a capsule): its deleter is now the
    /// receiver's to call, exactly once.
    pub fn into_raw(self) -> *mut DLManagedTensorVersioned {
        self.0.into_raw()
    }

    /// The pointer, still owned by this value.
    pub fn as_ptr(&self) -> *mut DLManagedTensorVersioned {
        self.0.as_ptr()
    }

    /// The embedded `DLTensor`.
    pub fn tensor(&self) -> &DLTensor {
        // SAFETY: owned tensors have readable, unchanging metadata (from_raw's contract, or
        // our own export).
        unsafe { self.0.tensor() }
    }

    /// The checked metadata: shape, strides, dtype, device, byte offset, sizes.
    pub fn view(&self) -> Result<dlpark::tensor::TensorRef<'_>> {
        // SAFETY: as in `tensor`.
        unsafe { dlpark::tensor::TensorRef::from_raw(self.tensor()) }.map_err(malformed)
    }

    /// The declared DLPack version.
    pub fn version(&self) -> DLPackVersion {
        self.0.version()
    }

    /// The flags (`READ_ONLY`, `IS_COPIED`, ...).
    pub fn flags(&self) -> DlpackFlags {
        self.0.flags()
    }

    /// The dlpark handle, for code that works with dlpark directly.
    pub fn into_managed(self) -> dlpark::versioned::Dlpack {
        self.0
    }
}

impl From<dlpark::versioned::Dlpack> for DlpackTensor {
    fn from(m: dlpark::versioned::Dlpack) -> DlpackTensor {
        DlpackTensor(m)
    }
}

impl DlpackLegacyTensor {
    /// Takes ownership of a producer's legacy tensor.
    ///
    /// # Safety
    /// As [`DlpackTensor::from_raw`], for a `DLManagedTensor`.
    pub unsafe fn from_raw(ptr: *mut DLManagedTensor) -> Result<DlpackLegacyTensor> {
        // SAFETY: the caller's contract (the legacy struct has no version to check).
        unsafe { Managed::from_raw(ptr) }
            .map(DlpackLegacyTensor)
            .map_err(|_| null_pointer())
    }

    /// Hands the tensor on as a raw pointer (for a capsule): its deleter is now the
    /// receiver's to call, exactly once.
    pub fn into_raw(self) -> *mut DLManagedTensor {
        self.0.into_raw()
    }

    /// The pointer, still owned by this value.
    pub fn as_ptr(&self) -> *mut DLManagedTensor {
        self.0.as_ptr()
    }

    /// The embedded `DLTensor`.
    pub fn tensor(&self) -> &DLTensor {
        // SAFETY: as in DlpackTensor::tensor.
        unsafe { self.0.tensor() }
    }

    /// The checked metadata: shape, strides, dtype, device, byte offset, sizes.
    pub fn view(&self) -> Result<dlpark::tensor::TensorRef<'_>> {
        // SAFETY: as in `tensor`.
        unsafe { dlpark::tensor::TensorRef::from_raw(self.tensor()) }.map_err(malformed)
    }

    /// The dlpark handle, for code that works with dlpark directly.
    pub fn into_managed(self) -> dlpark::legacy::Dlpack {
        self.0
    }
}

impl From<dlpark::legacy::Dlpack> for DlpackLegacyTensor {
    fn from(m: dlpark::legacy::Dlpack) -> DlpackLegacyTensor {
        DlpackLegacyTensor(m)
    }
}

/// Writes the descriptor's fields (reading shape and strides only when the metadata checks).
fn describe(f: &mut fmt::Formatter<'_>, t: &DLTensor) -> fmt::Result {
    write!(
        f,
        "{} id {}, {}, ",
        device_name(t.device.device_type),
        t.device.device_id,
        DtypeName(t.dtype)
    )?;
    // SAFETY: as in DlpackTensor::tensor.
    match unsafe { dlpark::tensor::TensorRef::from_raw(t) } {
        Ok(v) => write!(f, "shape {:?}, strides {:?}, ", v.shape(), v.strides())?,
        Err(e) => write!(f, "malformed metadata ({e}), ")?,
    }
    write!(f, "data {:?} + {}", t.data, t.byte_offset)
}

impl fmt::Debug for DlpackTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.version();
        write!(
            f,
            "DlpackTensor(v{}.{}, {:?}, ",
            v.major,
            v.minor,
            self.flags()
        )?;
        describe(f, self.tensor())?;
        f.write_str(")")
    }
}

impl fmt::Debug for DlpackLegacyTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DlpackLegacyTensor(")?;
        describe(f, self.tensor())?;
        f.write_str(")")
    }
}

fn malformed(e: dlpark::tensor::Error) -> Error {
    Error::invalid("DLPack tensor", e.to_string())
}

// ---- names and dtypes ------------------------------------------------------------------------

/// The header's name of a device type, for messages.
fn device_name(t: DLDeviceType) -> &'static str {
    match t {
        DLDeviceType::CPU => "kDLCPU",
        DLDeviceType::CUDA => "kDLCUDA",
        DLDeviceType::CUDAHOST => "kDLCUDAHost",
        DLDeviceType::OPENCL => "kDLOpenCL",
        DLDeviceType::VULKAN => "kDLVulkan",
        DLDeviceType::METAL => "kDLMetal",
        DLDeviceType::VPI => "kDLVPI",
        DLDeviceType::ROCM => "kDLROCM",
        DLDeviceType::ROCMHOST => "kDLROCMHost",
        DLDeviceType::EXTDEV => "kDLExtDev",
        DLDeviceType::CUDAMANAGED => "kDLCUDAManaged",
        DLDeviceType::ONEAPI => "kDLOneAPI",
        DLDeviceType::WEBGPU => "kDLWebGPU",
        DLDeviceType::HEXAGON => "kDLHexagon",
        DLDeviceType::MAIA => "kDLMAIA",
        DLDeviceType::TRN => "kDLTrn",
        _ => "an unknown device type",
    }
}

/// A dtype as messages name it: `bool (code 6, bits 8, lanes 1)`.
struct DtypeName(DLDataType);

impl fmt::Display for DtypeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        let name = match d.code {
            DLDataTypeCode::INT => "int",
            DLDataTypeCode::UINT => "uint",
            DLDataTypeCode::FLOAT => "float",
            DLDataTypeCode::OPAQUEHANDLE => "opaque handle",
            DLDataTypeCode::BFLOAT => "bfloat",
            DLDataTypeCode::COMPLEX => "complex",
            DLDataTypeCode::BOOL => "bool",
            c if (7..=14).contains(&c.0) => "float8",
            c if (15..=16).contains(&c.0) => "float6",
            DLDataTypeCode::FLOAT4_E2M1FN => "float4",
            _ => "unknown",
        };
        write!(
            f,
            "{name} (code {}, bits {}, lanes {})",
            d.code.0, d.bits, d.lanes
        )
    }
}

/// unibuf's dtype as DLPack names it (one lane).
fn to_dl_dtype(dtype: DType) -> DLDataType {
    let (code, bits) = match dtype {
        DType::F16 => (DLDataTypeCode::FLOAT, 16),
        DType::BF16 => (DLDataTypeCode::BFLOAT, 16),
        DType::F32 => (DLDataTypeCode::FLOAT, 32),
        DType::F64 => (DLDataTypeCode::FLOAT, 64),
        DType::I8 => (DLDataTypeCode::INT, 8),
        DType::I16 => (DLDataTypeCode::INT, 16),
        DType::I32 => (DLDataTypeCode::INT, 32),
        DType::I64 => (DLDataTypeCode::INT, 64),
        DType::U8 => (DLDataTypeCode::UINT, 8),
        DType::U16 => (DLDataTypeCode::UINT, 16),
        DType::U32 => (DLDataTypeCode::UINT, 32),
        DType::U64 => (DLDataTypeCode::UINT, 64),
    };
    DLDataType::scalar(code, bits)
}

/// The dtype of a DLPack dtype, or why unibuf has none.
fn from_dl_dtype(d: DLDataType, backend: &'static str) -> Result<DType> {
    let refuse = |why: &str| Error::Unsupported {
        backend,
        what: format!("DLPack dtype {}: {why}", DtypeName(d)),
    };
    if d.lanes != 1 {
        return Err(refuse("unibuf has no vector dtypes (lanes must be 1)"));
    }
    Ok(match (d.code, d.bits) {
        (DLDataTypeCode::FLOAT, 16) => DType::F16,
        (DLDataTypeCode::FLOAT, 32) => DType::F32,
        (DLDataTypeCode::FLOAT, 64) => DType::F64,
        (DLDataTypeCode::BFLOAT, 16) => DType::BF16,
        (DLDataTypeCode::INT, 8) => DType::I8,
        (DLDataTypeCode::INT, 16) => DType::I16,
        (DLDataTypeCode::INT, 32) => DType::I32,
        (DLDataTypeCode::INT, 64) => DType::I64,
        (DLDataTypeCode::UINT, 8) => DType::U8,
        (DLDataTypeCode::UINT, 16) => DType::U16,
        (DLDataTypeCode::UINT, 32) => DType::U32,
        (DLDataTypeCode::UINT, 64) => DType::U64,
        (DLDataTypeCode::BOOL, _) => {
            return Err(refuse(
                "unibuf has no bool dtype (view the bytes as uint8 on the producer's side)",
            ))
        }
        (DLDataTypeCode::COMPLEX, _) => return Err(refuse("unibuf has no complex dtype")),
        (
            DLDataTypeCode::INT
            | DLDataTypeCode::UINT
            | DLDataTypeCode::FLOAT
            | DLDataTypeCode::BFLOAT,
            bits,
        ) => {
            return Err(refuse(&format!(
                "unibuf has no {bits}-bit dtype of this kind"
            )))
        }
        _ => return Err(refuse("unibuf has no such dtype")),
    })
}

impl DType {
    /// The DLPack dtype of this dtype (one lane): `bfloat16` is `kDLBfloat` with 16 bits.
    ///
    /// ```
    /// use unibuf::{interop::dlpack::ffi::DLDataType, DType};
    /// assert_eq!(DType::F16.to_dlpack(), DLDataType::F16);
    /// ```
    pub fn to_dlpack(self) -> DLDataType {
        to_dl_dtype(self)
    }

    /// The dtype of a DLPack dtype; [`Error::Unsupported`] naming code, bits and lanes for
    /// what unibuf has no dtype of (bool, complex, vectors, float8).
    ///
    /// ```
    /// use unibuf::{interop::dlpack::ffi::DLDataType, DType};
    /// assert_eq!(DType::from_dlpack(DLDataType::BF16)?, DType::BF16);
    /// assert!(DType::from_dlpack(DLDataType::BOOL).is_err());
    /// # Ok::<(), unibuf::Error>(())
    /// ```
    pub fn from_dlpack(d: DLDataType) -> Result<DType> {
        from_dl_dtype(d, "dlpack")
    }
}

// ---- export ----------------------------------------------------------------------------------

impl Buffer {
    /// Exports the view as a DLPack 1.x tensor (`DLManagedTensorVersioned`), zero-copy: what
    /// `__dlpack__(stream=...)` returns.
    ///
    /// unibuf's pending work on the buffer is ordered before `stream` first (see
    /// [`DlpackStream`]). The tensor declares the version dlpark's headers define (1.x),
    /// explicit row-major strides, and `READ_ONLY` when the buffer is not writable; its
    /// deleter drops a clone of this buffer, so the memory stays alive (and is not reused)
    /// until the consumer calls it. The export is a zero-byte [`Direction::Shared`] ledger
    /// record at the caller's location.
    ///
    /// Errors: a stream the device cannot order work before ([`Error::Unsupported`]), a host
    /// write guard held on the view ([`Error::HostAccessConflict`]), a Metal view spanning two
    /// `MTLBuffer`s, a device fault.
    #[track_caller]
    pub fn to_dlpack(&self, stream: DlpackStream) -> Result<DlpackTensor> {
        self.export::<DLManagedTensorVersioned>(stream, CallSite::caller())
            .map(DlpackTensor)
    }

    /// Exports the view as a legacy DLPack tensor (`DLManagedTensor`), for consumers that
    /// predate DLPack 1.0 (a `"dltensor"` capsule). As [`Buffer::to_dlpack`], except that the
    /// legacy struct has no flags: read-only buffers are not marked read-only.
    #[track_caller]
    pub fn to_dlpack_legacy(&self, stream: DlpackStream) -> Result<DlpackLegacyTensor> {
        self.export::<DLManagedTensor>(stream, CallSite::caller())
            .map(DlpackLegacyTensor)
    }

    /// The DLPack device an export of this view names (`__dlpack_device__`): see the module's
    /// table. Errors as [`Buffer::to_dlpack`] for a view with no single native address.
    pub fn dlpack_device(&self) -> Result<DLDevice> {
        let device = Device {
            inner: self.alloc.device.clone(),
        };
        self.dlpack_address(&device).map(|(_, d, _)| d)
    }

    fn export<M: ManagedTensorBase>(
        &self,
        stream: DlpackStream,
        location: CallSite,
    ) -> Result<Managed<M>> {
        let device = Device {
            inner: self.alloc.device.clone(),
        };
        device.inner.check_fault()?;
        stream.check(&device)?;
        let (data, dl_device, byte_offset) = self.dlpack_address(&device)?;
        self.order_before_consumer(&device, stream)?;
        let shape = self
            .shape()
            .iter()
            .map(|&d| i64::try_from(d))
            .collect::<std::result::Result<Vec<i64>, _>>()
            .map_err(|_| {
                Error::invalid(
                    "DLPack export",
                    format!("shape {:?} does not fit in i64", self.shape()),
                )
            })?;
        let export_error = |e: &dyn fmt::Display| Error::invalid("DLPack export", e.to_string());
        // dlpark allocates the header with the shape and explicit compact strides behind it,
        // and installs a deleter that drops the context (this clone) and frees the header.
        let context = ExportContext {
            buffer: self.clone(),
            consumer: stream.consumer_stream(),
        };
        let mut init = dlpark::metadata::Dynamic::compact(shape)
            .initialize_as::<M>(Box::new(context))
            .map_err(|e| export_error(&e))?;
        init.set_data(data)
            .set_device(dl_device)
            .set_dtype(to_dl_dtype(self.dtype()))
            .set_byte_offset(byte_offset);
        if !self.is_writable() {
            // A no-op for the legacy struct, which has no flags.
            init.set_flags(DlpackFlags::READ_ONLY)
                .map_err(|e| export_error(&e))?;
        }
        // SAFETY: `data` (with `byte_offset`) addresses this view's bytes on `dl_device`, which
        // the context (a clone of the buffer) keeps alive until the deleter runs; shape and
        // strides live in the header allocation; READ_ONLY is set when the memory is not
        // writable, and IS_COPIED is not claimed (the memory is shared).
        let managed = unsafe { init.finish() };
        device
            .inner
            .ledger
            .record_shared(self.label(), Some(self.mode()), None, location);
        Ok(managed)
    }

    /// `data`, device and `byte_offset` of the view as DLPack names them (see the module's
    /// table). An empty view's `data` is NULL, as the DLPack header asks.
    fn dlpack_address(&self, device: &Device) -> Result<(*mut c_void, DLDevice, u64)> {
        let (data, dl_device, byte_offset) = match self.native()? {
            NativeBuffer::Host { ptr, .. } => (ptr.as_ptr(), DLDevice::CPU, 0),
            NativeBuffer::Cuda { device_ptr, .. } => {
                let host = self
                    .alloc
                    .host_addr(self.byte_offset())
                    .filter(|_| self.is_host_accessible());
                match (host, device.native()) {
                    (Some(host), _) => (
                        host.cast::<c_void>(),
                        DLDevice {
                            device_type: DLDeviceType::CUDAHOST,
                            device_id: 0,
                        },
                        0,
                    ),
                    (None, NativeDevice::Cuda { device, .. }) => (
                        device_ptr as usize as *mut c_void,
                        DLDevice::cuda(device),
                        0,
                    ),
                    (None, other) => {
                        return Err(Error::invalid(
                            "DLPack export",
                            format!("a CUDA buffer on a device that names itself {other:?}"),
                        ))
                    }
                }
            }
            NativeBuffer::Metal { buffer, offset, .. } => {
                (buffer.as_ptr(), DLDevice::metal(0), offset as u64)
            }
        };
        if self.is_empty() {
            return Ok((std::ptr::null_mut(), dl_device, 0));
        }
        Ok((data, dl_device, byte_offset))
    }

    /// Orders unibuf's pending work on the buffer before the consumer's stream: the last
    /// writes, and for a writable export the reads since (the consumer may write).
    fn order_before_consumer(&self, device: &Device, stream: DlpackStream) -> Result<()> {
        let pending = {
            let uses = self.alloc.uses();
            let r = self.byte_range();
            // A host write guard would let the consumer read bytes being written.
            if let Some(conflict) = uses.borrow_conflict(r.start, r.end, Access::Read) {
                return Err(conflict.error("DLPack export", self.label()));
            }
            // The consumer of a writable export may write.
            let access = if self.is_writable() {
                Access::Write
            } else {
                Access::Read
            };
            plan_waits(Waiter::Foreign, [(&*uses, access)])
        };
        let Some(waiter) = stream.waiter() else {
            return Ok(());
        };
        for fence in pending.fences().iter() {
            if device.is_complete(fence)? {
                continue;
            }
            // SAFETY: the handle-holding streams come only from the unsafe constructors,
            // whose contract is the one `order_native` states; the others hold no handle or a
            // CUDA default stream, valid in every context.
            unsafe { device.order_native(fence, waiter) }?;
        }
        Ok(())
    }
}

/// What an export's deleter drops: a clone of the buffer (so the memory lives as long as the
/// consumer holds the tensor) and the consumer's CUDA stream, if it named one.
///
/// A framework calls the deleter when its tensor is freed on the host, while kernels it queued
/// on the memory may still be running (PyTorch frees a tensor's storage at once; its own
/// allocator orders reuse by stream, but it knows nothing of unibuf's). So before the clone is
/// dropped, unibuf's default queue waits for everything the consumer's stream has queued (an
/// event, device-side), and that wait is recorded as a write of the memory: whatever reuses
/// the memory next is ordered after the consumer's last use.
struct ExportContext {
    buffer: Buffer,
    consumer: Option<NativeHandle>,
}

impl Drop for ExportContext {
    fn drop(&mut self) {
        let Some(stream) = self.consumer else {
            return;
        };
        let device = Device {
            inner: self.buffer.alloc.device.clone(),
        };
        // SAFETY: the stream is the one the consumer named for the export, which the Array API
        // makes a stream of the exporting device's context; frameworks keep their streams for
        // the life of the process (PyTorch's pool streams are never destroyed). A stream that
        // is gone makes the driver call fail, which is reported below, never undefined.
        let waited = unsafe {
            device
                .queue()
                .wait_foreign(ForeignSignal::CudaStream(stream))
        };
        match waited {
            Ok(fence) => self.buffer.alloc.uses().record(fence, Access::Write),
            Err(e) => tracing::warn!(
                "DLPack export of '{}': could not order reuse after the consumer's stream \
                 {stream:?} ({e}); the memory is reused after unibuf's own work only",
                self.buffer.label()
            ),
        }
    }
}

// ---- import ----------------------------------------------------------------------------------

/// Whether an import may copy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CopyPolicy {
    /// Never: a tensor that is not row-major contiguous is refused (the default: the point of
    /// DLPack is sharing memory, and a copy should be asked for).
    #[default]
    Never,
    /// Copy a tensor that is not row-major contiguous into a fresh buffer (the Array API's
    /// `copy=None`); share the others.
    IfNeeded,
    /// Always copy into a fresh buffer (the Array API's `copy=True`): the result does not
    /// alias the producer's memory.
    Always,
}

/// How [`Device::from_dlpack`] takes a tensor.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ImportOptions {
    /// The buffer's label (in stats, errors and the ledger). Default "dlpack".
    pub label: String,
    /// Whether the import may copy. Default [`CopyPolicy::Never`].
    pub copy: CopyPolicy,
    /// The storage mode of a copy's fresh buffer. Default [`StorageMode::Auto`].
    pub copy_mode: StorageMode,
    /// Import read-only even where the tensor is not marked `READ_ONLY`. Default false.
    pub read_only: bool,
    /// Foreign work the producer still has in flight on the memory (the Array API's producer
    /// was asked for no synchronisation, `stream=-1`): unibuf's default queue waits for it,
    /// and that wait counts as a write of the buffer, so work on every queue is ordered after
    /// it. Default none: the producer made the data ready (it synchronised on the stream it
    /// was given, or the memory is idle).
    pub wait_for: Option<ForeignSignal>,
}

impl Default for ImportOptions {
    fn default() -> ImportOptions {
        ImportOptions {
            label: "dlpack".to_owned(),
            copy: CopyPolicy::Never,
            copy_mode: StorageMode::Auto,
            read_only: false,
            wait_for: None,
        }
    }
}

impl ImportOptions {
    /// The defaults.
    pub fn new() -> ImportOptions {
        ImportOptions::default()
    }
    /// Sets the label.
    pub fn label(mut self, label: &str) -> ImportOptions {
        label.clone_into(&mut self.label);
        self
    }
    /// Sets the copy policy.
    pub fn copy(mut self, copy: CopyPolicy) -> ImportOptions {
        self.copy = copy;
        self
    }
    /// Sets the storage mode of a copy.
    pub fn copy_mode(mut self, mode: StorageMode) -> ImportOptions {
        self.copy_mode = mode;
        self
    }
    /// Imports read-only.
    pub fn read_only(mut self, read_only: bool) -> ImportOptions {
        self.read_only = read_only;
        self
    }
    /// Waits for foreign work before any unibuf work on the buffer.
    pub fn wait_for(mut self, signal: ForeignSignal) -> ImportOptions {
        self.wait_for = Some(signal);
        self
    }
}

/// Where an imported tensor's memory is, for this device.
#[derive(Clone, Copy, Debug)]
enum Place {
    Host,
    CudaDevice,
    CudaHost,
    Metal,
}

impl Place {
    /// The foreign memory at `data` + `byte_offset`.
    fn memory(self, data: *mut c_void, byte_offset: u64) -> Result<ForeignMemory> {
        let overflow = || {
            Error::invalid(
                "DLPack data",
                format!("{data:?} + byte_offset {byte_offset} overflows the address space"),
            )
        };
        let offset = usize::try_from(byte_offset).map_err(|_| overflow())?;
        if let Place::Metal = self {
            return Ok(ForeignMemory::MetalBuffer {
                buffer: NativeHandle::from_ptr(data),
                offset,
            });
        }
        let addr = (data as usize).checked_add(offset).ok_or_else(overflow)?;
        Ok(match self {
            Place::CudaDevice => ForeignMemory::CudaDevice { ptr: addr as u64 },
            Place::CudaHost => ForeignMemory::CudaHost {
                ptr: NativeHandle::from_addr(addr),
            },
            _ => ForeignMemory::Host {
                ptr: NativeHandle::from_addr(addr),
            },
        })
    }

    /// The address the element alignment is checked on (the offset in the `MTLBuffer` on
    /// Metal, as `wrap_foreign` checks it).
    fn aligned_address(memory: &ForeignMemory) -> u64 {
        match *memory {
            ForeignMemory::Host { ptr } | ForeignMemory::CudaHost { ptr } => ptr.addr() as u64,
            ForeignMemory::CudaDevice { ptr } => ptr,
            ForeignMemory::MetalBuffer { offset, .. } => offset as u64,
        }
    }
}

/// How an imported tensor's strides lay it out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// Row-major contiguous (NULL strides, or strides equal to row-major ones wherever a
    /// dimension is longer than 1).
    Contiguous,
    /// Anything else without negative strides: gatherable.
    Strided,
}

fn strides_text(shape: &[usize], strides: Option<&[i64]>) -> String {
    format!("shape {shape:?} with strides {strides:?} (in elements)")
}

/// The layout of `shape` x `strides`, or the refusal of negative strides. Dimensions of length
/// 1 take any stride (they are never stepped over), as DLPack producers write them freely.
fn classify(shape: &[usize], strides: Option<&[i64]>, backend: &'static str) -> Result<Layout> {
    let Some(strides) = strides else {
        return Ok(Layout::Contiguous);
    };
    if shape.iter().zip(strides).any(|(&n, &s)| n > 1 && s < 0) {
        return Err(Error::Unsupported {
            backend,
            what: format!(
                "DLPack {}: negative strides (a reversed view; make it contiguous on the \
                 producer's side)",
                strides_text(shape, Some(strides))
            ),
        });
    }
    let mut expected: u128 = 1;
    for (&n, &s) in shape.iter().zip(strides).rev() {
        if n == 1 {
            continue;
        }
        if s as u128 != expected {
            return Ok(Layout::Strided);
        }
        expected *= n as u128;
    }
    Ok(Layout::Contiguous)
}

/// A strided tensor's gather: `runs` contiguous runs of `run` elements each, whose starts the
/// `outer` dimensions (length, stride) step through in row-major order, from memory `span`
/// elements long.
///
/// Written here: dlpark checks layouts but copies nothing, and unibuf has no strided copy
/// command, so the gather is one plain device copy per run.
#[derive(Debug, PartialEq, Eq)]
struct Gather {
    run: usize,
    outer: Vec<(usize, usize)>,
    runs: usize,
    span: usize,
}

impl Gather {
    /// The plan for a tensor of at least one element without negative strides (checked).
    fn plan(shape: &[usize], strides: Option<&[i64]>, backend: &'static str) -> Result<Gather> {
        let too_big = || {
            Error::invalid(
                "DLPack strides",
                format!(
                    "{}: the memory it spans overflows the address space",
                    strides_text(shape, strides)
                ),
            )
        };
        // Row-major strides where none were given (CopyPolicy::Always of a contiguous tensor).
        let mut dims: Vec<(usize, usize)> = Vec::with_capacity(shape.len());
        let mut compact = 1usize;
        for (i, &n) in shape.iter().enumerate().rev() {
            let s = match strides {
                Some(s) => usize::try_from(s[i]).unwrap_or(0),
                None => compact,
            };
            compact = compact.checked_mul(n).ok_or_else(too_big)?;
            if n != 1 {
                dims.push((n, s));
            }
        }
        dims.reverse();
        let mut last = 0usize;
        for &(n, s) in &dims {
            last = (n - 1)
                .checked_mul(s)
                .and_then(|x| x.checked_add(last))
                .ok_or_else(too_big)?;
        }
        let span = last + 1;
        // The innermost dimensions that are contiguous make one run.
        let mut run = 1usize;
        while let Some(&(n, s)) = dims.last() {
            if s != run {
                break;
            }
            run *= n;
            dims.pop();
        }
        // Outer dimensions that step evenly merge, keeping the order: shape [2, 3, 2] with
        // strides [12, 4, 1] is 6 runs of 2 elements at stride 4.
        let mut outer: Vec<(usize, usize)> = Vec::with_capacity(dims.len());
        for (n, s) in dims {
            match outer.last_mut() {
                Some(prev) if s.checked_mul(n) == Some(prev.1) => *prev = (prev.0 * n, s),
                _ => outer.push((n, s)),
            }
        }
        let runs = outer.iter().map(|d| d.0).product::<usize>();
        if runs > MAX_GATHER_COPIES {
            return Err(Error::Unsupported {
                backend,
                what: format!(
                    "gathering DLPack {}: it takes {runs} copies of {run} element(s), more \
                     than unibuf gathers ({MAX_GATHER_COPIES}); make it contiguous on the \
                     producer's side",
                    strides_text(shape, strides)
                ),
            });
        }
        Ok(Gather {
            run,
            outer,
            runs,
            span,
        })
    }

    /// The element offset of each run's start in the source, in row-major order.
    fn starts(&self) -> Vec<usize> {
        let mut out = Vec::with_capacity(self.runs);
        let mut index = vec![0usize; self.outer.len()];
        let mut offset = 0usize;
        for _ in 0..self.runs {
            out.push(offset);
            for d in (0..self.outer.len()).rev() {
                let (n, s) = self.outer[d];
                index[d] += 1;
                offset += s;
                if index[d] < n {
                    break;
                }
                index[d] = 0;
                offset -= n * s;
            }
        }
        out
    }
}

impl Device {
    /// Takes a DLPack 1.x tensor (what `from_dlpack` receives from `__dlpack__()`): zero-copy
    /// when it is row-major contiguous, through [`Device::wrap_foreign`], so the buffer is
    /// [`StorageMode::Foreign`] and the tensor's deleter runs exactly once, after the last
    /// view drops and the last fence that used the memory completes. A `READ_ONLY` tensor
    /// (or [`ImportOptions::read_only`]) gives a buffer every write to which is refused with
    /// [`Error::ReadOnly`]. A strided tensor is copied into a fresh buffer if
    /// [`ImportOptions::copy`] allows it (a recorded device copy; the deleter then runs once
    /// the copy completes), else refused.
    ///
    /// The tensor is consumed even on error, and its deleter has then run (see the module's
    /// table of errors). The import is a zero-byte [`Direction::Shared`] ledger record at the
    /// caller's location.
    ///
    /// # Safety
    /// The tensor's memory is what its descriptor says (device, data, byte offset, dtype,
    /// shape and strides inside one allocation), valid for reads (and writes unless imported
    /// read-only) until its deleter runs; nothing else writes it while unibuf work on it is in
    /// flight, and its producer's pending work on it is done or named in
    /// [`ImportOptions::wait_for`], whose handle is a live object of this device's context.
    #[track_caller]
    pub unsafe fn from_dlpack(
        &self,
        tensor: DlpackTensor,
        options: &ImportOptions,
    ) -> Result<Buffer> {
        let location = CallSite::caller();
        // SAFETY: the caller's contract.
        unsafe { self.import_dlpack(tensor.0, options, location) }
    }

    /// Takes a legacy DLPack tensor (`DLManagedTensor`): as [`Device::from_dlpack`], without
    /// flags (read-only only through [`ImportOptions::read_only`]).
    ///
    /// # Safety
    /// As [`Device::from_dlpack`].
    #[track_caller]
    pub unsafe fn from_dlpack_legacy(
        &self,
        tensor: DlpackLegacyTensor,
        options: &ImportOptions,
    ) -> Result<Buffer> {
        let location = CallSite::caller();
        // SAFETY: the caller's contract.
        unsafe { self.import_dlpack(tensor.0, options, location) }
    }

    /// The place of a DLPack device on this device, or why it is not addressable here.
    fn dlpack_place(&self, d: DLDevice) -> Result<Place> {
        let backend = self.info().backend;
        let id = d.device_id;
        let expect_id = |place: Place, expected: i32| {
            if id == expected {
                Ok(place)
            } else if id < 0 {
                Err(Error::invalid(
                    "DLPack device",
                    format!(
                        "{} with the negative device id {id}",
                        device_name(d.device_type)
                    ),
                ))
            } else {
                Err(Error::WrongDevice {
                    what: match place {
                        Place::CudaDevice => "DLPack tensor of device type kDLCUDA with device id",
                        Place::Metal => "DLPack tensor of device type kDLMetal with device id",
                        _ => "DLPack tensor of device type kDLCPU with device id",
                    },
                    expected: expected as u64,
                    got: id as u64,
                })
            }
        };
        match (self.native(), d.device_type) {
            (NativeDevice::Cpu, DLDeviceType::CPU) => expect_id(Place::Host, 0),
            (NativeDevice::Cuda { device, .. }, DLDeviceType::CUDA) => {
                expect_id(Place::CudaDevice, device)
            }
            // Pinned host memory is every GPU's: DLPack writes id 0, and any id is taken.
            (NativeDevice::Cuda { .. }, DLDeviceType::CUDAHOST) => Ok(Place::CudaHost),
            // PyTorch (2.11) exports pinned tensors as kDLCPU, so host memory is taken as
            // pinned memory; `wrap_foreign` refuses pageable memory (the driver does not map it).
            (NativeDevice::Cuda { .. }, DLDeviceType::CPU) => expect_id(Place::CudaHost, 0),
            (NativeDevice::Metal { .. }, DLDeviceType::METAL) => expect_id(Place::Metal, 0),
            (native, t) => Err(Error::Unsupported {
                backend,
                what: format!(
                    "DLPack tensors on {} (device type {}, device id {id}): this {backend} \
                     device takes {}",
                    device_name(t),
                    t.0,
                    match native {
                        NativeDevice::Cuda { device, .. } => format!(
                            "kDLCUDA with device id {device}, kDLCUDAHost, and kDLCPU where the \
                             memory is pinned"
                        ),
                        NativeDevice::Metal { .. } => "kDLMetal with device id 0".to_owned(),
                        _ => "kDLCPU with device id 0".to_owned(),
                    }
                ),
            }),
        }
    }

    /// The import proper, over either ABI. Every early return drops `managed`, which runs
    /// the producer's deleter; past the wrap, the owner holds it.
    #[track_caller]
    unsafe fn import_dlpack<M: ManagedTensorBase>(
        &self,
        managed: Managed<M>,
        options: &ImportOptions,
        location: CallSite,
    ) -> Result<Buffer> {
        self.inner.check_fault()?;
        let backend = self.info().backend;
        // SAFETY: the as_ptr of an owned handle points to a live header.
        if let Some(v) = unsafe { &*managed.as_ptr() }.version() {
            // dlpark checked it when the handle was made; a caller may have changed it since.
            if v.major != DLPackVersion::CURRENT.major {
                return Err(Error::Unsupported {
                    backend,
                    what: format!("DLPack major version {} (unibuf reads 1)", v.major),
                });
            }
        }
        let read_only = options.read_only || managed.flags().contains(DlpackFlags::READ_ONLY);
        // SAFETY: owned handles have readable, unchanging metadata (the constructors'
        // contracts).
        let t: &DLTensor = unsafe { managed.tensor() };
        let place = self.dlpack_place(t.device)?;
        let dtype = from_dl_dtype(t.dtype, backend)?;
        // SAFETY: as above.
        let view = unsafe { dlpark::tensor::TensorRef::from_raw(t) }.map_err(malformed)?;
        let shape = view
            .shape()
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<std::result::Result<Vec<usize>, _>>()
            .map_err(|_| {
                Error::invalid(
                    "DLPack tensor",
                    format!("shape {:?} does not fit in usize", view.shape()),
                )
            })?;
        let strides: Option<Vec<i64>> = view.strides().map(<[i64]>::to_vec);
        let (data, byte_offset) = (t.data, t.byte_offset);
        let len = Buffer::checked_len(dtype, &shape)?;
        let label = options.label.as_str();

        if len == 0 {
            // Nothing to share: an empty buffer of unibuf's own; the producer's memory (often
            // NULL) is released at once.
            drop(managed);
            let buffer = self.alloc_labelled(label, dtype, &shape, options.copy_mode)?;
            self.inner
                .ledger
                .record_shared(label, None, Some(buffer.mode()), location);
            return Ok(buffer);
        }
        if data.is_null() {
            return Err(Error::invalid(
                "DLPack data",
                format!(
                    "a NULL data pointer for {len} elements of shape {shape:?} on {}",
                    device_name(t.device.device_type)
                ),
            ));
        }
        let memory = place.memory(data, byte_offset)?;
        let address = Place::aligned_address(&memory);
        if !address.is_multiple_of(dtype.size() as u64) {
            return Err(Error::Misaligned {
                what: "DLPack data + byte_offset for the dtype",
                value: address as usize,
                align: dtype.size(),
            });
        }
        let layout = classify(&shape, strides.as_deref(), backend)?;
        let copy = match (layout, options.copy) {
            (_, CopyPolicy::Always) | (Layout::Strided, CopyPolicy::IfNeeded) => true,
            (Layout::Contiguous, _) => false,
            (Layout::Strided, CopyPolicy::Never) => {
                return Err(Error::invalid(
                    "DLPack strides",
                    format!(
                        "{} is not row-major contiguous, and CopyPolicy::Never refuses the copy \
                         into a fresh buffer it would take",
                        strides_text(&shape, strides.as_deref())
                    ),
                ))
            }
        };
        let gather = if copy {
            Some(Gather::plan(&shape, strides.as_deref(), backend)?)
        } else {
            None
        };
        let owner: AllocationDeleter = managed.into_deleter();

        let Some(gather) = gather else {
            let access = if read_only {
                ForeignAccess::ReadOnly
            } else {
                ForeignAccess::ReadWrite
            };
            // SAFETY: the caller's contract: the memory is the contiguous dtype x shape it
            // describes, alive until `owner` (the producer's deleter) is dropped, which the
            // allocation does after its last view and last fence.
            let buffer = unsafe { self.wrap_foreign(label, memory, owner, access, dtype, &shape) }?;
            // SAFETY: the caller's contract covers the signal.
            unsafe { self.wait_for_producer(&buffer, options) }?;
            return Ok(buffer);
        };

        // The copy: the memory the tensor spans, wrapped read-only, gathered run by run.
        let span_bytes = gather.span * dtype.size();
        // SAFETY: the caller's contract: the strides address elements inside the producer's
        // allocation, so the span from the first element to the last is valid for reads.
        let source = unsafe {
            self.wrap_foreign(
                label,
                memory,
                owner,
                ForeignAccess::ReadOnly,
                DType::U8,
                &[span_bytes],
            )
        }?;
        // SAFETY: as above.
        unsafe { self.wait_for_producer(&source, options) }?;
        let started = self.inner.ledger.now_ns();
        let out = self.alloc_labelled(label, dtype, &shape, options.copy_mode)?;
        let run_bytes = gather.run * dtype.size();
        let commands: Vec<Command> = gather
            .starts()
            .into_iter()
            .enumerate()
            .map(|(i, start)| Command::Copy {
                src: source.alloc.range(start * dtype.size(), run_bytes),
                dst: out
                    .alloc
                    .range(out.byte_offset() + i * run_bytes, run_bytes),
            })
            .collect();
        let queue = self.queue();
        let fence = self.inner.submit(
            queue.id(),
            queue.submission_label(label),
            "DLPack copy",
            &[
                Use {
                    alloc: &source.alloc,
                    start: 0,
                    end: span_bytes,
                    access: Access::Read,
                },
                Use {
                    alloc: &out.alloc,
                    start: out.byte_offset(),
                    end: out.byte_offset() + out.byte_len(),
                    access: Access::Write,
                },
            ],
            &commands,
            Completion::Queue,
        )?;
        let ledger = &self.inner.ledger;
        ledger.record(CopyRecord {
            direction: Direction::DeviceToDevice,
            src: Some(StorageMode::Foreign),
            dst: Some(out.mode()),
            bytes: out.byte_len() as u64,
            staged: false,
            label: label.to_owned(),
            site: location,
            host_start_ns: started,
            host_ns: ledger.now_ns() - started,
            fence: Some(fence),
        });
        // The source goes now; its owner (the producer's deleter) once the copy completes.
        drop(source);
        Ok(out)
    }

    /// Makes every later use of `buffer` wait for the producer's pending work, if any.
    ///
    /// # Safety
    /// The signal's handle is a live object of this device's context.
    unsafe fn wait_for_producer(&self, buffer: &Buffer, options: &ImportOptions) -> Result<()> {
        let Some(signal) = &options.wait_for else {
            return Ok(());
        };
        // SAFETY: the caller's contract.
        let fence = unsafe { self.queue().wait_foreign(signal.clone()) }?;
        // The producer wrote the memory: a write fence orders every queue after it. The
        // buffer is new and no other thread can reach it, so no submission races this.
        buffer.alloc.uses().record(fence, Access::Write);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts() {
        let c = |shape: &[usize], strides: &[i64]| classify(shape, Some(strides), "cpu");
        assert_eq!(classify(&[2, 3], None, "cpu").unwrap(), Layout::Contiguous);
        assert_eq!(c(&[2, 3], &[3, 1]).unwrap(), Layout::Contiguous);
        assert_eq!(c(&[1, 3], &[99, 1]).unwrap(), Layout::Contiguous);
        assert_eq!(c(&[2, 1, 3], &[3, -7, 1]).unwrap(), Layout::Contiguous);
        assert_eq!(c(&[3, 2], &[1, 3]).unwrap(), Layout::Strided);
        assert_eq!(c(&[2, 3], &[6, 1]).unwrap(), Layout::Strided);
        assert_eq!(c(&[4], &[0]).unwrap(), Layout::Strided);
        assert!(matches!(
            c(&[2, 3], &[3, -1]),
            Err(Error::Unsupported { .. })
        ));
    }

    #[test]
    fn gather_plans_merge_runs() {
        // Rows of 3 out of rows of 4: 2 runs of 3.
        let g = Gather::plan(&[2, 3], Some(&[4, 1]), "cpu").unwrap();
        assert_eq!((g.run, g.runs, g.span), (3, 2, 7));
        assert_eq!(g.starts(), vec![0, 4]);
        // A transpose: single elements.
        let g = Gather::plan(&[3, 2], Some(&[1, 3]), "cpu").unwrap();
        assert_eq!((g.run, g.runs, g.span), (1, 6, 6));
        assert_eq!(g.starts(), vec![0, 3, 1, 4, 2, 5]);
        // Even outer steps merge: [2, 3, 2] at [12, 4, 1] is 6 runs of 2 at stride 4.
        let g = Gather::plan(&[2, 3, 2], Some(&[12, 4, 1]), "cpu").unwrap();
        assert_eq!(g.outer, vec![(6, 4)]);
        assert_eq!(g.starts(), vec![0, 4, 8, 12, 16, 20]);
        // Broadcast rows.
        let g = Gather::plan(&[3, 4], Some(&[0, 1]), "cpu").unwrap();
        assert_eq!((g.run, g.runs, g.span), (4, 3, 4));
        assert_eq!(g.starts(), vec![0, 0, 0]);
        // No strides: one run.
        let g = Gather::plan(&[5, 7], None, "cpu").unwrap();
        assert_eq!((g.run, g.runs, g.span), (35, 1, 35));
        assert!(matches!(
            Gather::plan(&[512, 512], Some(&[1, 512]), "cpu"),
            Err(Error::Unsupported { .. })
        ));
    }

    #[test]
    fn dtypes_round_trip() {
        for d in DType::ALL {
            assert_eq!(from_dl_dtype(to_dl_dtype(d), "cpu").unwrap(), d);
        }
        assert!(from_dl_dtype(DLDataType::BOOL, "cpu").is_err());
        assert!(from_dl_dtype(DLDataType::new(DLDataTypeCode::FLOAT, 32, 4), "cpu").is_err());
    }
}
