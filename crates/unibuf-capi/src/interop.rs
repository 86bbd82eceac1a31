//! Interop: the platform objects behind devices, queues and buffers; foreign memory wrapped
//! without copying; waits in both directions between unibuf queues and foreign streams; and
//! external work (a caller's callback enqueueing foreign work on a unibuf queue under its
//! epochs).
//!
//! The rule is the library's own: every use of a buffer is a fence. Work enqueued on a
//! queue's native stream directly is invisible to the epochs; enqueue it through
//! `ub_queue_external`, which orders it after the earlier work on the buffers it names and
//! records its fence on them.

use crate::buffer::{buffer, new_buffer_handle, ub_buffer};
use crate::call::{array_in, call, opt_str_in, shape_in, Out};
use crate::device::{device, ub_device};
use crate::error::{ub_status, CResult, Failure};
use crate::fence::{ub_fence, write_fence};
use crate::handle::{from_ptr, to_ptr, Kind, Registry};
use crate::host::{ub_release_fn, ReleaseOnDrop};
use crate::queue::{queue, ub_queue};
use crate::types::{dtype_in, ub_dtype};
use std::ffi::{c_char, c_void};
use std::sync::Arc;
use unibuf::interop::{
    ForeignAccess, ForeignMemory, ForeignSignal, HostSignal, NativeBuffer, NativeDevice,
    NativeEncoder, NativeHandle, NativeQueue, NativeWaiter,
};
use unibuf::Buffer;

/// Which platform a native object belongs to: one of the `UB_NATIVE_*` values.
pub type ub_native_kind = u32;
/// The CPU backend: host memory; queues are worker threads (no platform object).
pub const UB_NATIVE_CPU: ub_native_kind = 0;
/// CUDA: device pointers, `CUstream`s, `CUcontext`s.
pub const UB_NATIVE_CUDA: ub_native_kind = 1;
/// Metal: `id<MTLBuffer>`, `id<MTLCommandQueue>`, `id<MTLDevice>`.
pub const UB_NATIVE_METAL: ub_native_kind = 2;

/// The memory behind a buffer view, as the platform names it. Filled by `ub_buffer_native`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ub_native_buffer {
    /// The platform.
    pub kind: ub_native_kind,
    /// CPU: the host address of the view's first byte; Metal: the `id<MTLBuffer>` holding the
    /// view (add `offset`); CUDA: NULL.
    pub handle: *mut c_void,
    /// CUDA: the `CUdeviceptr` of the view's first byte; CPU: the host address again; Metal: 0.
    pub device_ptr: u64,
    /// Metal: the view's first byte within `handle`; otherwise 0.
    pub offset: usize,
    /// Bytes in the view.
    pub bytes: usize,
}

/// A kind of native object newer than this header.
fn newer(what: &str) -> Failure {
    Failure::new(
        ub_status::UB_STATUS_UNSUPPORTED,
        format!("{what} of a platform newer than this header"),
    )
}

/// The platform's name for the memory of `buf`. Reading it is safe; using it is not: keep the
/// buffer alive while foreign work uses the memory, and order that work with
/// `ub_queue_external`.
///
/// # Safety
/// `native_out` is valid for a write of `ub_native_buffer`.
#[no_mangle]
pub unsafe extern "C" fn ub_buffer_native(
    buf: *mut ub_buffer,
    native_out: *mut ub_native_buffer,
) -> ub_status {
    call("ub_buffer_native", || {
        let out = Out::new("native_out", native_out)?;
        let n = match buffer("buf", buf)?.native()? {
            NativeBuffer::Host { ptr, bytes } => ub_native_buffer {
                kind: UB_NATIVE_CPU,
                handle: ptr.as_ptr(),
                device_ptr: ptr.addr() as u64,
                offset: 0,
                bytes,
            },
            NativeBuffer::Cuda { device_ptr, bytes } => ub_native_buffer {
                kind: UB_NATIVE_CUDA,
                handle: std::ptr::null_mut(),
                device_ptr,
                offset: 0,
                bytes,
            },
            NativeBuffer::Metal {
                buffer,
                offset,
                bytes,
            } => ub_native_buffer {
                kind: UB_NATIVE_METAL,
                handle: buffer.as_ptr(),
                device_ptr: 0,
                offset,
                bytes,
            },
            _ => return Err(newer("a native buffer")),
        };
        // SAFETY: checked; valid by the caller's contract.
        unsafe { out.write(n) };
        Ok(())
    })
}

