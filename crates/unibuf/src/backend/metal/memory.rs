//! Metal buffers: Shared, Private, no-copy (External) and Foreign memory, split into several
//! MTLBuffers where an allocation is longer than the device's `maxBufferLength`.
//!
//! Storage modes (design.md, "Storage modes"):
//! - `HostShared` (Shared): `newBufferWithLength:options:` with `MTLResourceStorageModeShared`;
//!   the host pointer is the buffer's `contents`.
//! - `Device` (Private): `MTLResourceStorageModePrivate`; never host-visible, so the core reaches
//!   it through the staging pool and blit copies.
//! - `HostRegistered` (External): `newBufferWithBytesNoCopy:length:options:deallocator:` over the
//!   caller's pages, with no deallocator: the core keeps the owner alive until `release`, which
//!   runs only once every command buffer that used the memory has completed. Apple requires a
//!   page-aligned pointer and a length that is a whole number of pages; the core rounds External
//!   regions to pages on every backend, and `wrap` checks it again.
//! - `Foreign`: an `id<MTLBuffer>` another framework made (`adopt`), retained and never freed
//!   here: `release` drops unibuf's reference only. The allocation is the bytes from the
//!   foreign offset on, so its one part starts at that offset of the buffer (`Part::base`).
//!   The buffer keeps its own storage mode (only Shared buffers are host-visible: a Managed one
//!   would need `didModifyRange:` after every host write) and its own hazard tracking (Metal
//!   orders the passes that touch a buffer only if it is tracked; an untracked one, as some
//!   frameworks make, gets no barriers from unibuf within a submission). Foreign
//!   host memory (`wrap_unaligned`) is the enclosing pages wrapped with one no-copy buffer, the
//!   allocation starting at the first foreign byte within it.
//!
//! Splitting. One MTLBuffer holds at most `maxBufferLength` bytes. A longer allocation becomes
//! several *parts* side by side, each a page multiple long (but the last). A Shared or External
//! allocation must stay one contiguous host range (the core hands out one host pointer), so its
//! memory is one host mapping wrapped part by part with no-copy buffers; Private parts are
//! separate buffers. Parts never overlap: Metal tracks hazards per buffer object, so two buffers
//! aliasing the same bytes would hide a write through one from a read through the other. Copies
//! and fills cross part boundaries freely (they are split per part); a kernel argument must lie
//! in one part, and one that does not is refused with an error naming the limit.

use crate::error::{Error, Result};
use crate::storage::MemoryKind;
use objc2::rc::Retained;
use objc2::runtime::ProtocolObject;
use objc2_metal::{MTLBuffer, MTLDevice, MTLResourceOptions};
use parking_lot::RwLock;
use std::collections::HashMap;
use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// One MTLBuffer of an allocation, covering `start..start + len` of it, from byte `base` of the
/// buffer on (0 but for foreign memory, which may begin inside its buffer).
pub(super) struct Part {
    pub buffer: Retained<ProtocolObject<dyn MTLBuffer>>,
    pub start: usize,
    pub len: usize,
    pub base: usize,
}

impl Part {
    /// The offset in `buffer` of byte `local` of the part: what Metal calls take.
    pub fn at(&self, local: usize) -> usize {
        self.base + local
    }
}

/// Host memory mapped by the backend itself behind a split Shared allocation.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr..ptr + len` is the anonymous mapping made by `map_anonymous`, unmapped
        // once; the no-copy parts over it are fields declared before it in `MetalAlloc` and so
        // are released first, and no pending work uses them (`Backend::release`'s contract).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// The memory behind one `RawAlloc` handle.
pub(super) struct MetalAlloc {
    /// Parts in ascending `start`, side by side over `0..bytes`.
    pub parts: Vec<Part>,
    pub bytes: usize,
    /// The host address of host-visible kinds.
    pub host: Option<NonNull<u8>>,
    /// Declared after `parts`: a split Shared allocation's mapping outlives its buffers.
    _mapping: Option<Mapping>,
}

// SAFETY: after construction the buffers are never mutated from Rust: they are only read
// (`contents`, `gpuAddress`) and bound into command buffers, which Metal's model of encoding on
// several threads at once (one command buffer per thread, shared resources) allows; retain and
// release of Objective-C objects are atomic. Command buffers and encoders, which are not
// thread-safe, never leave the `submit` call that made them. Synchronising access to the bytes
// is the core's job (completion epochs), stated in the unsafe contracts of `Backend`. The host
// pointer is just an address.
unsafe impl Send for MetalAlloc {}
// SAFETY: as above; nothing in it is mutated after construction.
unsafe impl Sync for MetalAlloc {}

