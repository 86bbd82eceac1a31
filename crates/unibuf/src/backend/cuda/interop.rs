//! Interop on CUDA: foreign device memory checked against this context, foreign streams and
//! events joined with `cuStreamWaitEvent`, and unibuf fences handed to foreign streams.

use super::driver::{check, CuError};
use super::CudaBackend;
use crate::backend::RawAlloc;
use crate::epoch::Fence;
use crate::error::{Error, Result};
use crate::interop::{ForeignMemory, ForeignSignal, NativeWaiter};
use crate::storage::MemoryKind;
use cudarc::driver::sys::{self, CUpointer_attribute};
use std::ffi::c_void;

/// Foreign memory registered with the backend: its host address where it is host memory.
pub(super) struct ForeignRegion {
    pub host: Option<usize>,
}

fn refuse(what: String) -> Error {
    Error::Unsupported {
        backend: "cuda",
        what,
    }
}

impl CudaBackend {
    /// One pointer attribute of `ptr`, or the driver's refusal (memory it does not know).
    fn pointer_attribute<T: Default>(
        &self,
        ptr: u64,
        attr: CUpointer_attribute,
    ) -> Result<T, CuError> {
        let mut v = T::default();
        // SAFETY: `v` is a valid out-pointer of the attribute's type (the caller picks `T` to
        // match: u32 for MEMORY_TYPE, i32 for DEVICE_ORDINAL); the context is current.
        check(
            unsafe { sys::cuPointerGetAttribute((&mut v as *mut T).cast::<c_void>(), attr, ptr) },
            "cuPointerGetAttribute",
        )?;
        Ok(v)
    }