/// A queue's platform object. Filled by `ub_queue_native`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ub_native_queue {
    /// The platform.
    pub kind: ub_native_kind,
    /// CUDA: the queue's `CUstream` (non-blocking); Metal: its `id<MTLCommandQueue>`; CPU: NULL.
    pub handle: *mut c_void,
    /// The queue's index on its device (`ub_fence.queue`); CPU only, else 0.
    pub queue_id: u32,
}

/// The queue's platform object. Work enqueued on it directly is invisible to the epochs:
/// enqueue through `ub_queue_external` instead.
///
/// # Safety
/// `native_out` is valid for a write of `ub_native_queue`.
#[no_mangle]
pub unsafe extern "C" fn ub_queue_native(
    queue: *mut ub_queue,
    native_out: *mut ub_native_queue,
) -> ub_status {
    call("ub_queue_native", || {
        let out = Out::new("native_out", native_out)?;
        let n = match self::queue(queue)?.native()? {
            NativeQueue::Cpu { queue } => ub_native_queue {
                kind: UB_NATIVE_CPU,
                handle: std::ptr::null_mut(),
                queue_id: queue.0,
            },
            NativeQueue::Cuda { stream } => ub_native_queue {
                kind: UB_NATIVE_CUDA,
                handle: stream.as_ptr(),
                queue_id: 0,
            },
            NativeQueue::Metal { command_queue } => ub_native_queue {
                kind: UB_NATIVE_METAL,
                handle: command_queue.as_ptr(),
                queue_id: 0,
            },
            _ => return Err(newer("a native queue")),
        };
        // SAFETY: checked; valid by the caller's contract.
        unsafe { out.write(n) };
        Ok(())
    })
}

/// A device's platform objects. Filled by `ub_device_native`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ub_native_device {
    /// The platform.
    pub kind: ub_native_kind,
    /// CUDA: the primary `CUcontext` the library retained; Metal: the `id<MTLDevice>`; CPU:
    /// NULL.
    pub handle: *mut c_void,
    /// CUDA: the `CUdevice` ordinal; otherwise -1.
    pub cuda_device: i32,
}

/// The device's platform objects.
///
/// # Safety
/// `native_out` is valid for a write of `ub_native_device`.
#[no_mangle]
pub unsafe extern "C" fn ub_device_native(
    dev: *mut ub_device,
    native_out: *mut ub_native_device,
) -> ub_status {
    call("ub_device_native", || {
        let out = Out::new("native_out", native_out)?;
        let n = match device(dev)?.native() {
            NativeDevice::Cpu => ub_native_device {
                kind: UB_NATIVE_CPU,
                handle: std::ptr::null_mut(),
                cuda_device: -1,
            },
            NativeDevice::Cuda { context, device } => ub_native_device {
                kind: UB_NATIVE_CUDA,
                handle: context.as_ptr(),
                cuda_device: device,
            },
            NativeDevice::Metal { device } => ub_native_device {
                kind: UB_NATIVE_METAL,
                handle: device.as_ptr(),
                cuda_device: -1,
            },
            _ => return Err(newer("a native device")),
        };
        // SAFETY: checked; valid by the caller's contract.
        unsafe { out.write(n) };
        Ok(())
    })
}

/// What kind of foreign memory `ub_foreign_memory` describes: one of the `UB_FOREIGN_*` values.
pub type ub_foreign_kind = u32;
/// Host memory (the CPU backend; DLPack's kDLCPU): `handle` is its address.
pub const UB_FOREIGN_HOST: ub_foreign_kind = 0;
/// CUDA device memory of this device's context: `device_ptr` is the `CUdeviceptr`.
pub const UB_FOREIGN_CUDA_DEVICE: ub_foreign_kind = 1;
/// CUDA pinned host memory (`cudaHostAlloc`): `handle` is its host address.
pub const UB_FOREIGN_CUDA_HOST: ub_foreign_kind = 2;
/// Metal: `handle` is an `id<MTLBuffer>` of this device, `offset` the first byte in it.
pub const UB_FOREIGN_METAL_BUFFER: ub_foreign_kind = 3;

