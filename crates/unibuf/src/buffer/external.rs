//! External storage: caller-owned host memory wrapped without copying.

use super::Buffer;
use crate::device::Device;
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use std::ptr::NonNull;

/// Host memory that can back an External buffer: a `Vec`, a boxed slice, a memory map.
///
/// # Safety
/// `as_bytes_ptr` and `byte_len` describe memory that stays valid, at the same address, for as
/// long as the value lives (moving the value must not move the bytes), and nothing else writes
/// it while the value is owned by a buffer. If `writable` returns true, the memory may be
/// written through the pointer `as_mut_bytes_ptr` returns.
pub unsafe trait HostMemory: Send + Sync + 'static {
    /// The first byte, for reading.
    fn as_bytes_ptr(&self) -> *const u8;
    /// The first byte, for writing (called once, when the memory is wrapped, and only if
    /// `writable`). The default derives it from `as_bytes_ptr`, which is right for memory held
    /// through a raw pointer; types that hand out their bytes through a shared borrow (`Vec`,
    /// boxed slices, `MmapMut`) override it, since writing through such a pointer is not allowed.
    fn as_mut_bytes_ptr(&mut self) -> *mut u8 {
        self.as_bytes_ptr().cast_mut()
    }
    /// Length in bytes.
    fn byte_len(&self) -> usize;
    /// Whether the device and host may write the memory.
    fn writable(&self) -> bool;
}

// SAFETY: a Vec's heap buffer does not move when the Vec moves, and the Vec is owned by the
// buffer, so nothing else writes it.
unsafe impl<T: Element> HostMemory for Vec<T> {
    fn as_bytes_ptr(&self) -> *const u8 {
        self.as_ptr().cast()
    }
    fn as_mut_bytes_ptr(&mut self) -> *mut u8 {
        self.as_mut_ptr().cast()
    }
    fn byte_len(&self) -> usize {
        std::mem::size_of_val(self.as_slice())
    }
    fn writable(&self) -> bool {
        true
    }
}

// SAFETY: as for Vec.
unsafe impl<T: Element> HostMemory for Box<[T]> {
    fn as_bytes_ptr(&self) -> *const u8 {
        self.as_ptr().cast()
    }
    fn as_mut_bytes_ptr(&mut self) -> *mut u8 {
        self.as_mut_ptr().cast()
    }
    fn byte_len(&self) -> usize {
        std::mem::size_of_val(&**self)
    }
    fn writable(&self) -> bool {
        true
    }
}

// SAFETY: a mapping stays at its address until unmapped on drop; it is read-only.
unsafe impl HostMemory for memmap2::Mmap {
    fn as_bytes_ptr(&self) -> *const u8 {
        self.as_ptr()
    }
    fn byte_len(&self) -> usize {
        self.len()
    }
    fn writable(&self) -> bool {
        false
    }
}

// SAFETY: as for Mmap; a MmapMut owned by the buffer has no other writer in this process.
unsafe impl HostMemory for memmap2::MmapMut {
    fn as_bytes_ptr(&self) -> *const u8 {
        self.as_ptr()
    }
    fn as_mut_bytes_ptr(&mut self) -> *mut u8 {
        self.as_mut_ptr()
    }
    fn byte_len(&self) -> usize {
        self.len()
    }
    fn writable(&self) -> bool {
        true
    }
}

// SAFETY: shared ownership keeps the memory alive and in place; it is exposed read-only because
// other owners may read it concurrently.
unsafe impl<M: HostMemory> HostMemory for std::sync::Arc<M> {
    fn as_bytes_ptr(&self) -> *const u8 {
        (**self).as_bytes_ptr()
    }
    fn byte_len(&self) -> usize {
        (**self).byte_len()
    }
    fn writable(&self) -> bool {
        false
    }
}