impl MetalAlloc {
    /// The part holding byte `offset`, the offset in it and the bytes left in it from there;
    /// for `offset == bytes` (nothing left), the last part with 0 bytes left. Offsets here and
    /// in `locate` and `pieces` are in the part; Metal calls take `Part::at` of them.
    pub fn piece_at(&self, offset: usize) -> (&Part, usize, usize) {
        // Every part but the last has the first one's length, so the index is a division.
        let i = (offset / self.parts[0].len.max(1)).min(self.parts.len() - 1);
        let p = &self.parts[i];
        let local = offset - p.start;
        (p, local, p.len.saturating_sub(local))
    }

    /// The part that holds all of `offset..offset + len`, and the offset within it.
    pub fn locate(&self, offset: usize, len: usize) -> Option<(&Part, usize)> {
        let (p, local, left) = self.piece_at(offset);
        (len <= left).then_some((p, local))
    }

    /// Splits `offset..offset + len` into pieces that each lie in one part: (part, offset in
    /// the part, bytes), in ascending order.
    pub fn pieces(&self, offset: usize, len: usize) -> Vec<(&Part, usize, usize)> {
        let mut out = Vec::new();
        let (mut at, end) = (offset, offset + len);
        while at < end {
            let (p, local, left) = self.piece_at(at);
            let n = left.min(end - at);
            if n == 0 {
                break; // unreachable: the parts cover the allocation and the range was checked
            }
            out.push((p, local, n));
            at += n;
        }
        out
    }

    /// The device address: the first part's `gpuAddress` (of its first byte) where the OS has
    /// it (macOS 13 and later), else `fallback`. Meaningful to foreign kernels over the first
    /// part only.
    pub fn address(&self, has_gpu_address: bool, fallback: u64) -> u64 {
        match self.parts.first() {
            Some(p) if has_gpu_address => p.buffer.gpuAddress() + p.base as u64,
            _ => fallback,
        }
    }
}

/// Side-by-side parts `(start, len)` of at most `max_len` bytes, each a page multiple long but
/// the last; one part when it all fits.
pub(super) fn adjacent_parts(bytes: usize, max_len: usize, page: usize) -> Vec<(usize, usize)> {
    let part = (max_len / page * page).max(page);
    (0..bytes.div_ceil(part).max(1))
        .map(|i| (i * part, part.min(bytes - i * part)))
        .collect()
}

/// The live allocations of one device, by handle.
pub(super) struct Buffers {
    live: RwLock<HashMap<u64, Arc<MetalAlloc>>>,
    next: AtomicU64,
    /// The device's `maxBufferLength`.
    pub max_part: usize,
    page: usize,
}

/// The options of the buffers unibuf makes: Shared where the host sees them (Shared and
/// External memory), else Private. (Foreign buffers keep the options their maker chose.)
fn storage_options(host_visible: bool) -> MTLResourceOptions {
    // The default hazard tracking (tracked, for buffers made by the device) is kept: commands of
    // one submission run in order, and Metal orders encoders that touch the same buffer.
    if host_visible {
        MTLResourceOptions::StorageModeShared | MTLResourceOptions::CPUCacheModeDefaultCache
    } else {
        MTLResourceOptions::StorageModePrivate
    }
}

impl Buffers {
    pub fn new(max_part: usize, page: usize) -> Buffers {
        Buffers {
            live: RwLock::new(HashMap::new()),
            next: AtomicU64::new(1),
            max_part,
            page,
        }
    }

    fn insert(&self, alloc: MetalAlloc) -> (u64, Arc<MetalAlloc>) {
        let handle = self.next.fetch_add(1, Ordering::Relaxed);
        let alloc = Arc::new(alloc);
        self.live.write().insert(handle, alloc.clone());
        (handle, alloc)
    }

    /// The allocation behind `handle`, or an error naming it.
    pub fn get(&self, handle: u64) -> Result<Arc<MetalAlloc>> {
        self.live.read().get(&handle).cloned().ok_or_else(|| {
            Error::invalid(
                "range",
                format!("allocation handle {handle} is not live memory of this Metal device"),
            )
        })
    }

    /// Forgets `handle`, returning its allocation (dropped by the caller when it is unused).
    pub fn remove(&self, handle: u64) -> Option<Arc<MetalAlloc>> {
        self.live.write().remove(&handle)
    }