/// Memory another framework owns, as its platform names it (see `ub_foreign_kind` for which
/// fields each kind reads; the others are ignored).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ub_foreign_memory {
    /// The kind of memory.
    pub kind: ub_foreign_kind,
    /// A host address or an `id<MTLBuffer>`.
    pub handle: *mut c_void,
    /// A `CUdeviceptr`.
    pub device_ptr: u64,
    /// The first byte within a Metal buffer.
    pub offset: usize,
}

/// Wraps memory another framework owns (a PyTorch tensor's storage, a cudarc buffer, an
/// `MTLBuffer`) as a Foreign buffer of `dtype` x `shape`, without copying. The library never
/// frees the memory: `release(user_data)` (if not NULL) is called exactly once after the last
/// view is released and the last fence that used the memory completed — and also when this
/// call fails, before it returns — which is when the owner may free it. `read_only` makes
/// every write a `UB_STATUS_READ_ONLY` error. The wrap is a zero-byte "shared" record in the
/// copy audit.
///
/// Errors: `UB_STATUS_INVALID_ARGUMENT` for a NULL address or an unknown kind,
/// `UB_STATUS_MISALIGNED` for an address not aligned to the dtype, `UB_STATUS_UNSUPPORTED` for
/// memory this backend cannot address (CUDA memory on the CPU backend).
///
/// # Safety
/// `memory` points to an initialised `ub_foreign_memory` naming memory valid for `dtype` x
/// `shape` bytes (writable unless `read_only`) until `release` is called, which nothing else
/// writes while library work on it is in flight; `release` may run on any thread; `shape` is
/// NULL with `rank` 0 or points to `rank` `size_t`s; `label` is NULL or NUL-terminated;
/// `buf_out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_device_wrap_foreign(
    dev: *mut ub_device,
    label: *const c_char,
    memory: *const ub_foreign_memory,
    read_only: bool,
    dtype: ub_dtype,
    shape: *const usize,
    rank: usize,
    release: ub_release_fn,
    user_data: *mut c_void,
    buf_out: *mut *mut ub_buffer,
) -> ub_status {
    call("ub_device_wrap_foreign", || {
        // Taken first, so that any failure below releases the owner (as documented).
        let owner = ReleaseOnDrop::new(release, user_data);
        // SAFETY: the caller's contract.
        let out = unsafe { Out::handle("buf_out", buf_out) }?;
        // SAFETY: the caller's contract.
        let mem = unsafe { array_in("memory", memory, 1) }?;
        let mem = mem
            .first()
            .copied()
            .ok_or_else(|| Failure::null("memory"))?;
        // SAFETY: the caller's contract.
        let shape = unsafe { shape_in(shape, rank) }?;
        // SAFETY: the caller's contract.
        let label = unsafe { opt_str_in("label", label, "") }?;
        let d = device(dev)?;
        let dtype = dtype_in("dtype", dtype)?;
        let foreign = match mem.kind {
            UB_FOREIGN_HOST => ForeignMemory::Host {
                ptr: NativeHandle::from_ptr(mem.handle),
            },
            UB_FOREIGN_CUDA_DEVICE => ForeignMemory::CudaDevice {
                ptr: mem.device_ptr,
            },
            UB_FOREIGN_CUDA_HOST => ForeignMemory::CudaHost {
                ptr: NativeHandle::from_ptr(mem.handle),
            },
            UB_FOREIGN_METAL_BUFFER => ForeignMemory::MetalBuffer {
                buffer: NativeHandle::from_ptr(mem.handle),
                offset: mem.offset,
            },
            other => {
                return Err(Failure::invalid(
                    "memory.kind",
                    format!(
                        "{other} is not a ub_foreign_kind (UB_FOREIGN_HOST = 0 .. \
                         UB_FOREIGN_METAL_BUFFER = 3)"
                    ),
                ))
            }
        };
        let access = if read_only {
            ForeignAccess::ReadOnly
        } else {
            ForeignAccess::ReadWrite
        };
        // SAFETY: the caller's contract: the memory is valid for the shape's bytes until
        // `release` runs, which is when `owner` is dropped (after the last view and fence).
        let b = unsafe { d.wrap_foreign(label, foreign, owner, access, dtype, shape) }?;
        // SAFETY: checked by `Out::handle`.
        unsafe { out.write(new_buffer_handle(b)?) };
        Ok(())
    })
}

