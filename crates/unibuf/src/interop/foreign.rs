//! Foreign memory: device memory owned by another framework, wrapped without copying.
//!
//! unibuf never frees it. Its owner object (a PyTorch tensor, a candle or cudarc buffer, a
//! DLPack capsule's deleter) is kept by the allocation and dropped only after the last view
//! drops and the last fence that used the memory completes, exactly as External host memory.
//! Memory stats count it apart ([`MemoryStats::foreign_bytes`](crate::MemoryStats)), and the
//! copy ledger records the wrap as a zero-byte [`Direction::Shared`](crate::Direction) entry.

use crate::buffer::Buffer;
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::interop::NativeHandle;
use crate::storage::StorageMode;

/// Memory another framework owns, as its platform names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ForeignMemory {
    /// Host memory (the CPU backend; DLPack's kDLCPU).
    Host {
        /// The first byte.
        ptr: NativeHandle,
    },
    /// CUDA device memory of this device's context: a `CUdeviceptr` (DLPack's kDLCUDA).
    CudaDevice {
        /// The device address of the first byte.
        ptr: u64,
    },
    /// CUDA pinned host memory (`cudaHostAlloc`, DLPack's kDLCUDAHost): host-visible, and the
    /// device reaches it through its device pointer.
    CudaHost {
        /// The host address of the first byte.
        ptr: NativeHandle,
    },
    /// Metal: an `id<MTLBuffer>` of this device and a byte offset into it (DLPack's kDLMetal).
    MetalBuffer {
        /// The `id<MTLBuffer>` (retained by unibuf while wrapped).
        buffer: NativeHandle,
        /// The first byte within the buffer.
        offset: usize,
    },
}

impl ForeignMemory {
    /// The address the element alignment is checked on.
    fn address(&self) -> u64 {
        match *self {
            ForeignMemory::Host { ptr } | ForeignMemory::CudaHost { ptr } => ptr.addr() as u64,
            ForeignMemory::CudaDevice { ptr } => ptr,
            ForeignMemory::MetalBuffer { offset, .. } => offset as u64,
        }
    }

    fn is_null(&self) -> bool {
        match *self {
            ForeignMemory::Host { ptr } | ForeignMemory::CudaHost { ptr } => ptr.is_null(),
            ForeignMemory::CudaDevice { ptr } => ptr == 0,
            ForeignMemory::MetalBuffer { buffer, .. } => buffer.is_null(),
        }
    }
}

/// Whether unibuf may write foreign memory: the access every wrapped memory has, under the
/// name the foreign-memory calls have always used.
pub use crate::storage::MemoryAccess as ForeignAccess;

impl Device {
    /// Wraps memory another framework owns as a buffer of `dtype` x `shape`, without copying.
    ///
    /// `owner` is whatever keeps the memory alive (a tensor, a buffer object, a capsule); it is
    /// dropped after the last view of the buffer drops and the last fence that used the memory
    /// completes. unibuf never frees the memory itself. The wrap is a zero-byte
    /// [`Direction::Shared`](crate::Direction) record in the copy ledger at the caller's
    /// location, and [`MemoryStats`](crate::MemoryStats) counts it in `foreign_bytes`.
    ///
    /// Errors: a null pointer, an address not aligned to the dtype, memory of another device or
    /// of a kind this backend cannot address (CUDA device memory on the CPU backend), or a range
    /// the platform says is not inside one allocation.
    ///
    /// # Safety
    /// `memory` is valid for `dtype` x `shape` bytes (for writes too unless `access` is
    /// `ReadOnly`) for as long as `owner` lives, and nothing else writes it while unibuf work
    /// on it is in flight (order foreign work with [`Queue::external`](crate::Queue::external)
    /// or the foreign-stream waits).
    ///
    /// ```
    /// use unibuf::interop::{ForeignAccess, ForeignMemory, NativeHandle};
    /// use unibuf::{DType, Device};
    /// let dev = Device::open("cpu")?;
    /// let mut theirs: Vec<f32> = (0..12).map(|i| i as f32).collect(); // another framework's
    /// let ptr = NativeHandle::from_ptr(theirs.as_mut_ptr().cast());
    /// // SAFETY: `theirs` is the owner: it lives in the buffer until the last use completes.
    /// let b = unsafe {
    ///     dev.wrap_foreign("theirs", ForeignMemory::Host { ptr }, theirs, ForeignAccess::ReadOnly,
    ///                      DType::F32, &[3, 4])?
    /// };
    /// assert_eq!(b.read::<f32>()?[11], 11.0);
    /// assert_eq!(dev.memory_stats().foreign_bytes, 48);
    /// # Ok::<(), unibuf::Error>(())
    /// ```
    #[track_caller]
    pub unsafe fn wrap_foreign<O: Send + Sync + 'static>(
        &self,
        label: &str,
        memory: ForeignMemory,
        owner: O,
        access: ForeignAccess,
        dtype: DType,
        shape: &[usize],
    ) -> Result<Buffer> {
        let location = crate::ledger::CallSite::caller();
        let len = Buffer::checked_len(dtype, shape)?;
        let bytes = len * dtype.size();
        if memory.is_null() {
            return Err(Error::invalid(
                "wrap_foreign",
                format!("{memory:?}: a null pointer"),
            ));
        }
        if !memory.address().is_multiple_of(dtype.size() as u64) {
            return Err(Error::Misaligned {
                what: "wrap_foreign: memory address for the dtype",
                value: memory.address() as usize,
                align: dtype.size(),
            });
        }
        // SAFETY: the caller's contract: valid for `bytes` while `owner` lives; the allocation
        // keeps `owner` until its release, which waits for every fence that used the memory.
        let raw = unsafe { self.inner.backend.wrap_foreign(&memory, bytes) }?;
        let alloc = self
            .inner
            .adopt_foreign(raw, bytes, access, label.to_owned(), Box::new(owner));
        let buffer = Buffer::from_allocation(alloc, 0, dtype, shape)?;
        self.inner
            .ledger
            .record_shared(label, None, Some(StorageMode::Foreign), location);
        Ok(buffer)
    }
}
