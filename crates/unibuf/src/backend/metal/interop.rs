//! Interop on Metal: native handles of buffers, queues and the device; foreign `MTLBuffer`s (and
//! host memory) wrapped without copying; foreign shared events waited for; and unibuf fences
//! handed to foreign command buffers.
//!
//! Every cross-framework wait is an `MTLSharedEvent` wait encoded in a command buffer
//! (`encodeWaitForEvent:value:`): a unibuf queue waits for a foreign event's value, and a
//! foreign command buffer waits for the value a unibuf queue's event reaches at a fence's epoch
//! (the queue's event counts its completed epochs, `queue.rs`). Nothing blocks the host.
//!
//! Handles handed out are the objects' pointers, not retained: they stay valid while the
//! device (for queues and the device itself) or the buffer (for its memory) lives. Handles
//! taken in (a foreign buffer, a shared event) are retained for as long as unibuf uses them.

use super::{unsupported, MetalBackend, Op};
use crate::backend::{RawAlloc, RawRange};
use crate::epoch::Fence;
use crate::error::{Error, Result};
use crate::interop::{ForeignMemory, ForeignSignal, NativeBuffer, NativeHandle, NativeWaiter};
use crate::storage::MemoryKind;
use objc2::rc::Retained;
use objc2::runtime::ProtocolObject;
use objc2::Message;
use objc2_metal::{
    MTLBuffer, MTLCommandBuffer, MTLDevice, MTLEvent, MTLResource, MTLSharedEvent, MTLStorageMode,
};
use std::ptr::NonNull;

/// An object's pointer as a native handle, not retained: valid while unibuf keeps the object.
pub(super) fn handle<T: Message>(obj: &Retained<T>) -> NativeHandle {
    NativeHandle::from_ptr(Retained::as_ptr(obj).cast_mut().cast())
}

/// Whether `other` is `ours`: one `MTLDevice` object stands for one GPU in a process, so the
/// pointers are equal exactly when the devices are.
fn same_device(
    ours: &ProtocolObject<dyn MTLDevice>,
    other: &ProtocolObject<dyn MTLDevice>,
) -> bool {
    std::ptr::eq(ours, other)
}

/// Names a device in errors: its pointer and name.
fn describe(device: &ProtocolObject<dyn MTLDevice>) -> String {
    let ptr: *const ProtocolObject<dyn MTLDevice> = device;
    format!("{:#x} ('{}')", ptr as usize, device.name())
}

impl MetalBackend {
    /// `Backend::native_buffer` on Metal: the part of the allocation that holds the range.
    pub(super) fn native_buffer_of(&self, range: &RawRange) -> Result<NativeBuffer> {
        let a = self.alloc_of(range, "native buffer")?;
        let Some((part, local)) = a.locate(range.offset, range.bytes) else {
            return Err(unsupported(format!(
                "one MTLBuffer for bytes {}..{} of a {}-byte allocation: the range crosses the \
                 boundary of the Metal buffers it is split into (maxBufferLength {} bytes); take \
                 views that lie in one",
                range.offset,
                range.offset + range.bytes,
                a.bytes,
                self.buffers.max_part
            )));
        };
        Ok(NativeBuffer::Metal {
            buffer: handle(&part.buffer),
            offset: part.at(local),
            bytes: range.bytes,
        })
    }

    /// `Backend::wrap_foreign` on Metal: an `MTLBuffer` of this device, or host memory.
    ///
    /// # Safety
    /// The trait's contract: the memory is valid for `bytes` bytes until `release` returns; a
    /// `MetalBuffer` handle is then a live `id<MTLBuffer>`.
    pub(super) unsafe fn wrap_foreign_memory(
        &self,
        memory: &ForeignMemory,
        bytes: usize,
    ) -> Result<RawAlloc> {
        let (id, alloc) = match *memory {
            ForeignMemory::MetalBuffer { buffer, offset } => {
                // SAFETY: the caller's contract (`Device::wrap_foreign`'s): the handle is a live
                // `id<MTLBuffer>`, so it may be retained; the retain keeps it alive until
                // `release` drops the allocation, whatever its owner does meanwhile.
                let buffer = unsafe {
                    Retained::retain(buffer.as_ptr().cast::<ProtocolObject<dyn MTLBuffer>>())
                }
                .ok_or_else(|| Error::invalid("wrap_foreign", "a null MTLBuffer"))?;
                let owner = buffer.device();
                if !same_device(&self.device, &owner) {
                    return Err(Error::invalid(
                        "wrap_foreign",
                        format!(
                            "MTLBuffer {:?} belongs to MTLDevice {}, not to this device's {}",
                            handle(&buffer),
                            describe(&owner),
                            describe(&self.device)
                        ),
                    ));
                }
                let len = buffer.length();
                if offset.checked_add(bytes).is_none_or(|end| end > len) {
                    return Err(Error::OutOfBounds {
                        what:
                            "wrap_foreign: the offset and the shape in bytes, within the MTLBuffer",
                        start: offset,
                        end: offset.saturating_add(bytes),
                        len,
                    });
                }
                // Only a Shared buffer's contents are the bytes the GPU sees: a Managed one
                // would need `didModifyRange:` after host writes and a synchronising blit before
                // host reads, and a Private one has none. Those are reached through staging.
                let host = if buffer.storageMode() == MTLStorageMode::Shared {
                    let contents = buffer.contents().as_ptr().cast::<u8>();
                    // In bounds (checked above); `wrapping_add` just names the address.
                    NonNull::new(contents.wrapping_add(offset))
                } else {
                    None
                };
                self.buffers.adopt(buffer, offset, bytes, host)
            }
            ForeignMemory::Host { ptr } => {
                let ptr = NonNull::new(ptr.as_ptr().cast::<u8>())
                    .ok_or_else(|| Error::invalid("wrap_foreign", "a null host pointer"))?;
                // SAFETY: the caller's contract: valid for `bytes` bytes until `release`
                // returns, which drops the no-copy buffer first (`wrap_unaligned`'s contract).
                unsafe { self.buffers.wrap_unaligned(&self.device, ptr, bytes) }?
            }
            ForeignMemory::CudaDevice { .. } | ForeignMemory::CudaHost { .. } => {
                return Err(unsupported(format!(
                    "foreign memory {memory:?}: Metal addresses MTLBuffers of this device \
                     (ForeignMemory::MetalBuffer) and host memory, not CUDA memory"
                )))
            }
        };
        Ok(RawAlloc {
            addr: alloc.address(self.has_gpu_address, id << 32),
            handle: id,
            bytes,
            kind: MemoryKind::Foreign,
        })
    }