/// What a queue can wait for that the library did not submit: one of the `UB_SIGNAL_*` values.
pub type ub_signal_kind = u32;
/// A CUDA event recorded on a foreign stream (the wait is for its record at the time of the
/// call, as `cuStreamWaitEvent`): `handle` is the `CUevent`.
pub const UB_SIGNAL_CUDA_EVENT: ub_signal_kind = 1;
/// Everything enqueued on a foreign CUDA stream so far: `handle` is the `CUstream`.
pub const UB_SIGNAL_CUDA_STREAM: ub_signal_kind = 2;
/// A Metal shared event reaching `value`: `handle` is the `id<MTLSharedEvent>`.
pub const UB_SIGNAL_METAL_EVENT: ub_signal_kind = 3;

/// Makes this queue's later work wait, device-side, for foreign work (never a device-wide
/// sync). The fence of the wait itself goes to `*fence_out` (optional: may be NULL).
///
/// Errors: `UB_STATUS_INVALID_ARGUMENT` for a NULL handle or an unknown kind,
/// `UB_STATUS_UNSUPPORTED` for a signal of another platform than the queue's.
///
/// # Safety
/// `handle` is a live object of the kind named, of this device's context (or `MTLDevice`),
/// for the duration of the call, not used meanwhile in a way its platform forbids (recording
/// the same event concurrently); `fence_out` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_queue_wait_foreign(
    queue: *mut ub_queue,
    kind: ub_signal_kind,
    handle: *mut c_void,
    value: u64,
    fence_out: *mut ub_fence,
) -> ub_status {
    call("ub_queue_wait_foreign", || {
        let fence = Out::optional("fence_out", fence_out)?;
        let q = self::queue(queue)?;
        let h = NativeHandle::from_ptr(handle);
        let signal = match kind {
            UB_SIGNAL_CUDA_EVENT => ForeignSignal::CudaEvent(h),
            UB_SIGNAL_CUDA_STREAM => ForeignSignal::CudaStream(h),
            UB_SIGNAL_METAL_EVENT => ForeignSignal::MetalEvent { event: h, value },
            other => {
                return Err(Failure::invalid(
                    "kind",
                    format!(
                        "{other} is not a ub_signal_kind (UB_SIGNAL_CUDA_EVENT = 1 .. \
                         UB_SIGNAL_METAL_EVENT = 3; host signals: ub_queue_wait_host_signal)"
                    ),
                ))
            }
        };
        // SAFETY: the caller's contract covers the handle; the core refuses a NULL one and a
        // signal of another platform before touching it.
        let f = unsafe { q.wait_foreign(signal) }?;
        // SAFETY: checked; valid by the caller's contract.
        unsafe { write_fence(fence, f) };
        Ok(())
    })
}

/// A one-shot signal set by host code: the CPU backend's counterpart of an event on a stream
/// the library does not own. Opaque; release with `ub_host_signal_release`.
pub struct ub_host_signal {
    _opaque: [u8; 0],
}

static SIGNALS: Registry<HostSignal> = Registry::new(Kind::HostSignal);

fn signal(s: *mut ub_host_signal) -> CResult<Arc<HostSignal>> {
    SIGNALS.get("signal", from_ptr(s))
}

/// Live host signals (for the handle counts).
pub(crate) fn live_host_signals() -> usize {
    SIGNALS.live()
}

/// A new host signal, not set.
///
/// # Safety
/// `signal_out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_host_signal_create(signal_out: *mut *mut ub_host_signal) -> ub_status {
    call("ub_host_signal_create", || {
        // SAFETY: the caller's contract.
        let out = unsafe { Out::handle("signal_out", signal_out) }?;
        // SAFETY: checked by `Out::handle`.
        unsafe { out.write(to_ptr(SIGNALS.insert(HostSignal::new())?)) };
        Ok(())
    })
}

/// Sets the signal: queues waiting for it go on.
#[no_mangle]
pub extern "C" fn ub_host_signal_set(signal: *mut ub_host_signal) -> ub_status {
    call("ub_host_signal_set", || {
        self::signal(signal)?.set();
        Ok(())
    })
}

/// Releases a host signal handle. A queue still waiting for a signal whose every handle was
/// released unset can never go on: it fails with a device fault instead of hanging. NULL is a
/// no-op; releasing twice is `UB_STATUS_INVALID_HANDLE`.
#[no_mangle]
pub extern "C" fn ub_host_signal_release(signal: *mut ub_host_signal) -> ub_status {
    call("ub_host_signal_release", || {
        SIGNALS.release(from_ptr(signal))
    })
}