    /// Checks that `ptr..ptr + bytes` is device memory of this device inside one allocation.
    fn check_foreign_device(&self, ptr: u64, bytes: usize) -> Result<()> {
        let unknown = |e: CuError| {
            Error::invalid(
                "wrap_foreign",
                format!(
                    "{ptr:#x} is not CUDA memory the driver knows ({} returned {})",
                    e.call,
                    e.name()
                ),
            )
        };
        let kind: u32 = self
            .pointer_attribute(ptr, CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE)
            .map_err(unknown)?;
        if kind != sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32 {
            return Err(Error::invalid(
                "wrap_foreign",
                format!(
                    "{ptr:#x} is not device memory (memory type {kind}); pinned host memory is \
                     ForeignMemory::CudaHost"
                ),
            ));
        }
        let ordinal: i32 = self
            .pointer_attribute(
                ptr,
                CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
            )
            .map_err(unknown)?;
        if ordinal != self.ordinal {
            return Err(Error::invalid(
                "wrap_foreign",
                format!(
                    "{ptr:#x} is memory of GPU {ordinal}, and this device is GPU {}",
                    self.ordinal
                ),
            ));
        }
        let (mut base, mut size) = (0u64, 0usize);
        // SAFETY: valid out-pointers; the context is current.
        check(
            unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut size, ptr) },
            "cuMemGetAddressRange",
        )
        .map_err(unknown)?;
        let end = ptr.checked_add(bytes as u64);
        if end.is_none_or(|end| end > base + size as u64) {
            return Err(Error::OutOfBounds {
                what: "wrap_foreign: the shape in bytes, within the foreign allocation",
                start: (ptr - base) as usize,
                end: (ptr - base) as usize + bytes,
                len: size,
            });
        }
        Ok(())
    }

    /// `Backend::wrap_foreign` on CUDA.
    pub(super) fn wrap_foreign_memory(
        &self,
        memory: &ForeignMemory,
        bytes: usize,
    ) -> Result<RawAlloc> {
        self.bind()?;
        let (addr, host) = match *memory {
            ForeignMemory::CudaDevice { ptr } => {
                self.check_foreign_device(ptr, bytes)?;
                (ptr, None)
            }
            ForeignMemory::CudaHost { ptr } => {
                let mut dev = 0u64;
                // SAFETY: a valid out-pointer; the driver checks that `ptr` is page-locked
                // memory it mapped (flags must be 0).
                check(
                    unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dev, ptr.as_ptr(), 0) },
                    "cuMemHostGetDevicePointer",
                )
                .map_err(|e| {
                    Error::invalid(
                        "wrap_foreign",
                        format!(
                            "{ptr:?} is not pinned host memory mapped for this device ({} \
                             returned {}); wrap pageable memory with Device::wrap_external",
                            e.call,
                            e.name()
                        ),
                    )
                })?;
                (dev, Some(ptr.addr()))
            }
            other => {
                return Err(refuse(format!(
                    "foreign memory {other:?}: CUDA addresses CudaDevice and CudaHost memory \
                     (wrap pageable host memory with Device::wrap_external)"
                )))
            }
        };
        let handle = self
            .next_wrap
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.foreign.lock().insert(handle, ForeignRegion { host });
        Ok(RawAlloc {
            addr,
            handle,
            bytes,
            kind: MemoryKind::Foreign,
        })
    }

    /// Refuses the foreign signals a CUDA stream cannot wait for, before anything is encoded.
    pub(super) fn check_signal(signal: &ForeignSignal) -> Result<()> {
        match signal {
            ForeignSignal::CudaEvent(_) | ForeignSignal::CudaStream(_) => Ok(()),
            other => Err(refuse(format!(
                "waiting for {other:?}: a CUDA stream waits for CUDA events and streams"
            ))),
        }
    }

    /// Encodes a wait of `stream` for a foreign signal (checked by `check_signal`).
    ///
    /// # Safety
    /// `stream` is a live stream of this context; the signal's handle is a live event or
    /// stream of this context (`Queue::wait_foreign`'s contract).
    pub(super) unsafe fn encode_wait_foreign(
        &self,
        stream: sys::CUstream,
        signal: &ForeignSignal,
    ) -> Result<()> {
        let cu = |e: CuError| e.into_error("waiting for foreign work");
        match signal {
            ForeignSignal::CudaEvent(ev) => {
                // SAFETY: the caller's contract: both live objects of this context.
                check(
                    unsafe { sys::cuStreamWaitEvent(stream, ev.as_ptr().cast(), 0) },
                    "cuStreamWaitEvent",
                )
                .map_err(cu)
            }
            ForeignSignal::CudaStream(foreign) => {
                let ev = self.take_event().map_err(cu)?;
                // SAFETY: a pooled event and the caller's live stream; the record captures all
                // work enqueued on it so far, and the wait captures the record at this call,
                // so the event may go back to the pool right after.
                let r = check(
                    unsafe { sys::cuEventRecord(ev.0, foreign.as_ptr().cast()) },
                    "cuEventRecord",
                )
                .and_then(|()| {
                    // SAFETY: as above.
                    check(
                        unsafe { sys::cuStreamWaitEvent(stream, ev.0, 0) },
                        "cuStreamWaitEvent",
                    )
                });
                self.recycle(vec![ev]);
                r.map_err(cu)
            }
            other => Err(refuse(format!("waiting for {other:?}"))),
        }
    }

    /// `Backend::order_native` on CUDA: the foreign stream waits for the fence's event.
    ///
    /// # Safety
    /// A `CudaStream` waiter is a live stream of this context.
    pub(super) unsafe fn order_native_stream(
        &self,
        fence: Fence,
        waiter: NativeWaiter,
    ) -> Result<()> {
        let NativeWaiter::CudaStream(foreign) = waiter else {
            return Err(refuse(format!(
                "ordering {waiter:?}: CUDA orders foreign CUDA streams"
            )));
        };
        self.bind()?;
        let Some((ev, fresh)) = self.wait_event(fence)? else {
            return Ok(()); // complete already: nothing to wait for
        };
        // SAFETY: the caller's live stream and an event recorded on the producer's stream
        // after the fence's work; the wait captures the record now, so a pooled event may be
        // recycled (and re-recorded) afterwards without changing what the stream waits for.
        let r = check(
            unsafe { sys::cuStreamWaitEvent(foreign.as_ptr().cast(), ev.0, 0) },
            "cuStreamWaitEvent",
        );
        if fresh {
            self.recycle(vec![ev]);
        }
        r.map_err(|e| e.into_error("ordering a foreign stream"))
    }
}