    /// Allocates `bytes` of Shared or Private memory (zero-filled: Metal initialises new
    /// buffers to zero).
    pub fn allocate(
        &self,
        device: &ProtocolObject<dyn MTLDevice>,
        kind: MemoryKind,
        bytes: usize,
    ) -> Result<(u64, Arc<MetalAlloc>)> {
        let oom = || Error::OutOfMemory {
            requested: bytes,
            reserved: 0,
            free: super::free_bytes(device),
            largest_free: 0,
        };
        let options = storage_options(kind == MemoryKind::HostShared);
        let alloc = match kind {
            MemoryKind::HostRegistered | MemoryKind::Foreign => {
                return Err(Error::invalid(
                    "kind",
                    "registered and foreign memory come from wrap_host and wrap_foreign",
                ))
            }
            MemoryKind::HostShared if bytes > self.max_part => {
                // One host mapping, wrapped part by part.
                let len = bytes.next_multiple_of(self.page);
                let mapping = map_anonymous(len).ok_or_else(oom)?;
                let parts = self.wrap_parts(device, mapping.ptr, len, options)?;
                MetalAlloc {
                    parts,
                    bytes,
                    host: Some(mapping.ptr),
                    _mapping: Some(mapping),
                }
            }
            MemoryKind::HostShared | MemoryKind::Device => {
                let mut parts = Vec::new();
                for (start, len) in adjacent_parts(bytes, self.max_part, self.page) {
                    let buffer = device
                        .newBufferWithLength_options(len, options)
                        .ok_or_else(oom)?;
                    parts.push(Part {
                        buffer,
                        start,
                        len,
                        base: 0,
                    });
                }
                let host = match kind {
                    // Shared and not split: one buffer, whose contents is the host view.
                    MemoryKind::HostShared => Some(parts[0].buffer.contents().cast::<u8>()),
                    _ => None,
                };
                MetalAlloc {
                    parts,
                    bytes,
                    host,
                    _mapping: None,
                }
            }
        };
        Ok(self.insert(alloc))
    }

    /// Wraps caller memory without copying. `ptr` and `bytes` are page multiples.
    ///
    /// # Safety
    /// The memory is valid for `bytes` bytes until the allocation is removed and dropped, after
    /// every command buffer that used it completed.
    pub unsafe fn wrap(
        &self,
        device: &ProtocolObject<dyn MTLDevice>,
        ptr: NonNull<u8>,
        bytes: usize,
    ) -> Result<(u64, Arc<MetalAlloc>)> {
        let addr = ptr.as_ptr() as usize;
        if !addr.is_multiple_of(self.page) {
            return Err(Error::Misaligned {
                what: "wrap_host: address (newBufferWithBytesNoCopy needs whole pages)",
                value: addr,
                align: self.page,
            });
        }
        if bytes == 0 || !bytes.is_multiple_of(self.page) {
            return Err(Error::Misaligned {
                what: "wrap_host: length (newBufferWithBytesNoCopy needs whole pages)",
                value: bytes,
                align: self.page,
            });
        }
        let parts = self.wrap_parts(device, ptr, bytes, storage_options(true))?;
        Ok(self.insert(MetalAlloc {
            parts,
            bytes,
            host: Some(ptr),
            _mapping: None,
        }))
    }

    /// No-copy buffers over `ptr..ptr + bytes`, part by part.
    fn wrap_parts(
        &self,
        device: &ProtocolObject<dyn MTLDevice>,
        ptr: NonNull<u8>,
        bytes: usize,
        options: MTLResourceOptions,
    ) -> Result<Vec<Part>> {
        let mut parts = Vec::new();
        for (start, len) in adjacent_parts(bytes, self.max_part, self.page) {
            // SAFETY: `start` is a page multiple inside the region, so the pointer is in bounds
            // and page-aligned, and `len` is a page multiple (or the region's end, itself a
            // page multiple) as newBufferWithBytesNoCopy requires. The region stays valid until
            // the allocation is dropped (the callers' contracts), and no deallocator is given:
            // the core, not Metal, frees the memory, after the buffers are released.
            let buffer = unsafe {
                device.newBufferWithBytesNoCopy_length_options_deallocator(
                    ptr.add(start).cast::<c_void>(),
                    len,
                    options,
                    None,
                )
            };
            let Some(buffer) = buffer else {
                return Err(Error::Unsupported {
                    backend: "metal",
                    what: format!(
                        "wrapping {len} bytes at {:#x} without a copy: newBufferWithBytesNoCopy \
                         refused the memory (it must be whole pages of memory from mmap or \
                         vm_allocate, at most maxBufferLength = {} bytes per buffer)",
                        ptr.as_ptr() as usize + start,
                        self.max_part,
                    ),
                });
            };
            parts.push(Part {
                buffer,
                start,
                len,
                base: 0,
            });
        }
        Ok(parts)
    }