/// Makes this queue's later work wait until `signal` is set. The fence of the wait goes to
/// `*fence_out` (optional). GPU backends refuse host signals (`UB_STATUS_UNSUPPORTED`): a
/// device cannot wait for host code without blocking a driver thread.
///
/// # Safety
/// `fence_out` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_queue_wait_host_signal(
    queue: *mut ub_queue,
    signal: *mut ub_host_signal,
    fence_out: *mut ub_fence,
) -> ub_status {
    call("ub_queue_wait_host_signal", || {
        let fence = Out::optional("fence_out", fence_out)?;
        let q = self::queue(queue)?;
        let s = self::signal(signal)?;
        let f = q.wait_host_signal(&s)?;
        // SAFETY: checked; valid by the caller's contract.
        unsafe { write_fence(fence, f) };
        Ok(())
    })
}

/// Who is made to wait for a fence by `ub_device_order_native`: one of the `UB_WAITER_*`
/// values.
pub type ub_waiter_kind = u32;
/// The calling thread: it blocks until the fence completes (every backend; `handle` ignored).
pub const UB_WAITER_HOST: ub_waiter_kind = 0;
/// A foreign CUDA stream (`handle`): its later work waits on the device.
pub const UB_WAITER_CUDA_STREAM: ub_waiter_kind = 1;
/// A foreign Metal command buffer not yet committed, with no open encoder (`handle`): its
/// later commands wait.
pub const UB_WAITER_METAL_COMMAND_BUFFER: ub_waiter_kind = 2;

/// Makes foreign work wait for `fence` (how a framework's stream consumes a buffer the library
/// wrote): a device-side wait on CUDA and Metal, a blocking wait for `UB_WAITER_HOST`.
///
/// # Safety
/// For the CUDA and Metal kinds, `handle` is a live stream (or an uncommitted command buffer
/// with no open encoder) of this device's context or `MTLDevice`.
#[no_mangle]
pub unsafe extern "C" fn ub_device_order_native(
    dev: *mut ub_device,
    fence: ub_fence,
    kind: ub_waiter_kind,
    handle: *mut c_void,
) -> ub_status {
    call("ub_device_order_native", || {
        let d = device(dev)?;
        let h = NativeHandle::from_ptr(handle);
        let waiter = match kind {
            UB_WAITER_HOST => NativeWaiter::Host,
            UB_WAITER_CUDA_STREAM => NativeWaiter::CudaStream(h),
            UB_WAITER_METAL_COMMAND_BUFFER => NativeWaiter::MetalCommandBuffer(h),
            other => {
                return Err(Failure::invalid(
                    "kind",
                    format!(
                        "{other} is not a ub_waiter_kind (UB_WAITER_HOST = 0 .. \
                         UB_WAITER_METAL_COMMAND_BUFFER = 2)"
                    ),
                ))
            }
        };
        if matches!(waiter, NativeWaiter::Host) {
            // The host wait blocks: check the fence first, as every wait does.
            return crate::fence::wait(&d, fence);
        }
        // SAFETY: the caller's contract covers the handle; the core checks the fence and a
        // NULL handle before using it.
        Ok(unsafe { d.order_native(fence.into(), waiter) }?)
    })
}

/// Where a callback of `ub_queue_external` enqueues its work: what it receives.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ub_native_encoder {
    /// The platform.
    pub kind: ub_native_kind,
    /// CUDA: the queue's `CUstream`; Metal: an `id<MTLCommandBuffer>` of the queue that the
    /// library commits after the callback returns (end every encoder you open; do not commit
    /// it); CPU: NULL (the callback runs on the queue's worker thread, in queue order, and its
    /// work is done when it returns).
    pub handle: *mut c_void,
    /// CUDA: the `CUcontext`, current while the callback runs; otherwise NULL.
    pub context: *mut c_void,
}

/// A callback that enqueues foreign work: returns 0 on success, anything else on failure
/// (reported as `UB_STATUS_EXTERNAL`, or on the CPU backend as the queue's device fault, with
/// the value in the message). `encoder` is valid only during the call. It must return normally
/// (no C++ exception, no `longjmp`) and must not call back into the library.
pub type ub_external_fn =
    Option<unsafe extern "C" fn(user_data: *mut c_void, encoder: *const ub_native_encoder) -> i32>;