    /// Resolves `Command::WaitForeign`: a wait for a foreign shared event's value, encoded as a
    /// cross-queue wait is. Other signals are refused here, before anything is encoded.
    ///
    /// # Safety
    /// `Queue::wait_foreign`'s contract: a `MetalEvent` handle is a live `id<MTLSharedEvent>`
    /// of this device.
    pub(super) unsafe fn resolve_wait_foreign(
        &self,
        signal: &ForeignSignal,
        ops: &mut Vec<Op>,
    ) -> Result<()> {
        let ForeignSignal::MetalEvent { event, value } = signal else {
            return Err(unsupported(format!(
                "waiting for {signal:?}: a Metal queue waits for MTLSharedEvents \
                 (ForeignSignal::MetalEvent)"
            )));
        };
        // SAFETY: the caller's contract: a live `id<MTLSharedEvent>`. The retain keeps it alive
        // until the op is encoded, and the command buffer retains it from then on.
        let event = unsafe {
            Retained::retain(event.as_ptr().cast::<ProtocolObject<dyn MTLSharedEvent>>())
        }
        .ok_or_else(|| Error::invalid("foreign signal", "a null MTLSharedEvent"))?;
        if let Some(owner) = event.device() {
            if !same_device(&self.device, &owner) {
                return Err(Error::invalid(
                    "foreign signal",
                    format!(
                        "MTLSharedEvent {:?} belongs to MTLDevice {}, not to this device's {}",
                        handle(&event),
                        describe(&owner),
                        describe(&self.device)
                    ),
                ));
            }
        }
        ops.push(Op::Wait {
            event,
            value: *value,
        });
        Ok(())
    }

    /// `Backend::order_native` on Metal: a foreign command buffer waits for the fence's queue's
    /// shared event to reach the fence's epoch.
    ///
    /// # Safety
    /// The trait's contract: a `MetalCommandBuffer` waiter is a live `id<MTLCommandBuffer>` of
    /// this device, not committed and with no open encoder.
    pub(super) unsafe fn order_command_buffer(
        &self,
        fence: Fence,
        waiter: NativeWaiter,
    ) -> Result<()> {
        let NativeWaiter::MetalCommandBuffer(cb) = waiter else {
            return Err(unsupported(format!(
                "ordering {waiter:?}: Metal orders foreign command buffers \
                 (NativeWaiter::MetalCommandBuffer)"
            )));
        };
        let q = self.queue(fence.queue)?;
        if fence.epoch == 0 {
            return Ok(()); // nothing was submitted before it: nothing to wait for
        }
        if fence.epoch >= q.next_epoch() {
            return Err(Error::invalid(
                "fence",
                format!(
                    "{} has not submitted epoch {} yet: a device-side wait for it could never end",
                    fence.queue, fence.epoch
                ),
            ));
        }
        // SAFETY: the caller's contract: a live `id<MTLCommandBuffer>`, so a shared reference
        // to it is valid for this call (Objective-C objects may be used through shared
        // references; the caller does not encode into it on another thread meanwhile).
        let cb = unsafe {
            cb.as_ptr()
                .cast::<ProtocolObject<dyn MTLCommandBuffer>>()
                .as_ref()
        }
        .ok_or_else(|| Error::invalid("native waiter", "a null MTLCommandBuffer"))?;
        let owner = cb.device();
        if !same_device(&self.device, &owner) {
            return Err(Error::invalid(
                "native waiter",
                format!(
                    "MTLCommandBuffer {waiter:?} belongs to MTLDevice {}, not to this device's {}",
                    describe(&owner),
                    describe(&self.device)
                ),
            ));
        }
        // The event's value is the queue's completed epoch (a failed command buffer's handler
        // raises it too, `queue.rs`), so the wait ends once the fence's work has run, and never
        // waits for a faulted queue forever. The command buffer retains the event.
        cb.encodeWaitForEvent_value(ProtocolObject::from_ref(&*q.event), fence.epoch);
        Ok(())
    }
}