    /// Registers bytes `offset..offset + bytes` of a foreign buffer (checked against its
    /// length by the caller) as a one-part allocation; `host` is their host address where the
    /// host may touch them. Dropping the allocation releases unibuf's reference only.
    pub fn adopt(
        &self,
        buffer: Retained<ProtocolObject<dyn MTLBuffer>>,
        offset: usize,
        bytes: usize,
        host: Option<NonNull<u8>>,
    ) -> (u64, Arc<MetalAlloc>) {
        self.insert(MetalAlloc {
            parts: vec![Part {
                buffer,
                start: 0,
                len: bytes,
                base: offset,
            }],
            bytes,
            host,
            _mapping: None,
        })
    }

    /// Wraps `bytes` of caller memory at any address without copying: one no-copy buffer over
    /// the pages that enclose them, the allocation starting at `ptr` within it. The enclosing
    /// pages must fit one buffer (`maxBufferLength`): a part that began inside a page could not
    /// be cut in the page-multiple parts that `MetalAlloc::piece_at` divides by.
    ///
    /// # Safety
    /// As `wrap`: the memory is valid for `bytes` bytes until the allocation is removed and
    /// dropped. The rest of the enclosing pages is then mapped too (each holds a valid byte),
    /// and no command reaches it: every range is checked against `bytes`.
    pub unsafe fn wrap_unaligned(
        &self,
        device: &ProtocolObject<dyn MTLDevice>,
        ptr: NonNull<u8>,
        bytes: usize,
    ) -> Result<(u64, Arc<MetalAlloc>)> {
        let addr = ptr.as_ptr() as usize;
        if bytes == 0 {
            // No page holds a byte of an empty region (its pointer may be one past the end of
            // a mapping), so none is wrapped: a small buffer of unibuf's own stands in, which
            // no command reaches (every range is empty).
            let buffer = device
                .newBufferWithLength_options(16, storage_options(true))
                .ok_or_else(|| Error::OutOfMemory {
                    requested: 16,
                    reserved: 0,
                    free: super::free_bytes(device),
                    largest_free: 0,
                })?;
            return Ok(self.adopt(buffer, 0, 0, Some(ptr)));
        }
        let head = addr % self.page;
        let pages = (head + bytes).next_multiple_of(self.page);
        // The longest part `wrap_parts` makes (`adjacent_parts`' rule).
        let one_part = (self.max_part / self.page * self.page).max(self.page);
        if pages > one_part {
            return Err(Error::Unsupported {
                backend: "metal",
                what: format!(
                    "wrapping {bytes} bytes of host memory at {addr:#x} without a copy: its pages \
                     ({pages} bytes) exceed one MTLBuffer ({one_part} bytes: maxBufferLength \
                     {} in whole pages); wrap it with Device::wrap_external instead",
                    self.max_part
                ),
            });
        }
        // The page start lies in the mapping that holds the first byte (`wrapping_sub`: no
        // unsafe pointer arithmetic is needed to name it).
        let start = NonNull::new(ptr.as_ptr().wrapping_sub(head)).ok_or_else(|| {
            Error::invalid("wrap_foreign", format!("{addr:#x}: no page starts there"))
        })?;
        // The pages are valid as long as the bytes are (the caller's contract); one part by
        // the check above.
        let parts = self.wrap_parts(device, start, pages, storage_options(true))?;
        let [mut part] = <[Part; 1]>::try_from(parts).map_err(|parts| {
            Error::invalid(
                "wrap_foreign",
                format!(
                    "{pages} bytes of pages became {} buffers, not one",
                    parts.len()
                ),
            )
        })?;
        part.base = head;
        part.len = bytes;
        Ok(self.insert(MetalAlloc {
            parts: vec![part],
            bytes,
            host: Some(ptr),
            _mapping: None,
        }))
    }
}

/// A fresh anonymous read-write mapping of `len` bytes (a page multiple), zero-filled.
fn map_anonymous(len: usize) -> Option<Mapping> {
    // SAFETY: a new private anonymous mapping has no preconditions; its pages read as zero.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANON,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return None;
    }
    NonNull::new(p.cast::<u8>()).map(|ptr| Mapping { ptr, len })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: usize = 16 << 10;

    #[test]
    fn adjacent_parts_tile_without_overlap() {
        let p = adjacent_parts(25 * PAGE + 7, 10 * PAGE, PAGE);
        assert_eq!(
            p,
            [
                (0, 10 * PAGE),
                (10 * PAGE, 10 * PAGE),
                (20 * PAGE, 5 * PAGE + 7)
            ]
        );
        assert_eq!(adjacent_parts(5, 10 * PAGE, PAGE), [(0, 5)]);
    }
}