/// The callback and its context, sent to the queue.
struct ExternalCall {
    f: unsafe extern "C" fn(*mut c_void, *const ub_native_encoder) -> i32,
    owner: ReleaseOnDrop,
}

impl ExternalCall {
    fn run(&self, e: NativeEncoder) -> Result<(), unibuf::interop::ExternalError> {
        let encoder = match e {
            NativeEncoder::Cpu => ub_native_encoder {
                kind: UB_NATIVE_CPU,
                handle: std::ptr::null_mut(),
                context: std::ptr::null_mut(),
            },
            NativeEncoder::Cuda { stream, context } => ub_native_encoder {
                kind: UB_NATIVE_CUDA,
                handle: stream.as_ptr(),
                context: context.as_ptr(),
            },
            NativeEncoder::Metal { command_buffer } => ub_native_encoder {
                kind: UB_NATIVE_METAL,
                handle: command_buffer.as_ptr(),
                context: std::ptr::null_mut(),
            },
            _ => return Err("an encoder of a platform newer than this header".into()),
        };
        // SAFETY: the callback is the caller's, with its context, called at most once (the
        // core runs external work once); `encoder` lives across the call.
        let rc = unsafe { (self.f)(self.owner.user_data(), &encoder) };
        if rc == 0 {
            Ok(())
        } else {
            Err(format!("the callback returned {rc}").into())
        }
    }
}

/// Collects buffer handles into the core's buffers.
///
/// # Safety
/// `list` is NULL with `n` 0 or points to `n` handles.
unsafe fn buffers_in(
    what: &'static str,
    list: *const *mut ub_buffer,
    n: usize,
) -> CResult<Vec<Arc<Buffer>>> {
    // SAFETY: forwarded contract.
    let handles = unsafe { array_in(what, list, n) }?;
    handles.iter().map(|h| buffer(what, *h)).collect()
}

/// Runs foreign work on this queue under the epochs: the queue first waits (device-side) for
/// earlier work on the buffers named — writes before a read, also reads before a write — then
/// calls `fn(user_data, encoder)` to enqueue the work on its own stream or command buffer
/// (CUDA, Metal: during this call; CPU: on the queue's worker, after this call returns), and
/// records the fence, written to `*fence_out`, on `reads` and `writes`. Freeing, reuse, host
/// mappings and residency then wait for the foreign work as for the library's own.
///
/// `release(user_data)` (if not NULL) is called exactly once, after the callback ran, or when
/// it never will (this call failed), before this call returns.
///
/// Errors: `UB_STATUS_EXTERNAL` for a callback that returned non-zero (CUDA, Metal; on the CPU
/// backend the failure becomes the device's fault, reported by the next wait as
/// `UB_STATUS_DEVICE_FAULT`); `UB_STATUS_INVALID_ARGUMENT` when a written buffer overlaps
/// another buffer named.
///
/// # Safety
/// `reads` and `writes` are NULL with a count of 0, or point to that many handles; `fn`, if
/// not NULL, and `release` may be called on any thread with `user_data`; the callback touches
/// only the buffers named (and memory of its own), through the encoder given; `fence_out` is
/// valid for a write.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn ub_queue_external(
    queue: *mut ub_queue,
    reads: *const *mut ub_buffer,
    n_reads: usize,
    writes: *const *mut ub_buffer,
    n_writes: usize,
    callback: ub_external_fn,
    user_data: *mut c_void,
    release: ub_release_fn,
    fence_out: *mut ub_fence,
) -> ub_status {
    call("ub_queue_external", || {
        // Taken first, so that any failure below releases the context (as documented).
        let owner = ReleaseOnDrop::new(release, user_data);
        let out = Out::new("fence_out", fence_out)?;
        let f = callback.ok_or_else(|| Failure::null("callback"))?;
        // SAFETY: the caller's contract.
        let r = unsafe { buffers_in("reads", reads, n_reads) }?;
        // SAFETY: the caller's contract.
        let w = unsafe { buffers_in("writes", writes, n_writes) }?;
        let q = self::queue(queue)?;
        let r: Vec<&Buffer> = r.iter().map(|b| &**b).collect();
        let w: Vec<&Buffer> = w.iter().map(|b| &**b).collect();
        let work = ExternalCall { f, owner };
        let fence = q.external(&r, &w, move |e| work.run(e))?;
        // SAFETY: checked; valid by the caller's contract.
        unsafe { out.write(fence.into()) };
        Ok(())
    })
}