impl Device {
    /// Wraps caller memory as an External buffer without copying.
    ///
    /// The whole pages around `memory` are made addressable by the device (the same rule on
    /// every backend: page-aligned start and length after rounding); the view starts at the
    /// memory's own address and covers `dtype` x `shape`, which must fit in it. `memory` is
    /// kept alive until every view is dropped and every submission that used it completed.
    ///
    /// Where Metal cannot address the memory (it wraps only whole pages from mmap or
    /// vm_allocate), the bytes are copied into a Shared buffer instead: never silently, the copy
    /// is an upload in the ledger and a `tracing` warning, and the buffer's mode says Shared.
    /// The copy is the caller's own memory from then on: writable, and its writes do not reach
    /// the original.
    ///
    /// ```
    /// use unibuf::{DType, Device};
    /// let dev = Device::open("cpu")?;
    /// let weights: Vec<f32> = (0..1000).map(|i| i as f32).collect();
    /// let w = dev.wrap_external("weights", weights, DType::F32, &[10, 100])?;
    /// assert_eq!(w.read::<f32>()?[999], 999.0);
    /// assert_eq!(dev.ledger().total().count, 0, "wrapping copies nothing");
    /// # Ok::<(), unibuf::Error>(())
    /// ```
    #[track_caller]
    pub fn wrap_external<M: HostMemory>(
        &self,
        label: &str,
        memory: M,
        dtype: DType,
        shape: &[usize],
    ) -> Result<Buffer> {
        let len = Buffer::checked_len(dtype, shape)?;
        let bytes = len * dtype.size();
        let have = memory.byte_len();
        if bytes > have {
            return Err(Error::OutOfBounds {
                what: "wrap_external: the shape in bytes",
                start: 0,
                end: bytes,
                len: have,
            });
        }
        if have == 0 {
            return Err(Error::invalid(
                "wrap_external",
                "the memory is empty (0 bytes): there is nothing to wrap; allocate a zero-element buffer instead",
            ));
        }
        let mut memory = memory;
        // The address device and host writes go through, for writable memory, is the one the
        // type hands out for writing.
        let addr = if memory.writable() {
            memory.as_mut_bytes_ptr() as usize
        } else {
            memory.as_bytes_ptr() as usize
        };
        if addr % dtype.size() != 0 {
            return Err(Error::Misaligned {
                what: "wrap_external: memory address for the dtype",
                value: addr,
                align: dtype.size(),
            });
        }
        let page = self.info().page_size;
        let base = addr - addr % page;
        let end = (addr + have.max(1))
            .checked_next_multiple_of(page)
            .ok_or_else(|| {
                Error::invalid(
                    "wrap_external",
                    "memory ends at the top of the address space",
                )
            })?;
        let access = crate::storage::MemoryAccess::writable_if(memory.writable());
        let base_ptr = NonNull::new(base as *mut u8)
            .ok_or_else(|| Error::invalid("wrap_external", "memory lies in the null page"))?;
        match self.inner.wrap(
            Box::new(memory),
            base_ptr,
            end - base,
            access,
            label.to_owned(),
        ) {
            Ok(alloc) => Buffer::from_allocation(alloc, addr - base, dtype, shape),
            // Metal cannot address this memory (it wraps only whole pages from mmap or
            // vm_allocate): copy it instead, in the open. Other backends' refusals (CUDA's
            // partial overlap of a registered region, a driver error) stay errors: there the
            // caller asked for something wrong, which a silent copy would hide.
            Err((Error::Unsupported { backend, what }, owner)) if backend == "metal" => {
                tracing::warn!(
                    backend,
                    label,
                    bytes,
                    reason = %what,
                    "wrap_external: memory cannot be wrapped; copied into a Shared buffer"
                );
                // SAFETY: `owner` keeps the memory alive and unmoved (HostMemory's contract)
                // until it is dropped below; `addr..addr + bytes` lies inside it (checked above).
                let src = unsafe { std::slice::from_raw_parts(addr as *const u8, bytes) };
                let copy = self.copy_instead_of_wrapping(label, src, dtype, shape);
                drop(owner);
                copy
            }
            Err((e, _)) => Err(e),
        }
    }

    /// A Shared buffer holding a copy of `src`, recorded in the ledger as an upload: what
    /// `wrap_external` returns when the backend cannot wrap the memory.
    #[track_caller]
    fn copy_instead_of_wrapping(
        &self,
        label: &str,
        src: &[u8],
        dtype: DType,
        shape: &[usize],
    ) -> Result<Buffer> {
        let copy = self.alloc_labelled(label, dtype, shape, crate::StorageMode::Shared)?;
        let q = self.queue();
        let fence = q.upload_bytes(&copy, src, crate::transfer::Blocking::Allowed)?;
        self.wait(fence)?;
        Ok(copy)
    }
}

#[cfg(test)]
mod tests {
    use crate::{DType, Device, StorageMode};

    /// The fallback for memory a backend refuses to wrap copies it, and the ledger says so.
    #[test]
    fn memory_that_cannot_be_wrapped_is_copied_in_the_ledger() {
        let dev = Device::open("cpu").unwrap();
        let values: Vec<f32> = (0..1001).map(|i| i as f32 * 0.5 - 7.0).collect();
        let before = dev.ledger().total();
        let b = dev
            .copy_instead_of_wrapping(
                "refused",
                bytemuck::cast_slice(&values),
                DType::F32,
                &[7, 143],
            )
            .unwrap();
        assert_eq!(b.mode(), StorageMode::Shared);
        assert_eq!(b.shape(), &[7, 143]);
        assert_eq!(b.read::<f32>().unwrap().to_vec(), values);
        let after = dev.ledger().total();
        assert_eq!(after.count, before.count + 1, "one copy recorded");
        assert_eq!(after.bytes, before.bytes + 4004);
    }
}
