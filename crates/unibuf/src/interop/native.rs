//! Native handles: the platform objects behind unibuf's buffers, queues and devices.
//!
//! Reading a handle is safe: it is a number. Using one (passing a device pointer to cuBLAS,
//! encoding into a command buffer) is the caller's `unsafe`, and the caller keeps the unibuf
//! object alive meanwhile and orders the work under the epochs (see [`Queue::external`]).
//!
//! [`Queue::external`]: crate::Queue::external

use crate::buffer::Buffer;
use crate::device::Device;
use crate::epoch::QueueId;
use crate::error::Result;
use crate::queue::Queue;
use std::ffi::c_void;
use std::fmt;

/// A pointer-sized handle of a platform object: a `CUstream`, a `CUcontext`, an `id<MTLBuffer>`,
/// a host address. It is only a value; what it points to belongs to whoever created it.
///
/// Handles of CUDA and Metal objects may be used from any thread, so this is `Send` and `Sync`;
/// the object's own rules (a context current, a command buffer not yet committed) still apply.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct NativeHandle(*mut c_void);

// SAFETY: a handle is a plain value; every use of what it points to is `unsafe` and states the
// platform's own thread rules (CUDA and Metal handles are usable from any thread).
unsafe impl Send for NativeHandle {}
// SAFETY: as above: sharing the value shares no state.
unsafe impl Sync for NativeHandle {}

impl NativeHandle {
    /// A handle from a raw pointer (a `CUstream`, an `id<MTLBuffer>` as `*mut c_void`).
    pub const fn from_ptr(ptr: *mut c_void) -> NativeHandle {
        NativeHandle(ptr)
    }
    /// A handle from an address, as Python frameworks hand them out (`stream.cuda_stream`).
    pub fn from_addr(addr: usize) -> NativeHandle {
        NativeHandle(addr as *mut c_void)
    }
    /// The raw pointer.
    pub const fn as_ptr(self) -> *mut c_void {
        self.0
    }
    /// The address.
    pub fn addr(self) -> usize {
        self.0 as usize
    }
    /// Whether the handle is null.
    pub fn is_null(self) -> bool {
        self.0.is_null()
    }
}

impl fmt::Debug for NativeHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0 as usize)
    }
}

/// The memory behind a buffer view, as the platform names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum NativeBuffer {
    /// Host memory (the CPU backend): the address of the view's first byte.
    Host {
        /// The first byte.
        ptr: NativeHandle,
        /// Bytes in the view.
        bytes: usize,
    },
    /// CUDA: the `CUdeviceptr` of the view's first byte (unified addressing: valid for every
    /// kind of memory, device, pinned or registered host memory).
    Cuda {
        /// The device address of the first byte.
        device_ptr: u64,
        /// Bytes in the view.
        bytes: usize,
    },
    /// Metal: the `id<MTLBuffer>` that holds the view, and the view's offset in it.
    Metal {
        /// The `id<MTLBuffer>`.
        buffer: NativeHandle,
        /// The view's first byte within that buffer.
        offset: usize,
        /// Bytes in the view.
        bytes: usize,
    },
}

/// A queue's platform object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum NativeQueue {
    /// The CPU backend's queues are worker threads; there is no platform object.
    Cpu {
        /// The queue.
        queue: QueueId,
    },
    /// CUDA: the queue's `CUstream` (non-blocking).
    Cuda {
        /// The `CUstream`.
        stream: NativeHandle,
    },
    /// Metal: the queue's `id<MTLCommandQueue>`.
    Metal {
        /// The `id<MTLCommandQueue>`.
        command_queue: NativeHandle,
    },
}

/// A device's platform objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum NativeDevice {
    /// The CPU backend.
    Cpu,
    /// CUDA: the primary context unibuf retained, and its device.
    Cuda {
        /// The `CUcontext` (the device's primary context, as the runtime API and PyTorch use).
        context: NativeHandle,
        /// The `CUdevice`.
        device: i32,
    },
    /// Metal: the `id<MTLDevice>`.
    Metal {
        /// The `id<MTLDevice>`.
        device: NativeHandle,
    },
}

/// Where external work is enqueued: what the closure of [`Queue::external`] receives.
///
/// [`Queue::external`]: crate::Queue::external
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum NativeEncoder {
    /// The CPU backend: the closure runs on the queue's worker thread, in queue order, and its
    /// work is done when it returns.
    Cpu,
    /// CUDA: enqueue on `stream` (the queue's own), with `context` current on this thread.
    Cuda {
        /// The queue's `CUstream`.
        stream: NativeHandle,
        /// The `CUcontext`, current while the closure runs.
        context: NativeHandle,
    },
    /// Metal: encode into `command_buffer`, a command buffer of the queue that unibuf commits
    /// after the closure returns (no encoder is open; end every encoder the closure opens, and
    /// do not commit it).
    Metal {
        /// The `id<MTLCommandBuffer>`.
        command_buffer: NativeHandle,
    },
}

impl Buffer {
    /// The platform's name for this view's memory: the device pointer on CUDA, the
    /// `id<MTLBuffer>` and byte offset on Metal, the host pointer on the CPU.
    ///
    /// Reading it is safe. Using it is not: keep the buffer alive while foreign work uses the
    /// memory, and order that work with [`Queue::external`](crate::Queue::external). Errors on
    /// Metal when a view spans two of the `MTLBuffer`s of an allocation longer than the device's
    /// `maxBufferLength`.
    ///
    /// ```
    /// use unibuf::{interop::NativeBuffer, DType, Device, StorageMode};
    /// let dev = Device::open("cpu")?;
    /// let x = dev.alloc(DType::F32, &[4, 8], StorageMode::Shared)?;
    /// let NativeBuffer::Host { ptr, bytes } = x.rows(1..2)?.native()? else { unreachable!() };
    /// assert_eq!(bytes, 32);
    /// assert_eq!(ptr.addr() as u64, x.device_address() + 32);
    /// # Ok::<(), unibuf::Error>(())
    /// ```
    pub fn native(&self) -> Result<NativeBuffer> {
        let r = self.byte_range();
        let range = self.alloc.range(r.start, r.end - r.start);
        self.alloc.device.backend.native_buffer(&range)
    }
}

impl Queue {
    /// The queue's platform object: the `CUstream` on CUDA, the `id<MTLCommandQueue>` on Metal.
    ///
    /// Work enqueued on it directly is invisible to unibuf's epochs; enqueue through
    /// [`Queue::external`] instead, which orders it against the buffers it uses.
    pub fn native(&self) -> Result<NativeQueue> {
        self.device.backend.native_queue(self.id())
    }
}

impl Device {
    /// The device's platform objects: the `CUcontext` and `CUdevice` on CUDA, the
    /// `id<MTLDevice>` on Metal.
    ///
    /// ```
    /// let dev = unibuf::Device::open("cpu")?;
    /// assert_eq!(dev.native(), unibuf::interop::NativeDevice::Cpu);
    /// # Ok::<(), unibuf::Error>(())
    /// ```
    pub fn native(&self) -> NativeDevice {
        self.inner.backend.native_device()
    }
}
